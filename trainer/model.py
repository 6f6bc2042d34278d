"""Loading a frozen Hugging Face chat model and reading DRO's representation from it.

The representation h(x, S) is the paper's: the last element of HF `output_hidden_states` (the final
decoder layer's output after the final norm) at the last prompt token, i.e. the end of the
generation prompt (authors' `forward.py`, `train.py:214`). Batches are right-padded and read at
`lengths - 1`, so padding never changes a state.

Every row of a batch starts with the same tokens: the chat template's opening and the system prompt
(the soft prompt θ when training, a human prompt when extracting), often 100+ tokens of a 130-token row.
`last_prompt_states` runs that shared prefix once, repeats its key/value cache across the batch and runs
only each row's own tokens on top; with causal attention and right padding this is the same arithmetic
as running every row whole (states and gradients equal to float rounding; tests/trainer), and the
gradient reaches θ through the cache.

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
                       share_prefix: bool = True) -> torch.Tensor:
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
    prefix = (shared_prefix_length(attention_mask, lengths, input_ids=input_ids, inputs_embeds=inputs_embeds)
              if share_prefix else 0)
    if prefix == 0:
        final = decoder(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        use_cache=False).last_hidden_state  # [B, T, H], after the final norm
    else:
        from transformers import DynamicCache

        def part(tensor: torch.Tensor | None, rows: slice, columns: slice) -> torch.Tensor | None:
            return None if tensor is None else tensor[rows, columns]

        cache = DynamicCache(config=model.config)
        head = slice(0, prefix)
        decoder(input_ids=part(input_ids, slice(0, 1), head), inputs_embeds=part(inputs_embeds, slice(0, 1), head),
                attention_mask=attention_mask[:1, head], past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(attention_mask.shape[0])
        rest = slice(prefix, None)
        final = decoder(input_ids=part(input_ids, slice(None), rest), inputs_embeds=part(inputs_embeds, slice(None), rest),
                        attention_mask=attention_mask, past_key_values=cache, use_cache=True).last_hidden_state
        lengths = lengths - prefix  # positions within the rows' own tokens
    rows = torch.arange(final.shape[0], device=device)
    states = final[rows, lengths - 1]
    assert states.shape == (final.shape[0], final.shape[-1])
    return states


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
