"""The gateway's one typed settings object.

Built once by the app factory (never at import time) from, in order of precedence: explicit
arguments, environment variables (`GATEWAY_` prefix, `__` for nesting, e.g.
`GATEWAY_UPSTREAM_URLS='["http://vllm:8000"]'`), and the YAML file named by `GATEWAY_CONFIG`.
This module knows nothing about HTTP handling.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from gateway.protocol import FORBIDDEN_FIELDS, ChatCompletionRequest
from safeprompt.judge import DEFAULT_JUDGE
from safeprompt.judge.model_judge import ModelJudgeSettings
from safeprompt.prompts import HUMAN_PROMPTS, VARIANT_SEPARATOR

RESERVED_VARIANTS = ("none", *HUMAN_PROMPTS)


class ModelConfig(BaseModel):
    """One served model and its safety-prompt variants."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(description="public model id, e.g. 'smollm2-135m-instruct'")
    upstream_model: str | None = Field(default=None, description="vLLM --served-model-name; default: name")
    model_path: Path | None = Field(
        default=None,
        description="local Hugging Face folder of the served model; artifacts are validated against "
        "its hidden size and chat template at startup",
    )
    default_variant: str = Field(default="default", description="variant applied to the bare model id")
    # Variant name -> artifact directory (written by the trainer or imported).
    artifacts: dict[str, Path] = Field(default_factory=dict)
    # A forced artifact was trained past a failed label-balance check: its refusal direction rests
    # on labels that cannot support one. It is served only when this names it explicitly.
    allow_forced_artifacts: list[str] = Field(default_factory=list)
    # Variant name -> weight; when set, the bare model id splits its traffic between these variants
    # (deterministically per user, else per request id).
    split: dict[str, float] = Field(default_factory=dict)
    # Unmodelled request fields forwarded to vLLM for this model beyond the default allow-list
    # (gateway.protocol.FORWARDED_EXTRA_FIELDS), e.g. [logit_bias]. The fields that move or cut the
    # safety prompt (gateway.protocol.FORBIDDEN_FIELDS) cannot be enabled.
    allowed_extra_fields: list[str] = Field(default_factory=list)
    # The dtype soft prompts are sent in: the one vLLM computes in, which it casts prompt_embeds
    # to anyway, so the same tensor arrives in half the bytes of a float32 artifact. "auto": the
    # model_path checkpoint's dtype when it is bfloat16 or float16 (what vLLM's --dtype auto
    # serves), else the artifact's own. Set it to vLLM's --dtype when that is given explicitly.
    embeds_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @property
    def upstream_name(self) -> str:
        return self.upstream_model or self.name

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or VARIANT_SEPARATOR in value:
            raise ValueError(f"model name must be non-empty and must not contain {VARIANT_SEPARATOR!r}")
        return value

    @model_validator(mode="after")
    def _check_variants(self) -> ModelConfig:
        for name in self.artifacts:
            if name in RESERVED_VARIANTS or VARIANT_SEPARATOR in name or not name:
                raise ValueError(f"artifact variant name {name!r} is reserved or invalid")
        for name in self.allow_forced_artifacts:
            if name not in self.artifacts:
                raise ValueError(f"allow_forced_artifacts names {name!r}, which is not an artifact variant")
        known = set(RESERVED_VARIANTS) | set(self.artifacts)
        if self.default_variant not in known:
            raise ValueError(f"default_variant {self.default_variant!r} is not one of {sorted(known)}")
        for name, weight in self.split.items():
            if name not in known:
                raise ValueError(f"split variant {name!r} is not one of {sorted(known)}")
            if weight < 0:
                raise ValueError(f"split weight for {name!r} must be >= 0")
        if self.split and sum(self.split.values()) <= 0:
            raise ValueError("split weights must not all be zero")
        check_enableable_fields(self.allowed_extra_fields, "allowed_extra_fields")
        return self


