"""The gateway in front of a real vLLM CPU server (tiny random Llama, SmolLM2's real tokenizer and
chat template), driven with the official `openai` client over loopback HTTP.

The oracles: a soft prompt equal to the embeddings of a human prompt's in-context tokens gives
token-identical greedy output to the same prompt sent as text; and the gateway's output equals a
direct vLLM call with the same messages.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from safeprompt.artifact import Manifest, read_model_info
from safeprompt.artifact_write import save_artifact
from safeprompt.embeds import encode_payload, wire_dtype
from safeprompt.prompts import SHORT_SYSTEM_PROMPT
from tests.conftest import default_model_config
from trainer.chat import find_prompt_span, prepare_tokenizer_for_splice

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

QUESTION = "How do I bake bread?"
GREEDY = {"temperature": 0, "max_tokens": 12}


def _embedding_rows(model_dir: Path, ids: list[int]) -> torch.Tensor:
    weights = load_file(str(model_dir / "model.safetensors"))
    return weights["model.embed_tokens.weight"][ids].clone()  # [n, hidden] float32


@pytest.fixture(scope="module")
def oracle_artifact(vllm_server, tmp_path_factory) -> Path:
    """An artifact whose soft prompt is exactly the short prompt's in-context token embeddings."""
    tokenizer = AutoTokenizer.from_pretrained(vllm_server.model_dir)
    sentinel = prepare_tokenizer_for_splice(tokenizer)
    span = find_prompt_span(tokenizer, sentinel, SHORT_SYSTEM_PROMPT, QUESTION)
    info = read_model_info(vllm_server.model_dir)
    manifest = Manifest(name="oracle", base_model=str(vllm_server.model_dir), hidden_size=info.hidden_size,
                        num_virtual_tokens=len(span), chat_template_sha256=info.chat_template_sha256,
                        dtype="float32", origin="human-prompt-embedding", init_prompt="short")
    return save_artifact(tmp_path_factory.mktemp("artifacts") / "oracle", manifest,
                         {"soft_prompt": _embedding_rows(vllm_server.model_dir, span)})


@pytest.fixture(scope="module")
def soft_gateway(gateway_factory, vllm_server, oracle_artifact):
    """Runs as in its image: torch, numpy and safetensors cannot be imported (tests/no_torch)."""
    no_torch = os.pathsep.join([str(ROOT / "tests" / "no_torch"), str(ROOT)])
    return gateway_factory(models=[default_model_config(vllm_server, artifacts={"oracle": str(oracle_artifact)},
                                                        default_variant="oracle")],
                           env={"PYTHONPATH": no_torch})


def _chat(client: openai.OpenAI, model: str, messages=None, **fields):
    messages = messages or [{"role": "user", "content": QUESTION}]
    return client.chat.completions.create(model=model, messages=messages, **{**GREEDY, **fields})


def test_models_lists_every_variant(soft_gateway) -> None:
    ids = [model.id for model in soft_gateway.openai_client().models.list().data]
    assert ids == ["tiny", "tiny@none", "tiny@default", "tiny@short", "tiny@mistral", "tiny@oracle"]


def test_soft_prompt_equals_its_text_prompt_token_for_token(soft_gateway) -> None:
    client = soft_gateway.openai_client()
    text = _chat(client, "tiny@short", logprobs=True)
    soft = _chat(client, "tiny@oracle", logprobs=True)
    assert [t.token for t in soft.choices[0].logprobs.content] == [t.token for t in text.choices[0].logprobs.content]
    assert soft.choices[0].message.content == text.choices[0].message.content
    assert soft.usage.prompt_tokens == text.usage.prompt_tokens  # soft rows count as prompt tokens


