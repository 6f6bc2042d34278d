"""The splice sits where vLLM puts a prompt_embeds system message; extraction is padding-exact."""

from __future__ import annotations

import pytest
import torch

from safeprompt.prompts import HUMAN_PROMPTS
from trainer.chat import SENTINEL, ChatTemplateError, find_prompt_span, prepare_tokenizer_for_splice, render_ids
from trainer.extract import extract_states, extract_states_per_query
from trainer.model import last_prompt_states
from trainer.chat import chat_batch
from trainer.optimize import soft_prompt_states


def test_sentinel_is_one_special_token_and_the_model_is_not_resized(frozen, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    assert frozen.tokenizer.encode(SENTINEL, add_special_tokens=False) == [frozen.sentinel_id]
    # The weights as saved, loaded without the trainer: the trainer's embedding and head are the same
    # matrices (a resize would add rows, or re-initialise them). config.vocab_size cannot tell: a resize
    # updates it too.
    saved = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for ours, theirs in ((frozen.embedding().weight, saved.get_input_embeddings().weight),
                         (frozen.model.get_output_embeddings().weight, saved.get_output_embeddings().weight)):
        assert ours.shape == theirs.shape and torch.equal(ours, theirs)
    # The sentinel is a new id beyond the embedding matrix: it is only ever overwritten by θ, never embedded.
    assert frozen.sentinel_id >= saved.get_input_embeddings().weight.shape[0]


@pytest.mark.parametrize("name", sorted(HUMAN_PROMPTS))
def test_prompt_span_is_the_prompt_tokenised_in_context(frozen, name):
    tok = frozen.tokenizer
    span = find_prompt_span(tok, frozen.sentinel_id, HUMAN_PROMPTS[name], "How do I bake bread?")
    assert tok.decode(span) == HUMAN_PROMPTS[name]
    with_text = render_ids(tok, HUMAN_PROMPTS[name], "How do I bake bread?")
    with_sentinel = render_ids(tok, SENTINEL, "How do I bake bread?")
    p = with_sentinel.index(frozen.sentinel_id)
    assert with_text == with_sentinel[:p] + span + with_sentinel[p + 1:]


def test_splicing_the_prompt_embeddings_reproduces_the_text_prompt_states(frozen, queries):
    qs, _ = queries
    prompt = HUMAN_PROMPTS["short"]
    span = find_prompt_span(frozen.tokenizer, frozen.sentinel_id, prompt, qs[0])
    theta = frozen.embedding().weight[span].detach()
    with torch.no_grad():
        spliced = soft_prompt_states(frozen, theta, qs)
        ids, mask, lengths = chat_batch(frozen.tokenizer, prompt, qs, frozen.pad_id)
        text = last_prompt_states(frozen.model, mask, lengths, input_ids=ids)
    assert spliced.shape == (len(qs), frozen.hidden_size) and spliced.dtype == torch.float32
    torch.testing.assert_close(spliced, text, rtol=0, atol=1e-5)


def test_batched_extraction_equals_the_per_query_loop(frozen, queries):
    qs, _ = queries
    conditions = ["none", "short"]
    batched = extract_states(frozen, conditions, qs, batch_size=3, show_progress=False)
    assert batched.shape == (2, len(qs), frozen.hidden_size) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, extract_states_per_query(frozen, conditions, qs), rtol=0, atol=1e-5)
    # The conditions really differ (the system message reaches the representation).
    assert (batched[0] - batched[1]).abs().max() > 1e-3


