"""ManagedProcess and stop_processes without vLLM: readiness that a stranger cannot fake, and a
shutdown that completes whatever signals arrive, SIGKILL last, on one shared deadline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from stack.processes import REPO_ROOT, STARTING_STOP_S, ManagedProcess, free_port, lists_model
from tests.stack.process_tree import kill_groups, survivors


class _ModelsHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": "tiny"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stranger() -> Iterator[int]:
    """An HTTP server in this test process that answers 200 and lists model `tiny` on every path."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ModelsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_stranger_answering_on_the_port_is_not_our_server(stranger: int, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{stranger}/v1/models"
    process = ManagedProcess("idle", ["sleep", "60"], tmp_path / "idle.log").start()
    try:
        with pytest.raises(TimeoutError, match=rf"port {stranger} is answered by PID {os.getpid()} "):
            process.wait_http_ok(url, 2.0, port=stranger, accept=lists_model("tiny"))
    finally:
        process.stop()
    # The usual end: our server cannot bind the stranger's port and exits; the error says who answered.
    process = ManagedProcess("short-lived", ["sleep", "1.5"], tmp_path / "short.log").start()
    try:
        with pytest.raises(RuntimeError, match=rf"exited early .*port {stranger} is answered by PID {os.getpid()}"):
            process.wait_http_ok(url, 30.0, port=stranger, accept=lists_model("tiny"))
    finally:
        process.stop()


def test_our_own_server_is_ready_and_a_wrong_model_is_not(tmp_path: Path) -> None:
    port = free_port()
    process = ManagedProcess("http", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                             tmp_path / "http.log").start()
    try:
        process.wait_http_ok(f"http://127.0.0.1:{port}/", 20.0, port=port)
        assert process.owns_port(port)
        with pytest.raises(TimeoutError):
            process.wait_http_ok(f"http://127.0.0.1:{port}/", 1.0, port=port, accept=lists_model("tiny"))
    finally:
        process.stop()
    assert not process.owns_port(port)


# A server that ignores SIGTERM, with a worker (its child, same group) that ignores it too; it answers
# HTTP on the port in argv[1].
STUBBORN = """
import signal, subprocess, sys
from http.server import HTTPServer, SimpleHTTPRequestHandler
signal.signal(signal.SIGTERM, signal.SIG_IGN)
worker = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
subprocess.Popen([sys.executable, "-c", worker])
HTTPServer(("127.0.0.1", int(sys.argv[1])), SimpleHTTPRequestHandler).serve_forever()
"""

# Supervises two stubborn servers the way stack.serve does, once they serve (argv[3] "ready") or while
# they are still starting (no readiness seen); prints their PIDs, then waits to be signalled.
SUPERVISOR = f"""
import sys, time
from pathlib import Path
from stack.processes import ManagedProcess, StopSignals, free_port, stop_processes
signals = StopSignals().install()
ports = [free_port() for _ in range(2)]
servers = [ManagedProcess(f"server{{i}}", [sys.executable, "-c", {STUBBORN!r}, str(port)],
                          Path(sys.argv[1]) / f"{{i}}.log").start() for i, port in enumerate(ports)]
try:
    if sys.argv[3] == "ready":
        for server, port in zip(servers, ports):
            server.wait_http_ok(f"http://127.0.0.1:{{port}}/", 30, port=port)
    print(" ".join(str(server.pid) for server in servers), flush=True)
    while True:
        time.sleep(1)
except KeyboardInterrupt:
    print("stopping", flush=True)
finally:
    signals.stopping()
    started = time.monotonic()
    stop_processes(servers, timeout_s=float(sys.argv[2]))
    print(f"stopped in {{time.monotonic() - started:.1f}} s", flush=True)
"""


