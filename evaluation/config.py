"""The evaluation run's one typed config, validated up front, and its generation fingerprint.

`EvalConfig` (pydantic, unknown fields refused, frozen) holds everything a run needs; the CLI
(`evaluation/__main__.py`) only builds it. Its sampling fields carry the paper's defaults and
checks from `safeprompt.sampling` (the trainer's labels use the same), and `sampling` is them as
one `Sampling`. `fingerprint()` is the subset that decides what the model generates (a run
directory's cached answers are valid only under the same fingerprint). `derive_seed` is the one
way the harness turns names into seeds (per-request sampling seeds, bootstrap seeds).
This module knows nothing about HTTP or metrics.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from safeprompt.judge import DEFAULT_JUDGE
from safeprompt.judge.model_judge import ModelJudgeSettings
from safeprompt.sampling import PAPER_SAMPLING, MaxTokens, MinTokens, Sampling, Temperature, TopP

from evaluation.querysets import DEFAULT_DATA_DIR

Mode = Literal["gateway", "direct"]
GREEDY = "greedy"  # the sample key of the one temperature-0 answer per query
_STRICT = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ConfigError(ValueError):
    """A command line that cannot become a config (a missing secret, paired flags given alone)."""


# A dataclass, so `GuardSettings(url, model)` reads as the pair it is; validated like the rest.
@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class GuardSettings:
    """An optional Llama-Guard-style harm judge served behind an OpenAI-compatible endpoint."""

    base_url: str
    model: str
    api_key: SecretStr = SecretStr("EMPTY")
    max_tokens: int = Field(default=10, gt=0)


class EvalConfig(BaseModel):
    model_config = _STRICT

    base_url: str
    model: str
    run_dir: Path
    variants: tuple[str, ...] = ("all",)
    mode: Mode = "gateway"
    artifacts: dict[str, Path] = {}
    sets: tuple[str, ...] = ("advbench", "jbb_benign")
    custom_sets: tuple[str, ...] = ()
    limit: int | None = Field(default=None, gt=0)
    greedy: bool = True
    samples: int = Field(default=0, ge=0)
    keep: int | None = None
    temperature: Temperature = PAPER_SAMPLING.temperature
    top_p: TopP = PAPER_SAMPLING.top_p
    top_k: int = PAPER_SAMPLING.top_k
    min_tokens: MinTokens = PAPER_SAMPLING.min_tokens
    max_tokens_harmful: MaxTokens = PAPER_SAMPLING.max_tokens_harmful
    max_tokens_harmless: MaxTokens = PAPER_SAMPLING.max_tokens_harmless
    seed: int = 0
    judge: str = DEFAULT_JUDGE  # the gateway's default, so dashboard and evaluation figures agree
    guard: GuardSettings | None = None
    # An optional refusal judge model: every answer also judged by it, in a second report.
    model_judge: ModelJudgeSettings | None = None
    api_key: SecretStr = SecretStr("EMPTY")
    concurrency: int = Field(default=4, gt=0)
    timeout_s: float = Field(default=600.0, gt=0)
    max_requests: int | None = Field(default=None, ge=0)
    data_dir: Path = DEFAULT_DATA_DIR
    chart: bool = True
    # Greedy answers only feed refusal verdicts: stream them and stop once every judge's window
    # is closed (the verdict can no longer change). Sampled answers are always generated in full
    # (the paper metric ranks them by length and the harm judge reads them whole).
    stop_greedy_when_judged: bool = True

    @model_validator(mode="after")
    def _check_combinations(self) -> "EvalConfig":
        if self.mode == "gateway" and self.artifacts:
            raise ValueError("--artifact is for --mode direct; the gateway serves its own artifacts")
        if not self.variants:
            raise ValueError("no variants given")
        if self.mode == "direct" and "all" in self.variants:
            raise ValueError("--variants all needs the gateway's model list; name the variants in direct mode")
        if not self.sets and not self.custom_sets:
            raise ValueError("no query sets given")
        if not self.greedy and self.samples <= 0:
            raise ValueError("nothing to do: --no-greedy and --samples 0")
        if self.keep is not None and not 0 < self.keep <= max(self.samples, 1):
            raise ValueError(f"--keep must be in [1, --samples={self.samples}], got {self.keep}")
        if self.samples and self.min_tokens > min(self.max_tokens_harmful, self.max_tokens_harmless):
            raise ValueError(f"--min-tokens {self.min_tokens} must be in [0, the smaller --max-tokens-*]")
        if self.model_judge is not None and self.greedy and self.stop_greedy_when_judged:
            raise ValueError("a refusal judge model reads whole answers: greedy answers must not stop early "
                             "(--full-greedy-answers)")
        return self

    @property
    def sampling(self) -> Sampling:
        """The sampled answers' settings (greedy answers use temperature 0 and the max tokens)."""
        return Sampling.of(self)

    @property
    def kept_samples(self) -> int:
        """How many of the k samples the paper metric keeps (the longest); all when unset."""
        return self.keep if self.keep is not None else self.samples

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

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON-able data, secrets removed."""
        secrets = {"api_key": True, "guard": {"api_key"}, "model_judge": {"api_key"}}
        return self.model_dump(mode="json", exclude=secrets)


def derive_seed(*parts: object) -> int:
    """A 32-bit seed from names and numbers: sha256 of `"p0:p1:..."`, first four bytes."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big")


def sample_seed(seed: int, set_name: str, query_index: int, sample: int) -> int:
    """Per-request sampling seed: the same for every variant (common random numbers across
    variants), different for every (set, query, sample). 31 bits: servers read it as a signed int."""
    return derive_seed(seed, set_name, query_index, sample) & 0x7FFFFFFF