def test_tokenizer_without_chat_template_is_refused(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        prepare_tokenizer_for_splice(tok)


def test_unknown_condition_is_a_clear_error(frozen):
    with pytest.raises(ValueError, match="unknown prompt condition"):
        extract_states(frozen, ["loud"], ["hi"], show_progress=False)


def test_template_default_span_is_the_system_prompt_the_template_inserts(frozen):
    # SmolLM2's template inserts its own system prompt when a chat has none: that is the `none`
    # condition, and `template_default` initialises θ from exactly those in-context tokens.
    tok = frozen.tokenizer
    span = find_prompt_span(tok, frozen.sentinel_id, None, "How do I bake bread?")
    assert tok.decode(span).startswith("You are a helpful AI assistant named SmolLM")
    with_sentinel = render_ids(tok, SENTINEL, "How do I bake bread?")
    p = with_sentinel.index(frozen.sentinel_id)
    assert render_ids(tok, None, "How do I bake bread?") == with_sentinel[:p] + span + with_sentinel[p + 1:]


def test_template_without_a_default_system_prompt_has_no_template_default_span(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    sentinel_id = prepare_tokenizer_for_splice(tok)
    with pytest.raises(ChatTemplateError, match="no default system prompt"):
        find_prompt_span(tok, sentinel_id, None, "How do I bake bread?")


def test_shared_prefix_length_stops_at_the_first_difference_and_leaves_every_row_a_token():
    from trainer.model import shared_prefix_length

    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 9, 0], [1, 2, 3, 4, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert shared_prefix_length(mask, torch.tensor([5, 4, 5]), input_ids=ids) == 3
    same = torch.tensor([[1, 2, 3], [1, 2, 3]])
    assert shared_prefix_length(torch.ones_like(same), torch.tensor([3, 3]), input_ids=same) == 2  # keeps one
    assert shared_prefix_length(torch.ones(1, 5, dtype=torch.long), torch.tensor([5]), input_ids=ids[:1]) == 0
    embeds = torch.zeros(2, 4, 3)
    embeds[1, 2, 0] = 1e-6  # embeddings are compared exactly
    assert shared_prefix_length(torch.ones(2, 4, dtype=torch.long), torch.tensor([4, 4]), inputs_embeds=embeds) == 2


@pytest.mark.parametrize(("attention", "pack_tokens"), [("sdpa", 256), ("eager", 256), ("sdpa", 40), ("sdpa", 1)])
def test_running_the_shared_prefix_once_gives_the_same_states_and_gradients(frozen, queries, attention, pack_tokens):
    """The soft-prompt path as the optimiser runs it: the prefix once, then the rows' own tokens packed into
    sequences with a block mask (one pack; a few; one row each). θ's gradient through the prefix's cache
    equals the gradient of running every row whole, and the layers see only the prefix and the rows' real
    tokens (no padding)."""
    before = frozen.model.config._attn_implementation
    frozen.model.set_attn_implementation(attention)
    assert frozen.model.config._attn_implementation == attention
    try:
        packs = check_shared_prefix(frozen, queries, pack_tokens)
    finally:
        frozen.model.set_attn_implementation(before)
    assert packs == {256: 1, 40: 4, 1: len(queries[0])}[pack_tokens]  # own tokens 15, 13, 15, 13, 13, 12, 13, 14


def test_attention_without_a_custom_mask_runs_whole_rows(frozen, queries, monkeypatch):
    """An attention implementation outside PACKABLE_ATTENTION (flash-attention kernels take no 4D mask) gets
    whole right-padded rows: every padded position passes the layers, and the states are the same."""
    import trainer.model

    qs, _ = queries
    ids, mask, lengths = chat_batch(frozen.tokenizer, None, qs, frozen.pad_id)
    seen: list[int] = []
    hook = frozen.model.get_decoder().layers[0].register_forward_hook(
        lambda module, args, output: seen.append(args[0].shape[0] * args[0].shape[1]))
    try:
        with torch.no_grad():
            packed = last_prompt_states(frozen.model, mask, lengths, input_ids=ids)
            monkeypatch.setattr(trainer.model, "PACKABLE_ATTENTION", ())
            seen.clear()
            whole = last_prompt_states(frozen.model, mask, lengths, input_ids=ids)
    finally:
        hook.remove()
    assert seen == [ids.numel()]
    torch.testing.assert_close(whole, packed, rtol=0, atol=1e-5)


def test_rows_are_packed_in_order_within_the_budget():
    from trainer.model import pack_rows

    assert pack_rows([5, 5, 5], 10) == [slice(0, 2), slice(2, 3)]
    assert pack_rows([5, 12, 3, 3], 10) == [slice(0, 1), slice(1, 2), slice(2, 4)]  # a long row alone
    assert pack_rows([4], 1) == [slice(0, 1)]
    assert pack_rows([1] * 6, 100) == [slice(0, 6)]


def check_shared_prefix(frozen, queries, pack_tokens) -> int:
    """Runs the comparison; returns how many packed forwards the shared path made."""
    from trainer.chat import build_spliced_batch, embed_spliced_batch
    from trainer.model import shared_prefix_length

    qs, _ = queries
    theta0 = torch.randn(12, frozen.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
    batch = build_spliced_batch(frozen.tokenizer, frozen.sentinel_id, qs, theta0.shape[0], frozen.pad_id)
    seen: list[int] = []
    layer = frozen.model.get_decoder().layers[0]
    hook = layer.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0] * args[0].shape[1]))
    results = {}
    try:
        for share in (False, True):
            seen.clear()
            theta = theta0.clone().requires_grad_(True)
            embeds = embed_spliced_batch(frozen.embedding(), batch, theta)
            states = last_prompt_states(frozen.model, batch.attention_mask, batch.lengths, inputs_embeds=embeds,
                                        share_prefix=share, pack_tokens=pack_tokens)
            (states.pow(2).sum() + states[:, :7].sum()).backward()
            results[share] = (states.detach(), theta.grad, sum(seen), len(seen))
    finally:
        hook.remove()
    prefix = shared_prefix_length(batch.attention_mask, batch.lengths,
                                  inputs_embeds=embed_spliced_batch(frozen.embedding(), batch, theta0))
    assert prefix >= theta0.shape[0]  # the template's opening and every θ row
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=1e-5)
    shared_grad, whole_grad = results[True][1], results[False][1]
    assert float((shared_grad - whole_grad).norm() / whole_grad.norm()) < 1e-5  # float32 rounding of a sum order
    assert results[False][2] == batch.input_ids.numel()
    assert results[True][2] == prefix + int((batch.lengths - prefix).sum())
    assert results[True][2] < batch.input_ids.numel() - (len(qs) - 1) * prefix  # less than repeating the cache
    return results[True][3] - 1  # forwards of the first layer, less the prefix's