def stop_stubborn_supervisor(tmp_path: Path, stop_timeout_s: float, readiness: str,
                             signals: tuple[str, ...]) -> float:
    """Run SUPERVISOR, signal its group, check that it stopped everything; returns the seconds it took."""
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(tmp_path), str(stop_timeout_s), readiness],
                                  cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
    leaders = {supervisor.pid}
    try:
        leaders |= {int(pid) for pid in supervisor.stdout.readline().split()}
        assert len(leaders) == 3, supervisor.stderr.read()
        deadline = time.monotonic() + 30
        while len(survivors(leaders - {supervisor.pid})) < 4:  # two servers (SIGTERM ignored), two workers
            assert time.monotonic() < deadline, survivors(leaders)
            time.sleep(0.1)
        started = time.monotonic()
        for name in signals:
            os.killpg(supervisor.pid, getattr(signal, name))  # the group: as a terminal or a supervisor does
            time.sleep(0.3)
        stdout, stderr = supervisor.communicate(timeout=60)
        elapsed = time.monotonic() - started
        assert supervisor.returncode == 0, stderr
        assert "Traceback" not in stderr
        assert "stopped in" in stdout
        assert survivors(leaders) == {}
        return elapsed
    finally:
        kill_groups(leaders)
        supervisor.communicate()


@pytest.mark.parametrize("signals", [
    ("SIGINT",),
    ("SIGINT", "SIGINT"),
    ("SIGTERM", "SIGTERM", "SIGTERM", "SIGTERM"),
    ("SIGHUP", "SIGINT", "SIGTERM"),
], ids="+".join)
def test_shutdown_survives_repeated_signals_and_kills_what_ignores_sigterm(signals: tuple[str, ...],
                                                                         tmp_path: Path) -> None:
    stop_timeout_s = STARTING_STOP_S + 2.0
    elapsed = stop_stubborn_supervisor(tmp_path, stop_timeout_s, "ready", signals)
    # Serving servers get SIGTERM's whole time, on one shared deadline for both (not one after the
    # other), then SIGKILL.
    assert stop_timeout_s <= elapsed < 2 * stop_timeout_s


def test_servers_still_starting_are_killed_without_the_whole_grace(tmp_path: Path) -> None:
    """vLLM's API server ignores SIGTERM while it waits for its engine: a Ctrl-C during start-up must
    not wait the whole stop timeout for it."""
    elapsed = stop_stubborn_supervisor(tmp_path, 60.0, "starting", ("SIGINT",))
    assert STARTING_STOP_S <= elapsed < 30.0


def test_stop_is_idempotent_and_reaps(tmp_path: Path) -> None:
    process = ManagedProcess("sleeper", ["sleep", "60"], tmp_path / "sleep.log").start()
    process.stop()
    process.stop()
    assert process.process.returncode == -signal.SIGTERM
    assert not process.group_alive()
    ManagedProcess("never-started", ["true"], None).stop()


# A benchmark-style script: starts two servers inside servers_stopped_on_exit, prints their PIDs,
# then ends by itself, raises, or waits to be signalled (argv[2]).
BENCH_SCRIPT = """
import sys, time
from pathlib import Path
from stack.processes import ManagedProcess, servers_stopped_on_exit
with servers_stopped_on_exit(timeout_s=5.0) as servers:
    for i in range(2):
        servers.append(ManagedProcess(f"server{i}", ["sleep", "600"], Path(sys.argv[1]) / f"{i}.log").start())
    print(" ".join(str(server.pid) for server in servers), flush=True)
    if sys.argv[2] == "error":
        raise ValueError("the benchmark failed")
    if sys.argv[2] == "wait":
        time.sleep(600)
print("finished", flush=True)
"""


@pytest.mark.parametrize("how, code", [("end", 0), ("error", 1), ("SIGTERM", 143), ("SIGHUP", 129),
                                       ("SIGINT", 130)])
def test_a_script_that_starts_servers_leaves_none_behind(how: str, code: int, tmp_path: Path) -> None:
    mode = how if how in ("end", "error") else "wait"
    script = subprocess.Popen([sys.executable, "-c", BENCH_SCRIPT, str(tmp_path), mode], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    leaders = {script.pid}
    try:
        leaders |= {int(pid) for pid in script.stdout.readline().split()}
        assert len(leaders) == 3, script.stderr.read()
        if mode == "wait":
            time.sleep(0.3)
            assert script.poll() is None
            os.kill(script.pid, getattr(signal, how))  # the script alone, as `kill PID` does: not its servers
        stdout, stderr = script.communicate(timeout=30)
        assert script.returncode == code, stderr
        assert survivors(leaders) == {}
        assert ("finished" in stdout) == (how == "end")
        if how == "error":
            assert "ValueError: the benchmark failed" in stderr
        elif how != "end":
            assert f"{how}: stopping the servers" in stderr and "Traceback" not in stderr
    finally:
        kill_groups(leaders)
        script.communicate()
