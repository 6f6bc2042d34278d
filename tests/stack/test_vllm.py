"""`python -m stack.vllm`: vLLM alone with the project's command line; the port check, and (with the
tiny model) a stop on SIGHUP that leaves no engine process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from stack.ports import ensure_port_free
from stack.processes import REPO_ROOT, free_port
from tests.stack.process_tree import children_of, survivors

STOP_BOUND_S = 60.0


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
def test_vllm_alone_serves_the_model_and_stops_on_sighup(tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    output = tmp_path / "vllm.out"
    with open(output, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "stack.vllm", "--model", str(tiny_model_dir), "--name", "tiny",
             "--dtype", "float32", "--port", str(port)],
            cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 600
        while "vLLM is ready" not in output.read_text(errors="replace"):
            children |= children_of(process.pid)
            assert process.poll() is None, output.read_text(errors="replace")
            assert time.monotonic() < deadline, output.read_text(errors="replace")
            time.sleep(0.5)
        children |= children_of(process.pid)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        assert [model["id"] for model in models["data"]] == ["tiny"]
        assert len(survivors(children)) > 1  # the API server and its engine
        signalled_at = time.monotonic()
        process.send_signal(signal.SIGHUP)
        assert process.wait(timeout=STOP_BOUND_S) == 0
        assert time.monotonic() - signalled_at < STOP_BOUND_S
        assert survivors({process.pid, *children}) == {}
        ensure_port_free(port, "127.0.0.1")
    finally:
        for leader in {process.pid, *children}:
            try:
                os.killpg(leader, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()
