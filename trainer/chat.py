"""Chat rendering and the soft-prompt splice, exactly as vLLM serves a `prompt_embeds` system message.

vLLM renders the model's chat template with the system content set to the special sentinel token
`<prompt_embeds>`, tokenises, and replaces that one token by the N soft-prompt rows. This module
does the same on the Hugging Face side, so that what the trainer optimises is what the gateway
serves:

- `prepare_tokenizer_for_splice` registers the sentinel as an additional special token (the model
  is never resized: the sentinel id is only ever replaced, never embedded);
- `render_ids(tokenizer, system, query)` is the token ids of one chat (no system message when
  `system` is None, the paper's `none` condition);
- `find_prompt_span` diffs the text-prompt rendering against the sentinel rendering and returns the
  human prompt's token ids *as tokenised in context* (the soft prompt's initialisation);
- `build_spliced_batch` expands the sentinel into N placeholder positions, right-pads, and returns
  ids, attention mask, placeholder mask and lengths; `embed_spliced_batch` overwrites the
  placeholders with θ (differentiable in θ).

It knows nothing about DRO losses, labels or files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SENTINEL = "<prompt_embeds>"


class ChatTemplateError(ValueError):
    """The tokenizer cannot render chats the way vLLM will (no template, sentinel not isolated...)."""


def prepare_tokenizer_for_splice(tokenizer):
    """Register `<prompt_embeds>` as an additional special token, as vLLM does; return its id.

    Raises ChatTemplateError when the tokenizer has no chat template (the soft prompt's place is
    defined by the template) or when the sentinel does not encode to exactly one id.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template: DRO places the "
            "soft prompt in the system message of the model's own chat template, so a chat model is required"
        )
    if SENTINEL not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [SENTINEL]})
    ids = tokenizer.encode(SENTINEL, add_special_tokens=False)
    if len(ids) != 1:
        raise ChatTemplateError(f"{SENTINEL} encodes to {len(ids)} ids {ids}, expected one special token")
    return ids[0]


def render_ids(tokenizer, system: str | None, query: str) -> list[int]:
    """Token ids of `[system?, user: query]` with the generation prompt, as vLLM renders them.

    The text is rendered first and then encoded without extra special tokens, which is what
    `apply_chat_template(tokenize=True)` does; a template that emits BOS keeps it.
    """
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": query})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def sentinel_position(ids: list[int], sentinel_id: int) -> int:
    positions = [i for i, token in enumerate(ids) if token == sentinel_id]
    if len(positions) != 1:
        raise ChatTemplateError(f"expected exactly one {SENTINEL} in the rendered chat, found {len(positions)}")
    return positions[0]


def find_prompt_span(tokenizer, sentinel_id: int, prompt_text: str | None, query: str) -> list[int]:
    """The ids the system prompt occupies in context: text rendering minus sentinel rendering.

    `prompt_text` None means the chat has no system message: the span is then the default system
    prompt the model's own template inserts (Qwen2.5: "You are Qwen, created by Alibaba Cloud...");
    a template that inserts none has no such span (ChatTemplateError).
    Checks that both renderings share the prefix before the sentinel and the suffix after it, so
    the span is exactly where vLLM will put the soft prompt.
    """
    with_text = render_ids(tokenizer, prompt_text, query)
    with_sentinel = render_ids(tokenizer, SENTINEL, query)
    position = sentinel_position(with_sentinel, sentinel_id)
    suffix_len = len(with_sentinel) - position - 1
    span_end = len(with_text) - suffix_len
    if (with_text[:position] != with_sentinel[:position]
            or with_text[span_end:] != with_sentinel[position + 1:] or span_end <= position):
        if prompt_text is None:
            raise ChatTemplateError(
                "the chat template inserts no default system prompt of its own (without a system message "
                "it renders no system block), so there is nothing to initialise from: choose a human prompt")
        raise ChatTemplateError(
            "the chat template tokenises the text system prompt and the sentinel with different "
            "surroundings; the soft prompt cannot be initialised from the prompt's in-context tokens")
    return with_text[position:span_end]


@dataclass(frozen=True)
class SplicedBatch:
    """Right-padded ids with the sentinel expanded to N placeholders.

    input_ids [batch, seq] int64 (placeholders hold the pad id), attention_mask [batch, seq] int64,
    placeholder_mask [batch, seq] bool (exactly N True per row, in order), lengths [batch] int64.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    placeholder_mask: torch.Tensor
    lengths: torch.Tensor


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad id lists -> (ids [B, T] int64, attention_mask [B, T] int64, lengths [B] int64).

    Right padding keeps every real token at its unpadded position; with causal attention no real
    token sees a pad, so the state at `lengths - 1` equals the unpadded one.
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pad_right needs non-empty sequences")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    return ids, mask, lengths


def build_spliced_batch(tokenizer, sentinel_id: int, queries: list[str], num_virtual_tokens: int,
                        pad_id: int) -> SplicedBatch:
    """Render each query with the sentinel system message and expand the sentinel to N slots."""
    sequences: list[list[int]] = []
    slots: list[list[bool]] = []
    for query in queries:
        ids = render_ids(tokenizer, SENTINEL, query)
        position = sentinel_position(ids, sentinel_id)
        sequences.append(ids[:position] + [pad_id] * num_virtual_tokens + ids[position + 1:])
        slots.append([False] * position + [True] * num_virtual_tokens + [False] * (len(ids) - position - 1))
    input_ids, attention_mask, lengths = pad_right(sequences, pad_id)
    placeholder_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, flags in enumerate(slots):
        placeholder_mask[row, : len(flags)] = torch.tensor(flags)
    return SplicedBatch(input_ids, attention_mask, placeholder_mask, lengths)


def embed_spliced_batch(embedding: torch.nn.Module, batch: SplicedBatch, soft_prompt: torch.Tensor) -> torch.Tensor:
    """Token embeddings with the placeholders overwritten by θ -> [batch, seq, hidden].

    soft_prompt: [N, hidden], any float dtype (cast to the embedding dtype; gradients flow to θ).
    """
    device = embedding.weight.device
    embeds = embedding(batch.input_ids.to(device))  # [B, T, H]
    rows, hidden = soft_prompt.shape
    assert hidden == embeds.shape[-1], f"soft prompt hidden {hidden} != model hidden {embeds.shape[-1]}"
    assert int(batch.placeholder_mask.sum()) == rows * embeds.shape[0], "placeholder count != N per row"
    source = soft_prompt.to(device=device, dtype=embeds.dtype).unsqueeze(0).expand(embeds.shape[0], rows, hidden)
    return embeds.masked_scatter(batch.placeholder_mask.to(device).unsqueeze(-1), source)


def chat_batch(tokenizer, system: str | None, queries: list[str], pad_id: int):
    """Right-padded text-prompt chats -> (ids [B, T], attention_mask [B, T], lengths [B])."""
    return pad_right([render_ids(tokenizer, system, q) for q in queries], pad_id)
