"""What the soft prompt does to answers: greedy answers of a few training queries before and after.

The probes see one hidden state per query; they cannot see that a prompt made the model terse or
preachy (the failure the first Qwen run showed). So the optimize stage also decodes a handful of
harmful and harmless training queries greedily under θ0 (the initial prompt) and under the trained θ,
with the trainer's own spliced forward (`trainer.model.greedy_generate`, the path that is token-
identical to vLLM), and records their length in words and whether they finished (eos before the
token limit); `check_answers` picks the queries and records both. `trainer.health.answer_health` turns that
into figures and warnings.
Knows nothing about files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.chat import build_spliced_batch, embed_spliced_batch
from trainer.model import FrozenChatModel, greedy_generate


@dataclass(frozen=True)
class Answer:
    query: str
    text: str
    finished: bool  # ended with eos before max_new_tokens

    @property
    def words(self) -> int:
        return len(self.text.split())

    def to_json(self) -> dict:
        return {"query": self.query, "text": self.text, "finished": self.finished, "words": self.words}


def eos_ids(frozen: FrozenChatModel) -> set[int]:
    configured = getattr(frozen.model.generation_config, "eos_token_id", None)
    listed = configured if isinstance(configured, list) else [configured]
    return {i for i in (frozen.tokenizer.eos_token_id, *listed) if i is not None}


def greedy_answers(frozen: FrozenChatModel, soft_prompt: torch.Tensor, queries: list[str],
                   max_new_tokens: int) -> list[Answer]:
    """Greedy answers under θ [N, hidden] for each query (one unpadded sequence each)."""
    stop = eos_ids(frozen)
    answers = []
    for query in queries:
        batch = build_spliced_batch(frozen.tokenizer, frozen.sentinel_id, [query], soft_prompt.shape[0], frozen.pad_id)
        with torch.no_grad():
            embeds = embed_spliced_batch(frozen.embedding(), batch, soft_prompt)
        tokens = greedy_generate(frozen.model, embeds, max_new_tokens, stop)
        finished = bool(tokens) and tokens[-1] in stop
        text = frozen.tokenizer.decode([t for t in tokens if t not in stop], skip_special_tokens=True).strip()
        answers.append(Answer(query, text, finished))
    return answers


def check_answers(frozen: FrozenChatModel, init: torch.Tensor, trained: torch.Tensor, queries: list[str],
                  harmless: list[float], per_class: int, max_new_tokens: int) -> dict:
    """Greedy answers of the first `per_class` harmful and harmless training queries under θ0 and θ
    ([N, hidden] each); {} when per_class is 0. The dict is what optimize.json records as 'answers'."""
    if per_class == 0:
        return {}
    chosen = ([i for i, h in enumerate(harmless) if h < 0.5][:per_class]
              + [i for i, h in enumerate(harmless) if h >= 0.5][:per_class])
    picked = [queries[i] for i in chosen]
    return {"harmless": [harmless[i] >= 0.5 for i in chosen], "max_new_tokens": max_new_tokens,
            "init": [a.to_json() for a in greedy_answers(frozen, init, picked, max_new_tokens)],
            "trained": [a.to_json() for a in greedy_answers(frozen, trained, picked, max_new_tokens)]}
