"""Loading a frozen Hugging Face chat model and reading DRO's representation from it.

The representation h(x, S) is the paper's: the last element of HF `output_hidden_states` (the final
decoder layer's output after the final norm) at the last prompt token, i.e. the end of the
generation prompt (authors' `forward.py`, `train.py:214`). Batches are right-padded and read at
`lengths - 1`, so padding never changes a state.

Every row of a batch starts with the same tokens: the chat template's opening and the system prompt
(the soft prompt θ when training, a human prompt when extracting), often 100+ tokens of a 130-token row.
`last_prompt_states` runs that shared prefix once and keeps its key/value cache. The rows' own tokens
(query, end of turn, generation prompt: ~20 a row) are then packed, without padding, into sequences of
at most `PACK_TOKENS`, each run on top of the prefix's cache with a block mask: a token sees the prefix
and the earlier tokens of its own row, at the position it has in its row. That is the same arithmetic
as running every row whole (states and gradients equal to float rounding; tests/trainer, sdpa and eager
attention), the gradient reaches θ through the cache, and the layers see the prefix once plus the
rows' real tokens: for 48 rows of SmolLM2 with `default` 1,076 tokens instead of 6,293 (docs/trainer.md).
Attention implementations that take no custom mask (flash-attention kernels) run whole rows instead.

This module knows nothing about labels, probes or files beyond the model folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.chat import ChatTemplateError, prepare_tokenizer_for_splice


@dataclass
class FrozenChatModel:
    """A frozen causal LM with its tokenizer (sentinel registered) and the pad id used for batching."""

    model: torch.nn.Module
    tokenizer: object
    sentinel_id: int
    pad_id: int

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def embedding(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when a GPU is visible, else cpu; `cuda` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no GPU (torch.cuda.is_available() is False)")
    return torch.device(device)


def load_frozen_model(model_dir: str | Path, dtype: str = "float32", device: str = "cpu") -> FrozenChatModel:
    """Load tokenizer (checked for a chat template first, before any weights) and frozen model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {folder} has no config.json")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sentinel_id = prepare_tokenizer_for_splice(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    model.to(resolve_device(device))
    model.eval()
    model.requires_grad_(False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ChatTemplateError(f"tokenizer of {folder} has neither a pad nor an eos token")
    return FrozenChatModel(model=model, tokenizer=tokenizer, sentinel_id=sentinel_id, pad_id=int(pad_id))


PACKABLE_ATTENTION = ("sdpa", "eager")  # attention implementations that take a custom 4D mask
PACK_TOKENS = 256  # rows' own tokens per packed forward (`pack_rows`; measured in docs/performance.md)


def shared_prefix_length(attention_mask: torch.Tensor, lengths: torch.Tensor, *,
                         input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> int:
    """How many leading positions every row has identical (ids, else embeddings, exactly), leaving each
    row at least its last token of its own; 0 for a batch of one."""
    if attention_mask.shape[0] < 2:
        return 0
    if input_ids is not None:
        same = (input_ids == input_ids[:1]).all(dim=0)
    else:
        assert inputs_embeds is not None
        same = (inputs_embeds == inputs_embeds[:1]).all(dim=-1).all(dim=0)
    same = same & attention_mask.bool().all(dim=0)
    prefix = int(same.long().cumprod(dim=0).sum())
    return max(0, min(prefix, int(lengths.min()) - 1))


def last_prompt_states(model: torch.nn.Module, attention_mask: torch.Tensor, lengths: torch.Tensor, *,
                       input_ids: torch.Tensor | None = None,
                       inputs_embeds: torch.Tensor | None = None,
                       share_prefix: bool = True, pack_tokens: int = PACK_TOKENS) -> torch.Tensor:
    """Final-norm hidden state at the last real token of each right-padded row -> [batch, hidden].

    input_ids [B, T] int64 or inputs_embeds [B, T, H]; attention_mask [B, T]; lengths [B].
    Returned in the model's dtype, on the model's device; callers cast to float32 for statistics.
    With `share_prefix` the rows' common leading tokens are run once (module docstring).
    """
    device = model.get_input_embeddings().weight.device
    input_ids = None if input_ids is None else input_ids.to(device)
    attention_mask, lengths = attention_mask.to(device), lengths.to(device)
    # The decoder stack alone (no LM head): its last_hidden_state is hidden_states[-1] of the full model,
    # after the final norm. Skipping the head is not only less work: torch 2.13's CPU bf16 linear on the
    # head's input slice (`hidden[:, -1:]`, not contiguous) took 47-58 s for a batch of 25 on Qwen's
    # 151,936-row head, against 37-55 ms on a contiguous copy (measured, docs/trainer.md).
    decoder = model.get_decoder()
    if model.config._attn_implementation not in PACKABLE_ATTENTION:
        share_prefix = False  # e.g. flash-attention kernels take no custom mask: run whole rows
    if not share_prefix:
        final = decoder(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        use_cache=False).last_hidden_state  # [B, T, H], after the final norm
        rows = torch.arange(final.shape[0], device=device)
        return final[rows, lengths - 1]
    prefix = shared_prefix_length(attention_mask, lengths, input_ids=input_ids, inputs_embeds=inputs_embeds)
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    if prefix > 0:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        head = slice(0, prefix)
        decoder(input_ids=None if input_ids is None else input_ids[:1, head],
                inputs_embeds=None if inputs_embeds is None else inputs_embeds[:1, head],
                attention_mask=attention_mask[:1, head], past_key_values=cache, use_cache=True)
        prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
    real = attention_mask[:, prefix:].bool()  # each row's own real tokens, after the prefix
    own = real.sum(dim=1).tolist()
    states = []
    for rows in pack_rows(own, pack_tokens):
        states.append(packed_states(model, prefix, prefix_kv, own[rows],
                                    None if input_ids is None else input_ids[rows, prefix:][real[rows]],
                                    None if inputs_embeds is None else inputs_embeds[rows, prefix:][real[rows]]))
    return torch.cat(states)


def pack_rows(own: list[int], pack_tokens: int) -> list[slice]:
    """Consecutive rows grouped so that each group's own tokens stay within `pack_tokens` (a longer row is
    a group of its own). Bounds the packed attention, which is dense over the pack: cost grows with the
    square of its length while the useful part grows linearly."""
    groups, start, total = [], 0, 0
    for row, n in enumerate(own):
        if row > start and total + n > pack_tokens:
            groups.append(slice(start, row))
            start, total = row, 0
        total += n
    groups.append(slice(start, len(own)))
    return groups


def packed_states(model: torch.nn.Module, prefix: int, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]],
                  own: list[int], ids: torch.Tensor | None, embeds: torch.Tensor | None) -> torch.Tensor:
    """States at the last token of rows whose own tokens (ids [N] or embeds [N, H], row after row) follow a
    shared prefix whose key/value cache per layer is `prefix_kv` (empty when there is none) -> [rows, H]."""
    device = model.get_input_embeddings().weight.device
    cache = None
    if prefix_kv:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        for layer, (keys, values) in enumerate(prefix_kv):
            cache.update(keys, values, layer)  # a fresh cache per pack: the forward appends to it
    mask, positions = packed_attention(own, prefix, device)
    if model.config._attn_implementation == "eager":  # eager attention adds its mask to the scores
        dtype = model.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    final = model.get_decoder()(input_ids=None if ids is None else ids[None],
                                inputs_embeds=None if embeds is None else embeds[None], attention_mask=mask,
                                position_ids=positions, past_key_values=cache,
                                use_cache=cache is not None).last_hidden_state[0]  # [N, H]
    ends = torch.tensor(own, device=device).cumsum(0) - 1
    assert final.shape[0] == sum(own)
    return final[ends]


