"""`make serve` (stack.serve): its gateway configuration and printed usage, the port check before
anything starts, and, with a real vLLM CPU server on the tiny model, a shutdown that leaves no
process behind and both ports free whichever way and however often it is signalled."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from gateway.settings import ModelConfig
from stack.ports import ensure_port_free
from stack.processes import REPO_ROOT, free_port
from stack.serve import committed_artifacts, gateway_config, usage
from stack.vllm import STOP_TIMEOUT_S
from tests.stack.process_tree import children_of, kill_groups, survivors

SMOLLM2 = "smollm2-135m-instruct"
READY_LINE = "The gateway is ready on"
STOP_BOUND_S = 60.0  # stack.serve's stop timeout (20 s) + SIGKILL wait (5 s) + Python's exit, with room


def test_committed_artifact_is_the_default_variant_and_user_artifacts_are_added(tmp_path: Path) -> None:
    # SmolLM2's committed artifact is marked forced: left out unless allowed, and then the gateway
    # config names it in allow_forced_artifacts (the gateway refuses it otherwise).
    smollm2_dro = str(REPO_ROOT / "artifacts" / SMOLLM2 / "dro")
    assert committed_artifacts(SMOLLM2) == {}
    assert committed_artifacts(SMOLLM2, allow_forced=True) == {"dro": smollm2_dro}
    assert committed_artifacts("no-such-model") == {}
    (model,) = gateway_config(tmp_path, SMOLLM2, 8123, with_dro=True, artifacts={"mine": "/a/mine"},
                              allow_forced=("dro",))["models"]
    assert model == {"name": SMOLLM2, "upstream_model": SMOLLM2, "model_path": str(tmp_path),
                     "default_variant": "dro", "artifacts": {"dro": smollm2_dro, "mine": "/a/mine"},
                     "allow_forced_artifacts": ["dro"]}
    ModelConfig(**model)
    (model,) = gateway_config(tmp_path, SMOLLM2, 8123, with_dro=True)["models"]
    assert (model["default_variant"], model["artifacts"]) == ("default", {})
    (model,) = gateway_config("not/a/folder", "m", 8123, artifacts={"mine": "/a/mine"}, default_variant="mine")["models"]
    assert (model["model_path"], model["default_variant"], model["artifacts"]) == (None, "mine", {"mine": "/a/mine"})
    (model,) = gateway_config(tmp_path, "m", 8123)["models"]
    assert (model["default_variant"], model["artifacts"]) == ("default", {})


def test_usage_names_the_real_ports_and_host() -> None:
    text = usage("0.0.0.0", 9123, 9124, ["m", "m@dro"])
    assert "ready on http://127.0.0.1:9123 (listening on 0.0.0.0:9123; vLLM CPU on 127.0.0.1:9124" in text
    assert "8000" not in text and "8001" not in text
    assert 'base_url="http://127.0.0.1:9123/v1"' in text
    assert "http://10.1.2.3:9123/v1" in usage("10.1.2.3", 9123, 9124, ["m"])


def run_serve(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stack.serve", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout_s)


@pytest.fixture
def stranger() -> Iterator[int]:
    """A plain socket listening on 127.0.0.1 in this test process; yields its port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("held", ["vllm", "gateway"])
def test_a_port_held_by_a_stranger_stops_serve_before_anything_starts(held: str, stranger: int,
                                                                     tmp_path: Path) -> None:
    ports = {"vllm": free_port(), "gateway": free_port(), held: stranger}
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = run_serve("--model", str(tmp_path), "--name", "tiny", "--port", str(ports["gateway"]),
                       "--vllm-port", str(ports["vllm"]), "--run-dir", str(run_dir))
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 30
    assert f"port {stranger} (" in result.stderr
    assert f"is held by PID {os.getpid()} (" in result.stderr
    assert f"stop it with: kill {os.getpid()}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()  # nothing started, not even a log


def test_a_folder_that_is_not_an_artifact_stops_serve_before_anything_starts(tmp_path: Path) -> None:
    result = run_serve("--model", str(tmp_path), "--name", "tiny", "--port", str(free_port()),
                       "--vllm-port", str(free_port()), "--run-dir", str(tmp_path / "run"),
                       "--artifact", f"mine={tmp_path}")
    assert result.returncode == 2
    assert f"artifact mine={tmp_path}: no manifest.json" in result.stderr
    result = run_serve("--model", str(tmp_path), "--port", str(free_port()), "--vllm-port", str(free_port()))
    assert result.returncode == 2
    assert "--name is required with a model folder" in result.stderr


