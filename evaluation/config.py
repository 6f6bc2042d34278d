"""The evaluation run's one typed config, validated up front, and its generation fingerprint.

`EvalConfig` holds everything a run needs; `fingerprint()` is the subset that decides what the
model generates (a run directory's cached answers are valid only under the same fingerprint).
This module knows nothing about HTTP or metrics.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from safeprompt.judge import DEFAULT_JUDGE

from evaluation.querysets import DEFAULT_DATA_DIR

Mode = Literal["gateway", "direct"]
GREEDY = "greedy"  # the sample key of the one temperature-0 answer per query


class ConfigError(ValueError):
    """An invalid combination of settings."""


@dataclass(frozen=True)
class GuardSettings:
    """An optional Llama-Guard-style harm judge served behind an OpenAI-compatible endpoint."""

    base_url: str
    model: str
    api_key: str = "EMPTY"
    max_tokens: int = 10


@dataclass(frozen=True)
class EvalConfig:
    base_url: str
    model: str
    run_dir: Path
    variants: tuple[str, ...] = ("all",)
    mode: Mode = "gateway"
    artifacts: dict[str, Path] = field(default_factory=dict)
    sets: tuple[str, ...] = ("advbench", "jbb_benign")
    custom_sets: tuple[str, ...] = ()
    limit: int | None = None
    greedy: bool = True
    samples: int = 0
    keep: int | None = None
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50
    min_tokens: int = 10
    max_tokens_harmful: int = 300
    max_tokens_harmless: int = 200
    seed: int = 0
    judge: str = DEFAULT_JUDGE  # the gateway's default, so dashboard and evaluation figures agree
    guard: GuardSettings | None = None
    api_key: str = "EMPTY"
    concurrency: int = 4
    timeout_s: float = 600.0
    max_requests: int | None = None
    data_dir: Path = DEFAULT_DATA_DIR
    chart: bool = True
    # Greedy answers only feed refusal verdicts: stream them and stop once every judge's window
    # is closed (the verdict can no longer change). Sampled answers are always generated in full
    # (the paper metric ranks them by length and the harm judge reads them whole).
    stop_greedy_when_judged: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("gateway", "direct"):
            raise ConfigError(f"mode must be 'gateway' or 'direct', got {self.mode!r}")
        if self.mode == "gateway" and self.artifacts:
            raise ConfigError("--artifact is for --mode direct; the gateway serves its own artifacts")
        if not self.variants:
            raise ConfigError("no variants given")
        if self.mode == "direct" and "all" in self.variants:
            raise ConfigError("--variants all needs the gateway's model list; name the variants in direct mode")
        if not self.sets and not self.custom_sets:
            raise ConfigError("no query sets given")
        if not self.greedy and self.samples <= 0:
            raise ConfigError("nothing to do: --no-greedy and --samples 0")
        if self.samples < 0:
            raise ConfigError(f"--samples must be >= 0, got {self.samples}")
        if self.keep is not None and not 0 < self.keep <= max(self.samples, 1):
            raise ConfigError(f"--keep must be in [1, --samples={self.samples}], got {self.keep}")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"--limit must be positive, got {self.limit}")
        if self.concurrency <= 0:
            raise ConfigError(f"--concurrency must be positive, got {self.concurrency}")
        if self.max_requests is not None and self.max_requests < 0:
            raise ConfigError(f"--max-requests must be >= 0, got {self.max_requests}")
        for name, value in (("--max-tokens-harmful", self.max_tokens_harmful),
                            ("--max-tokens-harmless", self.max_tokens_harmless)):
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.samples and not 0 <= self.min_tokens <= min(self.max_tokens_harmful, self.max_tokens_harmless):
            raise ConfigError(f"--min-tokens {self.min_tokens} must be in [0, the smaller --max-tokens-*]")
        if not 0 < self.top_p <= 1 or self.temperature < 0:
            raise ConfigError("need 0 < top_p <= 1 and temperature >= 0")

    @property
    def kept_samples(self) -> int:
        """How many of the k samples the paper metric keeps (the longest); all when unset."""
        return self.keep if self.keep is not None else self.samples

    def max_tokens(self, kind: str) -> int:
        return self.max_tokens_harmful if kind == "harmful" else self.max_tokens_harmless

    def fingerprint(self) -> dict:
        """Settings that change what the model generates; a run directory is bound to them.
        The URL is not one of them: the same stack may come back on another port."""
        return {
            "model": self.model, "mode": self.mode,
            "artifacts": {name: str(path) for name, path in sorted(self.artifacts.items())},
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_tokens": self.min_tokens, "max_tokens_harmful": self.max_tokens_harmful,
            "stop_greedy_when_judged": self.stop_greedy_when_judged,
            "max_tokens_harmless": self.max_tokens_harmless, "seed": self.seed,
        }

    def public_dict(self) -> dict:
        """The config as JSON-able data, secrets removed."""
        data = asdict(self)
        data.pop("api_key")
        if data.get("guard"):
            data["guard"].pop("api_key")
        return {key: (str(value) if isinstance(value, Path) else value) for key, value in data.items()
                if key != "artifacts"} | {"artifacts": {k: str(v) for k, v in self.artifacts.items()}}


def sample_seed(seed: int, set_name: str, query_index: int, sample: int) -> int:
    """Per-request sampling seed: the same for every variant (common random numbers across
    variants), different for every (set, query, sample)."""
    digest = hashlib.sha256(f"{seed}:{set_name}:{query_index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