def packed_attention(own: list[int], prefix: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4D mask [1, 1, N, prefix + N] (True = attend) and position ids [1, N] of rows' own tokens packed
    into one sequence of N = sum(own) after a shared prefix: every token sees the whole prefix and the
    earlier tokens of its own row only, at the position it has in its row."""
    segment = torch.repeat_interleave(torch.arange(len(own), device=device), torch.tensor(own, device=device))
    starts = torch.tensor([0, *own[:-1]], device=device).cumsum(0)
    offset = torch.arange(segment.shape[0], device=device) - starts[segment]  # position within the row's own tokens
    causal = offset[:, None] >= offset[None, :]
    own_block = (segment[:, None] == segment[None, :]) & causal
    mask = torch.cat([torch.ones(segment.shape[0], prefix, dtype=torch.bool, device=device), own_block], dim=1)
    return mask[None, None], (prefix + offset)[None]


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, inputs_embeds: torch.Tensor, max_new_tokens: int,
                    eos_token_ids: set[int]) -> list[int]:
    """Greedy decoding from one prompt given as embeddings [1, T, H]; returns the new token ids.

    The trainer's own forward, with a KV cache: the check that what is trained is what vLLM serves.
    """
    assert inputs_embeds.ndim == 3 and inputs_embeds.shape[0] == 1, inputs_embeds.shape
    output = model(inputs_embeds=inputs_embeds, use_cache=True, logits_to_keep=1)
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        token = int(output.logits[0, -1].argmax())
        tokens.append(token)
        if token in eos_token_ids:
            break
        output = model(input_ids=torch.tensor([[token]], device=inputs_embeds.device), past_key_values=output.past_key_values,
                       use_cache=True, logits_to_keep=1)
    return tokens
