"""The DRO paper's sampling recipe as one typed model: what a sampled answer is drawn with.

`Sampling` holds the per-request settings (authors' `generate.py`: temperature 1.0, top_p 0.9,
top_k 50, at least 10 and at most 300 new tokens for a harmful query, 200 for a harmless one);
its defaults are the paper's, written here and nowhere else. `request_fields` turns it into the
fields of an OpenAI-compatible `/v1/chat/completions` body (vLLM's `top_k` and `min_tokens`
included), so the trainer's labels and the evaluation's samples ask vLLM for the same thing.
`PAPER_NUM_SAMPLES` and `PAPER_NUM_KEEP` are the paper's "25 samples, the 20 longest judged".

The constrained types (`Temperature`, `TopP`, ...) let a config that must keep its own flat field
names (the trainer's `label.min_new_tokens`, the evaluation's `--min-tokens`) carry the same
checks and defaults; `Sampling.of(config)` reads them back as one model. Knows nothing about HTTP, judges or models.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

Temperature = Annotated[float, Field(ge=0)]
TopP = Annotated[float, Field(gt=0, le=1)]
MinTokens = Annotated[int, Field(ge=0)]
MaxTokens = Annotated[int, Field(gt=0)]

PAPER_NUM_SAMPLES = 25
PAPER_NUM_KEEP = 20


class Sampling(BaseModel):
    """One sampled answer's settings; the defaults are the paper's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: Temperature = 1.0
    top_p: TopP = 0.9
    top_k: int = 50
    # Also read under Hugging Face's names (`min_new_tokens`, ...), which the trainer's config uses.
    min_tokens: MinTokens = Field(default=10, validation_alias=AliasChoices("min_tokens", "min_new_tokens"))
    max_tokens_harmful: MaxTokens = Field(
        default=300, validation_alias=AliasChoices("max_tokens_harmful", "max_new_tokens_harmful")
    )
    max_tokens_harmless: MaxTokens = Field(
        default=200, validation_alias=AliasChoices("max_tokens_harmless", "max_new_tokens_harmless")
    )

    @classmethod
    def of(cls, config: object) -> Sampling:
        """The sampling fields of a config that carries them flat (under either naming)."""
        return cls.model_validate(config, from_attributes=True)

    def max_tokens(self, harmless: bool) -> int:
        return self.max_tokens_harmless if harmless else self.max_tokens_harmful

    def request_fields(self, *, harmless: bool, seed: int) -> dict[str, Any]:
        """The sampling fields of one `/v1/chat/completions` body, seeded."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_tokens": self.min_tokens,
            "max_tokens": self.max_tokens(harmless),
            "seed": seed,
        }


PAPER_SAMPLING = Sampling()