class ServeProcess:
    """`python -m stack.serve` on the tiny model in its own session, output in a file."""

    def __init__(self, model_dir: Path, tmp_path: Path) -> None:
        self.port, self.vllm_port = free_port(), free_port()
        self.output = tmp_path / "serve.out"
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stack.serve", "--model", str(model_dir), "--name", "tiny",
                 "--dtype", "float32", "--host", "127.0.0.1", "--port", str(self.port),
                 "--vllm-port", str(self.vllm_port), "--run-dir", str(tmp_path / "run")],
                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.children: set[int] = set()  # the servers it started: each leads its own session

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_for(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.children |= children_of(self.process.pid)
            if condition():
                return
            assert self.process.poll() is None, f"stack.serve exited ({self.process.returncode}):\n{self.text()}"
            time.sleep(0.5)
        raise TimeoutError(f"stack.serve: {what} not reached in {timeout_s:.0f} s:\n{self.text()}")

    def signal(self, names: tuple[str, ...], gap_s: float = 0.2) -> None:
        for name in names:
            target, signum = name.split(":") if ":" in name else ("process", name)
            if target == "group":
                os.killpg(self.process.pid, getattr(signal, signum))
            else:
                self.process.send_signal(getattr(signal, signum))
            time.sleep(gap_s)

    def kill_everything(self) -> None:
        kill_groups({self.process.pid, *self.children})
        self.process.wait()


@pytest.fixture
def serve(tiny_model_dir: Path, tmp_path: Path) -> Iterator[ServeProcess]:
    started = ServeProcess(tiny_model_dir, tmp_path)
    try:
        yield started
    finally:
        started.kill_everything()  # only if a test failed half-way


def assert_nothing_left(serve: ServeProcess, signalled_at: float) -> float:
    """Checks that serve exited 0 within the bound and left nothing; returns the seconds it took."""
    code = serve.process.wait(timeout=STOP_BOUND_S)
    elapsed = time.monotonic() - signalled_at
    text = serve.text()
    assert code == 0, text
    assert elapsed < STOP_BOUND_S
    assert "Traceback" not in text
    assert survivors({serve.process.pid, *serve.children}) == {}
    ensure_port_free(serve.vllm_port, "127.0.0.1")
    ensure_port_free(serve.port, "127.0.0.1")
    return elapsed


@pytest.mark.integration
def test_serve_stops_everything_it_started(serve: ServeProcess) -> None:
    """One Ctrl-C once the whole stack is up stops vLLM, its engine and the gateway."""
    serve.wait_for(lambda: READY_LINE in serve.text(), 600, "the ready message")
    text = serve.text()
    assert f"{READY_LINE} http://127.0.0.1:{serve.port} " in text
    assert f"vLLM CPU on 127.0.0.1:{serve.vllm_port}, loopback only" in text
    models = httpx.get(f"http://127.0.0.1:{serve.port}/v1/models", timeout=10).json()
    assert "tiny@default" in [model["id"] for model in models["data"]]
    assert len(serve.children) == 2  # vLLM and the gateway
    assert len(survivors(serve.children)) > 2  # vLLM's engine process(es) and the gateway
    signalled_at = time.monotonic()
    serve.signal(("SIGINT",))
    assert_nothing_left(serve, signalled_at)


# Signals that arrive while vLLM is still starting, once its engine process exists: the stop path is the
# one above (StopSignals), without waiting a minute for readiness each time (the suite's CI budget). A
# single signal is the first half of each pair; the single Ctrl-C at full readiness is the test above.
@pytest.mark.integration
@pytest.mark.parametrize("signals", [
    ("SIGINT", "SIGINT"),  # Ctrl-C twice in quick succession
    ("group:SIGTERM", "group:SIGTERM"),  # `timeout` or a supervisor, twice, reaching make and Python alike
], ids="+".join)  # SIGHUP: test_vllm.py (the same StopSignals), and without vLLM in test_processes.py
def test_serve_stops_vllm_while_it_is_still_starting(serve: ServeProcess, signals: tuple[str, ...]) -> None:
    serve.wait_for(lambda: (serve.process.pid and serve.children
                            and len(survivors(serve.children)) > 1), 120, "vLLM's engine process")
    signalled_at = time.monotonic()
    serve.signal(signals)
    elapsed = assert_nothing_left(serve, signalled_at)
    # vLLM ignores SIGTERM while it waits for its engine: it is killed after STARTING_STOP_S, not after
    # the whole grace a serving vLLM gets (before that rule, every such stop took the full 20 s).
    assert elapsed < STOP_TIMEOUT_S
    assert READY_LINE not in serve.text()


@pytest.mark.parametrize(("vllm_dtype", "embeds_dtype"), [("half", "float16"), ("float", "float32"),
                                                          ("bfloat16", "bfloat16"), ("auto", "auto")])
def test_vllm_dtype_tells_the_gateway_what_to_send_soft_prompts_in(tmp_path: Path, vllm_dtype: str,
                                                                  embeds_dtype: str) -> None:
    (model,) = gateway_config(tmp_path, "m", 8123, vllm_dtype=vllm_dtype)["models"]
    assert model["embeds_dtype"] == embeds_dtype
    ModelConfig(**model)
    (model,) = gateway_config(tmp_path, "m", 8123)["models"]
    assert "embeds_dtype" not in model
