"""Client API keys: who may call the gateway, and which models and variants each key may use.

Keys come from `Settings.api_keys` and the YAML file `Settings.api_keys_file` (a list of the same
entries), read once at startup. Only each key's sha256 is configured and held; a presented key is
hashed and compared with every stored digest in constant time (`hmac.compare_digest`, no early
exit), and neither the key nor its digest is ever logged or forwarded to vLLM.

Grants are `MODEL`, `MODEL@VARIANT`, or with `*` for either part (`MODEL` alone is `MODEL@*`). The
`none` variant serves the client's messages with no safety prompt, so `*` never matches it: only a
grant that names it (`MODEL@none`, `*@none`) does.

With no keys configured the gateway is open: every caller may use every variant (what a native
`make serve` on loopback needs); `KeyRing.enabled` says which. Knows nothing about HTTP beyond the
`Authorization` header's value.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import TypeAdapter

from gateway.errors import Forbidden, Unauthorized
from gateway.settings import RESERVED_VARIANTS, ApiKeyConfig, ModelConfig, Settings
from safeprompt.prompts import VARIANT_SEPARATOR

WILDCARD = "*"
NO_SAFETY_PROMPT = "none"


def hash_key(key: str) -> str:
    """The hex sha256 of a key, as configured in `api_keys[].sha256`."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def bearer_matches(authorization: str | None, sha256_hex: str) -> bool:
    """Whether `Authorization: Bearer TOKEN` carries the token whose hex sha256 is given (constant time)."""
    scheme, _, presented = (authorization or "").partition(" ")
    digest = hashlib.sha256(presented.strip().encode("utf-8")).digest()
    return scheme.lower() == "bearer" and hmac.compare_digest(digest, bytes.fromhex(sha256_hex))


@dataclass(frozen=True)
class ApiKey:
    """A configured key: its holder's name, its digest, its grants as (model, variant) patterns."""

    name: str
    digest: bytes
    grants: tuple[tuple[str, str], ...]
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None
    allowed_extra_fields: frozenset[str] = frozenset()

    @property
    def limit_id(self) -> str:
        """What its rate limits are kept under (the digest: holder names need not be unique)."""
        return self.digest.hex()

    def may_use(self, model: str, variant: str) -> bool:
        for model_pattern, variant_pattern in self.grants:
            if model_pattern not in (WILDCARD, model):
                continue
            if variant_pattern == variant or (variant_pattern == WILDCARD and variant != NO_SAFETY_PROMPT):
                return True
        return False


def parse_grant(grant: str, models: list[ModelConfig]) -> tuple[str, str]:
    """`MODEL[@VARIANT]` as (model, variant) patterns; ValueError when it names nothing served."""
    model, _, variant = grant.partition(VARIANT_SEPARATOR)
    variant = variant or WILDCARD
    configs = models if model == WILDCARD else [config for config in models if config.name == model]
    if not configs:
        raise ValueError(f"API key grant {grant!r} names model {model!r}, which is not served")
    known = {WILDCARD, *RESERVED_VARIANTS, *(name for config in configs for name in config.artifacts)}
    if variant not in known:
        raise ValueError(f"API key grant {grant!r} names variant {variant!r}, which is not one of {sorted(known)}")
    return model, variant


def read_keys_file(path: Path) -> list[ApiKeyConfig]:
    """The `api_keys` entries of a YAML file (a list)."""
    if not path.is_file():
        raise FileNotFoundError(f"api_keys_file={path} does not exist")
    return TypeAdapter(list[ApiKeyConfig]).validate_python(yaml.safe_load(path.read_text()) or [])


class KeyRing:
    """Every configured key; `authenticate` and `authorize` are the two checks of a request."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._keys = keys

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """The keys of `settings` and its keys file; ValueError on an unknown grant or a repeated key."""
        configs = list(settings.api_keys)
        if settings.api_keys_file is not None:
            configs.extend(read_keys_file(settings.api_keys_file))
        digests = [config.sha256 for config in configs]
        if len(digests) != len(set(digests)):
            raise ValueError("the same API key is configured twice")
        if settings.require_api_keys and not configs:
            raise ValueError(
                "require_api_keys is set but no API key is configured: add api_keys or api_keys_file "
                "(docs/security.md, 'API keys')"
            )
        keys = [
            ApiKey(
                name=config.name,
                digest=bytes.fromhex(config.sha256),
                grants=tuple(parse_grant(grant, settings.models) for grant in config.models),
                requests_per_minute=config.requests_per_minute,
                tokens_per_minute=config.tokens_per_minute,
                max_concurrent_requests=config.max_concurrent_requests,
                allowed_extra_fields=frozenset(config.allowed_extra_fields),
            )
            for config in configs
        ]
        return cls(keys)

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        return tuple(self._keys)

    @property
    def enabled(self) -> bool:
        """False when no key is configured: the gateway is open."""
        return bool(self._keys)

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The key named by an `Authorization: Bearer KEY` header; None when keys are disabled.

        Raises Unauthorized (401) when keys are enabled and the header is missing or the key unknown."""
        if not self._keys:
            return None
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthorized("missing API key: send it as 'Authorization: Bearer KEY'")
        digest = hashlib.sha256(presented.strip().encode("utf-8")).digest()
        found: ApiKey | None = None
        for key in self._keys:  # every digest is compared, so the time does not tell which key matched
            if hmac.compare_digest(digest, key.digest):
                found = key
        if found is None:
            raise Unauthorized("invalid API key")
        return found

    def authorize(self, key: ApiKey | None, model: str, variant: str) -> None:
        """Raise Forbidden (403) unless `key` is granted `model@variant` (None: keys are disabled)."""
        if key is None or key.may_use(model, variant):
            return
        raise Forbidden(
            f"this API key is not granted '{model}{VARIANT_SEPARATOR}{variant}'",
            param="model",
        )
