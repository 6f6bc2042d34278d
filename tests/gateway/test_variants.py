"""Served models and variants (gateway/variants.py): resolution, traffic split, artifact checks at load."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pybase64
import pytest
import torch
from safetensors.torch import save_file

from gateway.errors import ModelNotFound
from gateway.settings import ModelConfig
from gateway.variants import load_model, resolve_variant, split_choice
from safeprompt.artifact import ArtifactError, Manifest, read_model_info
from safeprompt.artifact_write import import_released, read_tensors, save_artifact
from safeprompt.files import sha256_text

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def _model_dir(tmp_path: Path, hidden: int = 16, template: str = TEMPLATE) -> Path:
    folder = tmp_path / f"model-{hidden}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": hidden}))
    (folder / "chat_template.jinja").write_text(template)
    return folder


def _artifact(tmp_path: Path, name: str, hidden: int = 16, rows: int = 3, template: str = TEMPLATE) -> Path:
    manifest = Manifest(name=name, base_model="m", hidden_size=hidden, num_virtual_tokens=rows,
                        chat_template_sha256=sha256_text(template), dtype="float32", origin="test")
    return save_artifact(tmp_path / "artifacts" / name, manifest, {"soft_prompt": torch.randn(rows, hidden)})


def test_model_ids_and_default_variant(tmp_path: Path) -> None:
    config = ModelConfig(name="m", model_path=_model_dir(tmp_path), artifacts={"dro": _artifact(tmp_path, "dro")},
                         default_variant="dro")
    model = load_model(config)
    assert model.model_ids() == ["m", "m@none", "m@default", "m@short", "m@mistral", "m@dro"]
    models = {"m": model}
    assert resolve_variant(models, "m", request_id="r", user=None)[1].name == "dro"
    assert resolve_variant(models, "m@short", request_id="r", user=None)[1].kind == "text"
    soft = resolve_variant(models, "m@dro", request_id="r", user=None)[1]
    assert soft.kind == "soft" and soft.num_virtual_tokens == 3 and soft.encoded_embeds


@pytest.mark.parametrize("model_id", ["other", "m@nope", "@dro"])
def test_unknown_models_and_variants_are_404(tmp_path: Path, model_id: str) -> None:
    models = {"m": load_model(ModelConfig(name="m"))}
    with pytest.raises(ModelNotFound) as caught:
        resolve_variant(models, model_id, request_id="r", user=None)
    assert caught.value.status_code == 404 and caught.value.param == "model"


def test_split_is_deterministic_per_key_and_follows_weights() -> None:
    weights = {"dro": 0.9, "default": 0.1}
    assert all(split_choice(weights, f"k{i}") == split_choice(weights, f"k{i}") for i in range(50))
    counts = Counter(split_choice(weights, f"request:{i}") for i in range(4000))
    assert 0.87 < counts["dro"] / 4000 < 0.93
    assert split_choice({"a": 0.0, "b": 1.0}, "anything") == "b"


def test_split_uses_user_when_given(tmp_path: Path) -> None:
    models = {"m": load_model(ModelConfig(name="m", split={"none": 1, "default": 1}))}
    by_user = {resolve_variant(models, "m", request_id=f"r{i}", user="alice")[1].name for i in range(30)}
    assert len(by_user) == 1
    by_request = {resolve_variant(models, "m", request_id=f"r{i}", user=None)[1].name for i in range(60)}
    assert by_request == {"none", "default"}


def test_artifact_with_wrong_hidden_size_is_refused_naming_both(tmp_path: Path) -> None:
    config = ModelConfig(name="m", model_path=_model_dir(tmp_path, hidden=32),
                         artifacts={"dro": _artifact(tmp_path, "dro", hidden=16)})
    with pytest.raises(ArtifactError, match="hidden size 16.*'m' has hidden size 32"):
        load_model(config)


def test_artifact_with_other_chat_template_is_refused(tmp_path: Path) -> None:
    config = ModelConfig(name="m", model_path=_model_dir(tmp_path, template="{{ messages }}"),
                         artifacts={"dro": _artifact(tmp_path, "dro")})
    with pytest.raises(ArtifactError, match="chat template"):
        load_model(config)


def test_released_paper_soft_prompt_is_imported_for_the_named_model(tmp_path: Path) -> None:
    released = tmp_path / "type.all_length.short.safetensors"
    save_file({"soft_prompt": torch.randn(23, 16).to(torch.bfloat16)}, str(released))
    info = read_model_info(_model_dir(tmp_path))
    manifest, tensors = import_released(released, name="paper", base_model="m", model=info, init_prompt="short")
    assert manifest.origin == "paper-release" and manifest.dtype == "bfloat16"
    assert manifest.num_virtual_tokens == 23 and manifest.chat_template_sha256 == info.chat_template_sha256
    path = save_artifact(tmp_path / "imported", manifest, tensors)
    model = load_model(ModelConfig(name="m", model_path=tmp_path / "model-16", artifacts={"paper": path}))
    assert model.variants["paper"].num_virtual_tokens == 23


def test_released_file_with_other_keys_is_refused(tmp_path: Path) -> None:
    released = tmp_path / "bad.safetensors"
    save_file({"weights": torch.randn(2, 16)}, str(released))
    with pytest.raises(ArtifactError, match="exactly one tensor 'soft_prompt'"):
        import_released(released, name="p", base_model="m", model=read_model_info(_model_dir(tmp_path)))


def _forced_artifact(tmp_path: Path) -> Path:
    manifest = Manifest(name="dro", base_model="m", hidden_size=16, num_virtual_tokens=3,
                        chat_template_sha256=sha256_text(TEMPLATE), dtype="float32", origin="dro-trainer",
                        forced=True)
    return save_artifact(tmp_path / "artifacts" / "forced", manifest, {"soft_prompt": torch.randn(3, 16)})


def test_forced_artifact_is_refused_unless_named_in_allow_forced_artifacts(tmp_path: Path) -> None:
    path, model_dir = _forced_artifact(tmp_path), _model_dir(tmp_path)
    with pytest.raises(ArtifactError, match="marked forced.*allow_forced_artifacts"):
        load_model(ModelConfig(name="m", model_path=model_dir, artifacts={"dro": path}))
    served = load_model(ModelConfig(name="m", model_path=model_dir, artifacts={"dro": path},
                                    allow_forced_artifacts=["dro"]))
    assert served.variants["dro"].manifest.forced


def _sent(model) -> torch.Tensor:
    return torch.load(io.BytesIO(pybase64.b64decode(model.variants["dro"].encoded_embeds)), weights_only=True)


@pytest.mark.parametrize(("checkpoint_dtype", "setting", "expected"), [
    ("bfloat16", "auto", torch.bfloat16),  # vLLM --dtype auto serves a bf16 checkpoint in bf16
    ("float16", "auto", torch.float16),
    ("float32", "auto", torch.float32),  # vLLM may downcast (CPU: bf16); float32 is always exact
    (None, "auto", torch.float32),
    ("bfloat16", "float32", torch.float32),  # vLLM started with --dtype float32
])
def test_soft_prompts_are_sent_in_the_dtype_vllm_computes_in(tmp_path: Path, checkpoint_dtype, setting,
                                                           expected) -> None:
    folder = _model_dir(tmp_path)
    if checkpoint_dtype:
        (folder / "config.json").write_text(json.dumps({"hidden_size": 16, "dtype": checkpoint_dtype}))
    path = _artifact(tmp_path, "dro")
    model = load_model(ModelConfig(name="m", model_path=folder, artifacts={"dro": path}, embeds_dtype=setting))
    sent = _sent(model)
    trained = read_tensors(path)["soft_prompt"]
    assert sent.dtype == expected
    assert torch.equal(sent, trained.to(expected))


def test_the_gateway_refuses_a_tampered_payload_and_an_unconverted_artifact(tmp_path: Path) -> None:
    model_dir, path = _model_dir(tmp_path), _artifact(tmp_path, "dro")
    payload = path / "prompt_embeds.float32.pt"
    original = payload.read_bytes()
    payload.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ArtifactError, match="prompt_embeds.float32.pt: payload does not match"):
        load_model(ModelConfig(name="m", model_path=model_dir, artifacts={"dro": path}))
    payload.write_bytes(original)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(ArtifactError, match="format 1 artifact.*convert-artifact"):
        load_model(ModelConfig(name="m", model_path=model_dir, artifacts={"dro": path}))