def test_streamed_soft_prompt_equals_non_streamed(soft_gateway) -> None:
    client = soft_gateway.openai_client()
    whole = _chat(client, "tiny@oracle").choices[0].message.content
    chunks = _chat(client, "tiny@oracle", stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in chunks:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            assert chunk.model == "tiny@oracle"
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == whole
    assert usage is not None and usage.completion_tokens == GREEDY["max_tokens"]


@pytest.mark.parametrize("variant, system", [("none", None), ("short", SHORT_SYSTEM_PROMPT)])
def test_gateway_equals_direct_vllm(gateway, vllm_server, variant: str, system: str | None) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    direct_messages = ([{"role": "system", "content": system}] if system else []) + messages
    direct = openai.OpenAI(base_url=f"{vllm_server.base_url}/v1", api_key="x", max_retries=0)
    expected = _chat(direct, vllm_server.served_name, direct_messages).choices[0].message.content
    assert _chat(gateway.openai_client(), f"tiny@{variant}", messages).choices[0].message.content == expected


def test_variant_header_and_request_id(soft_gateway) -> None:
    client = soft_gateway.openai_client()
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], extra_headers={"X-Request-Id": "abc-123"},
        **GREEDY)
    assert raw.headers["x-safety-variant"] == "oracle"  # the configured default variant
    assert raw.headers["x-request-id"] == "abc-123"
    assert raw.parse().id.endswith("abc-123")  # propagated to vLLM as its request id


def test_passthrough_parameters(gateway) -> None:
    client = gateway.openai_client()
    reply = client.chat.completions.create(
        model="tiny@default", messages=[{"role": "user", "content": QUESTION}], n=2, max_completion_tokens=6,
        temperature=1.0, top_p=0.9, seed=7, presence_penalty=0.1, frequency_penalty=0.1, logprobs=True,
        top_logprobs=2, user="alice", stop=["\n\n"], extra_body={"top_k": 20, "min_tokens": 2})
    assert len(reply.choices) == 2
    assert all(len(choice.logprobs.content[0].top_logprobs) == 2 for choice in reply.choices)
    assert reply.usage.completion_tokens <= 12
    again = client.chat.completions.create(
        model="tiny@default", messages=[{"role": "user", "content": QUESTION}], n=2, max_completion_tokens=6,
        temperature=1.0, top_p=0.9, seed=7, presence_penalty=0.1, frequency_penalty=0.1, user="alice",
        stop=["\n\n"], extra_body={"top_k": 20, "min_tokens": 2})
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]


def test_structured_output_passes_through(gateway) -> None:
    reply = gateway.openai_client().chat.completions.create(
        model="tiny@none", messages=[{"role": "user", "content": "pick"}], max_tokens=5,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert reply.choices[0].message.content in ("yes", "no")


def test_seeded_long_prompt_does_not_crash_the_cpu_engine(gateway) -> None:
    """vLLM's CPU build crashes on a seeded request whose prompt is split across scheduler steps;
    the project's vLLM command disables chunked prefill so no prompt is split."""
    long_question = "Tell me about bread. " * 300  # ~1500 tokens
    client = gateway.openai_client()
    reply = client.chat.completions.create(model="tiny@none", messages=[{"role": "user", "content": long_question}],
                                           max_tokens=4, seed=123, temperature=1.0)
    assert reply.usage.prompt_tokens > 1000
    assert _chat(client, "tiny@none").choices[0].message.content  # the engine is still alive


def test_client_errors(gateway) -> None:
    client = gateway.openai_client()
    with pytest.raises(openai.NotFoundError) as not_found:
        _chat(client, "gpt-4")
    assert not_found.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="prompt_embeds"):
        _chat(client, "tiny@none", [{"role": "user", "content": [{"type": "prompt_embeds", "data": "AAAA"}]}])
    with pytest.raises(openai.BadRequestError, match="reserved placeholder"):
        _chat(client, "tiny@none", [{"role": "user", "content": "hi <prompt_embeds>"}])
    with pytest.raises(openai.BadRequestError, match="cannot be greater than max_model_len"):  # vLLM's own 400
        _chat(client, "tiny@none", max_tokens=50000)
    with pytest.raises(openai.BadRequestError, match="cannot be greater than max_model_len"):
        _chat(client, "tiny@none", max_tokens=50000, stream=True)


SYSTEM = {"role": "system", "content": "Answer in French."}


