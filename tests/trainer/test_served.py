"""What is trained is what is served: the trainer's own spliced forward, greedy, is token-identical to
the real vLLM CPU server given the same soft prompt as a system-message `prompt_embeds` part, and to
the real gateway serving that soft prompt as an artifact variant."""

from __future__ import annotations

import httpx
import pytest
import torch

from safeprompt.artifact import Manifest, read_model_info
from safeprompt.artifact_write import save_artifact
from safeprompt.embeds import prompt_embeds_part
from safeprompt.torch_payload import encode_prompt_embeds
from trainer.chat import build_spliced_batch, embed_spliced_batch
from trainer.model import greedy_generate

pytestmark = pytest.mark.integration

QUERIES = ["How do I bake bread?", "Write a poem about the sea"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def soft_prompt(frozen) -> torch.Tensor:
    """A random soft prompt [7, hidden] at the scale of the model's token embeddings."""
    scale = float(frozen.embedding().weight.std())
    return torch.randn(7, frozen.hidden_size, generator=torch.Generator().manual_seed(5)) * scale


def trainer_answer(frozen, soft_prompt, query) -> str:
    batch = build_spliced_batch(frozen.tokenizer, frozen.sentinel_id, [query], soft_prompt.shape[0], frozen.pad_id)
    with torch.no_grad():
        embeds = embed_spliced_batch(frozen.embedding(), batch, soft_prompt)
    tokens = greedy_generate(frozen.model, embeds, MAX_TOKENS, {frozen.tokenizer.eos_token_id})
    assert len(tokens) > 3
    return frozen.tokenizer.decode(tokens, skip_special_tokens=True)


def vllm_answer(vllm_server, soft_prompt, query) -> tuple[str, int]:
    """(greedy answer, usage.prompt_tokens) of the real vLLM server given θ as the system message."""
    body = {"model": vllm_server.served_name, "temperature": 0, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "system", "content": [prompt_embeds_part(encode_prompt_embeds(soft_prompt))]},
                         {"role": "user", "content": query}]}
    response = httpx.post(f"{vllm_server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    payload = response.json()
    return payload["choices"][0]["message"]["content"], payload["usage"]["prompt_tokens"]


@pytest.mark.parametrize("query", QUERIES)
def test_trainer_forward_equals_vllm_prompt_embeds(frozen, soft_prompt, vllm_server, query):
    answer, prompt_tokens = vllm_answer(vllm_server, soft_prompt, query)
    assert answer == trainer_answer(frozen, soft_prompt, query)
    # Same sequence on both sides: the spliced rendering's length is what vLLM counted.
    batch = build_spliced_batch(frozen.tokenizer, frozen.sentinel_id, [query], soft_prompt.shape[0], frozen.pad_id)
    assert prompt_tokens == int(batch.lengths[0])


def test_another_soft_prompt_changes_the_answer(frozen, soft_prompt, vllm_server):
    """Negative control: the equality above is not an answer that ignores the soft prompt."""
    other = torch.randn(soft_prompt.shape, generator=torch.Generator().manual_seed(11)) * float(soft_prompt.std())
    query = QUERIES[0]
    answer_other, _ = vllm_answer(vllm_server, other, query)
    assert answer_other == trainer_answer(frozen, other, query)
    assert answer_other != trainer_answer(frozen, soft_prompt, query)


def test_trainer_forward_equals_the_gateway_serving_the_artifact(frozen, soft_prompt, vllm_server,
                                                                 gateway_factory, tmp_path):
    from tests.conftest import default_model_config

    info = read_model_info(vllm_server.model_dir)
    manifest = Manifest(name="dro", base_model="tiny-llama", hidden_size=frozen.hidden_size,
                        num_virtual_tokens=soft_prompt.shape[0], chat_template_sha256=info.chat_template_sha256,
                        dtype="float32", origin="test")
    artifact = save_artifact(tmp_path / "dro", manifest, {"soft_prompt": soft_prompt})
    gateway = gateway_factory(models=[default_model_config(vllm_server, artifacts={"dro": str(artifact)})])
    client = gateway.openai_client()
    for query in QUERIES:
        answer = client.chat.completions.create(model="tiny@dro", temperature=0, max_tokens=MAX_TOKENS,
                                                messages=[{"role": "user", "content": query}])
        assert answer.choices[0].message.content == trainer_answer(frozen, soft_prompt, query)