def check_enableable_fields(names: list[str], where: str) -> None:
    """Fields an operator may enable beyond the default allow-list: never one that moves or removes
    the safety prompt (FORBIDDEN_FIELDS), never one the gateway models itself."""
    for name in names:
        if name in FORBIDDEN_FIELDS:
            raise ValueError(f"{where} names {name!r}, which can never be forwarded")
        if name in ChatCompletionRequest.model_fields:
            raise ValueError(f"{where} names {name!r}, which the gateway models itself")


class ApiKeyConfig(BaseModel):
    """One client API key: only its sha256 is configured, never the key itself."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="who holds the key (for operators; the key itself is never stored)")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex sha256 of the key: printf %s KEY | sha256sum")
    # Grants, each `MODEL`, `MODEL@VARIANT` or with `*` for either part; a bare `MODEL` means
    # `MODEL@*`. `*` never matches the `none` variant (no safety prompt): it is granted only by
    # naming it (`MODEL@none` or `*@none`).
    models: list[str] = Field(default_factory=lambda: ["*"])
    # Per-minute allowances (gateway.admission), None = unlimited. Tokens are prompt + completion as
    # vLLM counts them, charged when a request ends. Per gateway process: divide by --workers.
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    # Requests of this key in flight at once (queued included); beyond: 429 with Retry-After. Keeps one
    # key from filling the gateway's whole concurrency cap. Per process, like the rates.
    max_concurrent_requests: int | None = Field(default=None, gt=0)
    # Unmodelled request fields this key may send beyond the model's allowed_extra_fields (e.g.
    # logit_bias for an evaluation team); never one that moves or removes the safety prompt.
    allowed_extra_fields: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fields(self) -> ApiKeyConfig:
        check_enableable_fields(self.allowed_extra_fields, f"api_keys[{self.name}].allowed_extra_fields")
        return self


class AuditSettings(BaseModel):
    """The sampled audit of live refusal verdicts by a model judge (gateway.audit), off the hot path."""

    model_config = ConfigDict(extra="forbid")

    judge: ModelJudgeSettings = Field(description="the model judge: an OpenAI-compatible server and how to ask it")
    # Share of finished answers (status 200, no error) re-judged, drawn when the request is accepted.
    sample_rate: float = Field(default=0.05, gt=0.0, le=1.0)
    # Answers waiting for the audit (queued or being judged); beyond it new samples are dropped
    # and counted (reason `queue_full`): a slow judge never makes the gateway hold more.
    max_pending: int = Field(default=256, ge=1)
    concurrency: int = Field(default=4, ge=1, description="calls in flight to the judge at once")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_nested_delimiter="__",
        extra="forbid",
        protected_namespaces=(),
    )

    upstream_urls: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:8001"],
        description="vLLM OpenAI servers; requests are balanced round-robin over the healthy ones",
    )
    upstream_api_key: SecretStr | None = None
    # Client API keys (gateway.auth). With none here nor in the file, the gateway is open to every
    # caller, for every variant (`make serve` on loopback); compose and Kubernetes must set keys.
    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    api_keys_file: Path | None = Field(default=None, description="YAML list of api_keys entries, read at startup")
    # Refuse to start without a client API key. Compose and Kubernetes set it: there an open gateway
    # on a published port is a misconfiguration, never a default.
    require_api_keys: bool = False
    # sha256 of the bearer token /metrics requires, and /ready requires for its details (upstream
    # URLs and errors, models; without it only the status): for Prometheus and operators, not
    # clients. None = both open, as a loopback `make serve` needs. printf %s TOKEN | sha256sum
    metrics_token_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Longest wait for vLLM's next bytes once the request is sent: for the headers, for a whole
    # answer, and for each read of a stream (timed while the gateway waits on vLLM, not while it
    # writes to a slow client, which client_write_timeout_s bounds).
    read_timeout_s: float = Field(default=300.0, gt=0)
    health_interval_s: float = 5.0
    # Ejection (gateway.upstream): a connection failure, or eject_after_5xx 5xx answers in a row, takes
    # an upstream out for eject_base_s, doubling with each ejection in a row up to eject_max_s; its
    # health probe cannot bring it back before. A successful answer resets the doubling.
    eject_base_s: float = Field(default=1.0, gt=0)
    eject_max_s: float = Field(default=30.0, gt=0)
    eject_after_5xx: int = Field(default=5, ge=1)
    # Deadlines (None: off). first_byte_timeout_s: from the request to vLLM until the first event
    # of a stream (a non-streaming answer's first byte is the whole answer: request_timeout_s bounds
    # it); request_timeout_s: from acceptance to the end of the answer, streams included;
    # client_write_timeout_s: how long one write to a streaming client may wait for the client to
    # read before the stream is cut (a slow reader holds a vLLM request and a pooled connection).
    first_byte_timeout_s: float | None = Field(default=120.0, gt=0)
    request_timeout_s: float | None = Field(default=900.0, gt=0)
    client_write_timeout_s: float | None = Field(default=30.0, gt=0)
    models: list[ModelConfig] = Field(default_factory=list)
    # What happens to a client's own system message when a safety prompt is applied:
    # prepend: the safety prompt first, the client's text after it, in one system message (default);
    # replace: the client's system message is dropped; reject: 400.
    system_message_policy: Literal["prepend", "replace", "reject"] = "prepend"
    judge: str = DEFAULT_JUDGE
    # A model judge re-judging a random sample of answers in the background (docs/metrics.md,
    # "Auditing live verdicts with a model judge"); None: no audit, nothing extra kept per request.
    audit_judge: AuditSettings | None = None
    log_prompts: bool = False
    max_request_bytes: int = 4 * 1024 * 1024
    # Cheap requests must not cost much: messages per request, nesting depth of the JSON body (orjson
    # refuses to serialise past 255 levels, so deeper bodies could never be forwarded), and the
    # tokens one request may ask vLLM to generate, n x max_tokens (when max_tokens is unset, vLLM
    # bounds each choice by the model's context length).
    max_messages: int = Field(default=2048, ge=1)
    max_json_depth: int = Field(default=64, ge=8, le=200)
    max_generated_tokens: int = Field(default=65536, ge=1)
    # With logprobs, each generated token carries 1 + top_logprobs entries in the answer:
    # n x max_tokens x (1 + top_logprobs) above this is refused (n=16, 2,000 tokens and
    # top_logprobs=20 made a 43 MiB answer).
    max_logprob_entries: int = Field(default=262144, ge=1)
    # A non-streaming answer larger than this (bytes) is not relayed: 502 (n=16 with top_logprobs=20
    # makes tens of MiB, all held in memory and re-serialised).
    max_response_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_n: int = 16
    # Concurrency cap (gateway.admission): requests talking to vLLM at once, how many more may wait
    # for a slot and for how long; beyond that 503 `overloaded` with Retry-After. Per process.
    max_concurrent_requests: int = Field(default=256, ge=1)
    max_queued_requests: int = Field(default=1024, ge=0)
    queue_timeout_s: float = Field(default=30.0, gt=0)
    # Per-request `seed`: safe with the project's vLLM command (chunked prefill off); set to
    # "reject" when the upstream is a vLLM CPU build with chunked prefill on (it crashes on seeds).
    seed_policy: Literal["pass", "reject"] = "pass"

    @field_validator("upstream_urls")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one upstream URL is required")
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"upstream URL {url!r} must start with http:// or https://")
        return [url.rstrip("/") for url in value]

    @model_validator(mode="after")
    def _unique_models(self) -> Settings:
        names = [model.name for model in self.models]
        if len(names) != len(set(names)):
            raise ValueError(f"duplicate model names in {names}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("GATEWAY_CONFIG")
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"GATEWAY_CONFIG={config_file} does not exist")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)
