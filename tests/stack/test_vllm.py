"""`python -m stack.vllm`: vLLM alone with the project's command line; the port check, and (with the
tiny model, as the session's vLLM server) serving it and a stop on SIGHUP that leaves no engine process behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from stack.processes import REPO_ROOT
from tests.stack.process_tree import survivors


def test_a_held_port_or_a_nameless_folder_is_refused(tmp_path: Path) -> None:
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "stack.vllm", "--model", str(tmp_path), "--name", "x",
                                 "--port", str(port)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"port {port} (127.0.0.1) is held by PID {os.getpid()} (" in result.stderr
    result = subprocess.run([sys.executable, "-m", "stack.vllm", "--model", str(tmp_path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--name is required with a model folder" in result.stderr


@pytest.mark.integration
def test_vllm_alone_serves_the_model(vllm_server) -> None:
    """The session's vLLM server is `python -m stack.vllm` (tests/conftest.py): it printed its real URL once
    ready and serves the model under the given name. Its stop on SIGHUP, leaving no engine process behind,
    is checked when the session ends (the fixture's teardown), so the suite starts vLLM once for both."""
    log = vllm_server.process.log_path.read_text(errors="replace")
    assert f"vLLM is ready: http://127.0.0.1:{vllm_server.port}/v1 serves tiny-llama. Ctrl-C stops it." in log
    models = httpx.get(f"http://127.0.0.1:{vllm_server.port}/v1/models", timeout=10).json()
    assert [model["id"] for model in models["data"]] == ["tiny-llama"]
    assert len(survivors(vllm_server.children)) > 1  # the API server and its engine, in their own session