def test_system_policy_prepend_matches_direct_vllm(soft_gateway, vllm_server, oracle_artifact) -> None:
    from safeprompt.artifact import load_artifact

    artifact = load_artifact(oracle_artifact)
    encoded = encode_payload(artifact.payload(wire_dtype(artifact.manifest.dtype, None)))
    direct = openai.OpenAI(base_url=f"{vllm_server.base_url}/v1", api_key="x", max_retries=0)
    expected = direct.chat.completions.create(
        model=vllm_server.served_name, **GREEDY,
        messages=[{"role": "system", "content": [{"type": "prompt_embeds", "data": encoded},
                                                 {"type": "text", "text": SYSTEM["content"]}]},
                  {"role": "user", "content": QUESTION}]).choices[0].message.content
    got = _chat(soft_gateway.openai_client(), "tiny@oracle", [SYSTEM, {"role": "user", "content": QUESTION}])
    assert got.choices[0].message.content == expected


def test_system_policy_replace_and_reject(gateway_factory, vllm_server, soft_gateway) -> None:
    messages = [SYSTEM, {"role": "user", "content": QUESTION}]
    plain = _chat(soft_gateway.openai_client(), "tiny@oracle").choices[0].message.content
    replace = gateway_factory(system_message_policy="replace")
    assert _chat(replace.openai_client(), "tiny@short", messages).choices[0].message.content == \
        _chat(replace.openai_client(), "tiny@short").choices[0].message.content
    assert plain == _chat(replace.openai_client(), "tiny@short").choices[0].message.content
    reject = gateway_factory(system_message_policy="reject")
    with pytest.raises(openai.BadRequestError, match="system_message_policy=reject"):
        _chat(reject.openai_client(), "tiny@short", messages)
    # `none` applies no safety prompt, so the client's system message is kept under any policy.
    assert _chat(reject.openai_client(), "tiny@none", messages).choices[0].message.content


def test_health_ready_and_metrics(soft_gateway) -> None:
    assert httpx.get(f"{soft_gateway.base_url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{soft_gateway.base_url}/ready").json()
    assert ready["status"] == "ready" and "oracle" in ready["models"]["tiny"]
    metrics = httpx.get(f"{soft_gateway.base_url}/metrics").text
    assert 'dro_gateway_artifact_info{' in metrics and 'variant="oracle"' in metrics


def test_mismatched_artifact_stops_startup_with_a_clear_message(vllm_server, tmp_path) -> None:
    manifest = Manifest(name="wide", base_model="other-model", hidden_size=128, num_virtual_tokens=2,
                        chat_template_sha256=None, dtype="float32", origin="test")
    artifact = save_artifact(tmp_path / "wide", manifest, {"soft_prompt": torch.zeros(2, 128)})
    config = tmp_path / "config.yaml"
    model = default_model_config(vllm_server, artifacts={"wide": str(artifact)})
    config.write_text(yaml.safe_dump({"upstream_urls": [vllm_server.base_url], "models": [model]}))
    result = subprocess.run([sys.executable, "-m", "gateway", "--port", "1"], capture_output=True, text=True,
                            env={"GATEWAY_CONFIG": str(config), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 2
    assert "hidden size 128" in result.stderr and "hidden size 256" in result.stderr
    assert "Traceback" not in result.stderr


def test_released_paper_file_is_served(gateway_factory, vllm_server, tmp_path) -> None:
    """The authors' release format (one bf16 key `soft_prompt`) imported for the named model."""
    from safeprompt.artifact_write import import_released

    released = tmp_path / "type.all_length.short.safetensors"
    save_file({"soft_prompt": torch.randn(5, 256).to(torch.bfloat16)}, str(released))
    manifest, tensors = import_released(released, name="paper", base_model="tiny",
                                        model=read_model_info(vllm_server.model_dir))
    path = save_artifact(tmp_path / "paper", manifest, tensors)
    served = gateway_factory(models=[default_model_config(vllm_server, artifacts={"paper": str(path)})])
    reply = _chat(served.openai_client(), "tiny@paper")
    assert reply.usage.completion_tokens == GREEDY["max_tokens"]
