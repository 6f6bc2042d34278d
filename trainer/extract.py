"""Extract stage: h(x, S) for every (condition, query), batched.

`extract_states` runs batches through the frozen model (each batch's shared prefix once, then the
rows' own tokens packed; trainer.model) and returns float32 states [num_conditions, num_queries,
hidden] in the order of the conditions given. Condition `none` means no system message (the model's
template may then insert its own default; that is the model's behaviour, as in the paper).
`extract_states_per_query` is the authors' loop (one forward per
query, no padding) for the benchmark and the padding test.

Knows nothing about labels, probes or files.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from safeprompt.prompts import HUMAN_PROMPTS
from trainer.chat import chat_batch, render_ids
from trainer.model import FrozenChatModel, last_prompt_states


def system_text(condition: str) -> str | None:
    """The system message of a prompt condition: None for `none`, else the human prompt text."""
    if condition == "none":
        return None
    try:
        return HUMAN_PROMPTS[condition]
    except KeyError:
        raise ValueError(f"unknown prompt condition {condition!r}; known: none, {', '.join(HUMAN_PROMPTS)}") from None


@torch.no_grad()
def extract_condition_states(frozen: FrozenChatModel, system: str | None, queries: list[str],
                             batch_size: int, progress: tqdm | None = None) -> torch.Tensor:
    """States of `queries` under one system message -> [num_queries, hidden] float32."""
    chunks = []
    for start in range(0, len(queries), batch_size):
        ids, mask, lengths = chat_batch(frozen.tokenizer, system, queries[start:start + batch_size], frozen.pad_id)
        chunks.append(last_prompt_states(frozen.model, mask, lengths, input_ids=ids).float().cpu())
        if progress is not None:
            progress.update(len(lengths))
    states = torch.cat(chunks)
    assert states.shape == (len(queries), frozen.hidden_size) and states.dtype == torch.float32
    return states


def extract_states(frozen: FrozenChatModel, conditions: tuple[str, ...] | list[str], queries: list[str],
                   batch_size: int = 64, show_progress: bool = True) -> torch.Tensor:
    """[num_conditions, num_queries, hidden] float32 states, condition-major."""
    if not queries:
        raise ValueError("no queries to extract")
    with tqdm(total=len(conditions) * len(queries), desc="extract", unit="query",
              disable=not show_progress) as bar:
        states = torch.stack([extract_condition_states(frozen, system_text(c), queries, batch_size, bar)
                              for c in conditions])
    assert torch.isfinite(states).all(), "non-finite hidden states"
    return states


@torch.no_grad()
def extract_states_per_query(frozen: FrozenChatModel, conditions: list[str], queries: list[str]) -> torch.Tensor:
    """Reference loop like the authors' forward.py: one unpadded forward per (condition, query)."""
    out = torch.empty(len(conditions), len(queries), frozen.hidden_size)
    for c, condition in enumerate(conditions):
        for q, query in enumerate(queries):
            ids = torch.tensor([render_ids(frozen.tokenizer, system_text(condition), query)], device=frozen.device)
            output = frozen.model(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
            out[c, q] = output.hidden_states[-1][0, -1].float()
    return out
