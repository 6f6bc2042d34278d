"""Benchmark: what the gateway adds in front of an upstream that answers at once, side by side with
LiteLLM's proxy and with the upstream alone (issue 12; figures in docs/performance.md).

    PYTHONPATH=. .venv/bin/python bench/gateway_overhead.py --out docs/performance/overhead.json

Starts `bench/instant_upstream.py`, the real gateway (`python -m gateway`, one worker, judge and
metrics on, as `make serve` runs it) with soft-prompt artifacts of the given hidden sizes, and,
when `.venv-litellm` exists (`make setup-litellm`), LiteLLM's proxy configured for the same
upstream as an OpenAI-compatible provider. The same closed-loop load (bench/loadgen.py) goes to
every target in alternating blocks, so slow drifts of a shared machine fall on all of them:

- `direct`: the upstream itself, the zero-overhead line;
- `gateway:text`: the gateway's `default` variant (a human system prompt is added);
- `gateway:softN`: a soft prompt of hidden size N (`prompt_embeds` sent to the upstream);
- `litellm`: LiteLLM's proxy, text only (it has no soft prompts);
- with `--floor`, in the relay run only: `floor:raw` and `floor:starlette`, the cheapest relay built
  from the gateway's parts (`bench/relay_floor.py`: uvicorn, aiohttp, no parsing, judge or metrics).

Reported per target, mode (streaming or not) and concurrency: latency p50/p95/p99 over all blocks,
the added latency against `direct` at the same percentile, requests per second, and the CPU-seconds
per request of the proxy's process tree (psutil, user + system). A relay run streams long answers
(`--relay-tokens` chunks each) and reports the gateway's SSE chunks per CPU-second.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
import torch
import yaml

from bench.loadgen import Result, percentile, run_load
from safeprompt.artifact import Manifest
from safeprompt.artifact_write import save_artifact
from safeprompt.files import atomic_write_text
from stack.processes import ManagedProcess, free_port, servers_stopped_on_exit, start_gateway

REPO = Path(__file__).resolve().parent.parent
LITELLM = REPO / ".venv-litellm" / "bin" / "litellm"
# Both proxies check a client key, as they would in production (LiteLLM refuses to start without one).
API_KEY = "sk-bench-" + "0" * 32
QUESTION = [{"role": "user", "content": "Say hello to the benchmark in one short sentence."}]


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    model: str
    process: ManagedProcess | None  # whose CPU is counted; None for the upstream itself
    api_key: str | None = None


def soft_prompt_artifact(folder: Path, hidden: int, tokens: int, dtype: torch.dtype) -> Path:
    """A random soft prompt of `tokens` x `hidden` as a real artifact (not checked against a model)."""
    generator = torch.Generator().manual_seed(hidden)
    soft = (torch.randn(tokens, hidden, generator=generator) * 0.02).to(dtype)
    manifest = Manifest(name=f"soft{hidden}", base_model="bench/instant", hidden_size=hidden,
                        num_virtual_tokens=tokens, chat_template_sha256=None,
                        dtype=str(dtype).removeprefix("torch."), origin="test")
    return save_artifact(folder / f"soft{hidden}", manifest, {"soft_prompt": soft})


def start_upstream(port: int, log: Path, pace_ms: float = 0.0) -> ManagedProcess:
    proc = ManagedProcess(name="instant-upstream",
                          command=[sys.executable, str(REPO / "bench" / "instant_upstream.py"), "--port", str(port),
                                   "--pace-ms", str(pace_ms)],
                          log_path=log).start()
    proc.wait_http_ok(f"http://127.0.0.1:{port}/health", 30, port=port)
    return proc


def start_litellm(upstream_port: int, port: int, folder: Path) -> ManagedProcess:
    config = {
        "model_list": [{"model_name": "bench", "litellm_params": {
            "model": "openai/instant", "api_base": f"http://127.0.0.1:{upstream_port}/v1", "api_key": "none"}}],
        "litellm_settings": {"telemetry": False},
        "general_settings": {"master_key": API_KEY},
    }
    config_path = folder / "litellm.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "True"}
    proc = ManagedProcess(name="litellm", command=[str(LITELLM), "--config", str(config_path), "--host", "127.0.0.1",
                                                   "--port", str(port), "--num_workers", "1"],
                          log_path=folder / "litellm.log", env=env).start()
    proc.wait_http_ok(f"http://127.0.0.1:{port}/health/liveliness", 180, port=port)
    return proc


def cpu_seconds(proc: ManagedProcess | None) -> float:
    if proc is None or proc.pid is None:
        return 0.0
    try:
        root = psutil.Process(proc.pid)
        total = 0.0
        for member in [root, *root.children(recursive=True)]:
            times = member.cpu_times()
            total += times.user + times.system
        return total
    except psutil.NoSuchProcess:
        return 0.0


def body_for(target: Target, stream: bool, tokens: int) -> dict:
    body: dict = {"model": target.model, "messages": QUESTION, "max_tokens": tokens, "temperature": 0}
    if stream:
        body["stream"] = True
    return body


def measure(target: Target, *, stream: bool, concurrency: int, requests: int, tokens: int) -> tuple[Result, float]:
    before = cpu_seconds(target.process)
    result = asyncio.run(run_load(target.url, body_for(target, stream, tokens), concurrency=concurrency,
                                  requests=requests, api_key=target.api_key))
    return result, cpu_seconds(target.process) - before


def summarise(results: list[Result], cpu_s: float) -> dict:
    latencies = [value for result in results for value in result.latencies_s]
    first = [value for result in results for value in result.first_token_s]
    done = len(latencies)
    wall = sum(result.wall_s for result in results)
    summary = {
        "requests": done,
        "errors": sum(len(result.errors) for result in results),
        "error_samples": [error for result in results for error in result.errors][:3],
        "rps": done / wall if wall else 0.0,
        "cpu_ms_per_request": 1000 * cpu_s / done if done else None,
        "chunks": sum(result.chunks for result in results),
        "cpu_s": cpu_s,
    }
    if latencies:
        summary.update({f"p{q}_ms": 1000 * percentile(latencies, q) for q in (50, 95, 99)})
    if first:
        summary["ttft_p50_ms"] = 1000 * percentile(first, 50)
    return summary


def run_grid(targets: list[Target], *, concurrencies: list[int], streams: list[bool], blocks: int, tokens: int,
             requests_for) -> list[dict]:
    rows = []
    for stream in streams:
        for concurrency in concurrencies:
            requests = requests_for(concurrency)
            for target in targets:  # warm-up, not recorded
                measure(target, stream=stream, concurrency=concurrency, requests=max(50, requests // 10),
                        tokens=tokens)
            results: dict[str, list[Result]] = {target.name: [] for target in targets}
            cpu: dict[str, float] = {target.name: 0.0 for target in targets}
            for block in range(blocks):
                order = targets if block % 2 == 0 else list(reversed(targets))
                for target in order:
                    result, cpu_s = measure(target, stream=stream, concurrency=concurrency, requests=requests,
                                            tokens=tokens)
                    results[target.name].append(result)
                    cpu[target.name] += cpu_s
            direct = summarise(results["direct"], 0.0)
            for target in targets:
                row = {"target": target.name, "stream": stream, "concurrency": concurrency,
                       **summarise(results[target.name], cpu[target.name])}
                if target.name != "direct" and "p50_ms" in row and "p50_ms" in direct:
                    for q in (50, 95, 99):
                        row[f"added_p{q}_ms"] = row[f"p{q}_ms"] - direct[f"p{q}_ms"]
                rows.append(row)
                print(json.dumps({key: round(value, 3) if isinstance(value, float) else value
                                  for key, value in row.items() if key != "error_samples"}), flush=True)
    return rows


def relay_run(target: Target, *, relay_tokens: int, concurrency: int, requests: int) -> dict:
    measure(target, stream=True, concurrency=concurrency, requests=2, tokens=relay_tokens)
    result, cpu_s = measure(target, stream=True, concurrency=concurrency, requests=requests, tokens=relay_tokens)
    summary = summarise([result], cpu_s)
    summary.update({"target": target.name, "relay_tokens": relay_tokens, "concurrency": concurrency,
                    "chunks_per_cpu_s": summary["chunks"] / cpu_s if cpu_s else None})
    print(json.dumps({key: value for key, value in summary.items() if key != "error_samples"}), flush=True)
    return summary


def start_floor(upstream_port: int, port: int, mode: str, log: Path) -> ManagedProcess:
    env = {**os.environ, "FLOOR_UPSTREAM": f"http://127.0.0.1:{upstream_port}", "FLOOR_MODE": mode,
           "PYTHONPATH": str(REPO)}
    proc = ManagedProcess(name=f"floor-{mode}", command=[sys.executable, "-m", "uvicorn", "bench.relay_floor:app",
                                                          "--host", "127.0.0.1", "--port", str(port),
                                                          "--no-access-log", "--log-level", "warning"],
                          log_path=log, env=env).start()
    proc.wait_http_ok(f"http://127.0.0.1:{port}/health", 30, port=port)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--modes", default="json,stream", help="json (non-streaming) and/or stream")
    parser.add_argument("--hidden-sizes", default="576,4096,8192")
    parser.add_argument("--virtual-tokens", type=int, default=100,
                        help="soft prompt length (the paper's default prompt is ~100 tokens)")
    parser.add_argument("--artifact-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--serve-dtype", default=None,
                        help="models[].embeds_dtype for the gateway (default: the gateway's default)")
    parser.add_argument("--tokens", type=int, default=8, help="answer tokens (stream chunks) per request")
    parser.add_argument("--requests-per-slot", type=int, default=10, help="requests per block = this x concurrency")
    parser.add_argument("--min-requests", type=int, default=200)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--relay-tokens", type=int, default=1000, help="0 skips the relay run")
    parser.add_argument("--upstream-pace-ms", type=float, default=0.0,
                        help="the upstream writes stream events one at a time, this many ms apart (as vLLM does)")
    parser.add_argument("--floor", action="store_true",
                        help="also relay through bench/relay_floor.py (raw ASGI and Starlette) in the relay run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    upstream_port, gateway_port, litellm_port = free_port(), free_port(), free_port()
    while len({upstream_port, gateway_port, litellm_port}) < 3:
        litellm_port = free_port()
    hidden_sizes = [int(value) for value in args.hidden_sizes.split(",") if value]
    artifact_dtype = getattr(torch, args.artifact_dtype)
    artifacts = {f"soft{hidden}": str(soft_prompt_artifact(work, hidden, args.virtual_tokens, artifact_dtype))
                 for hidden in hidden_sizes}
    model: dict = {"name": "bench", "upstream_model": "instant", "artifacts": artifacts}
    if args.serve_dtype:
        model["embeds_dtype"] = args.serve_dtype
    config = {"upstream_urls": [f"http://127.0.0.1:{upstream_port}"], "models": [model],
              "api_keys": [{"name": "bench", "sha256": hashlib.sha256(API_KEY.encode()).hexdigest()}]}
    config_path = work / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with servers_stopped_on_exit() as processes:  # also on SIGTERM/SIGINT/SIGHUP: no server is left behind
        upstream = start_upstream(upstream_port, work / "upstream.log", args.upstream_pace_ms)
        processes.append(upstream)
        gateway = start_gateway(config_path, port=gateway_port, log_path=work / "gateway.log")
        processes.append(gateway)
        gateway_url = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
        targets = [Target("direct", f"http://127.0.0.1:{upstream_port}/v1/chat/completions", "instant", None),
                   Target("gateway:text", gateway_url, "bench@default", gateway, API_KEY)]
        targets += [Target(f"gateway:{name}", gateway_url, f"bench@{name}", gateway, API_KEY) for name in artifacts]
        litellm_version = None
        if not args.no_litellm:
            if not LITELLM.exists():
                sys.exit(f"{LITELLM} not found: run `make setup-litellm` or pass --no-litellm")
            litellm = start_litellm(upstream_port, litellm_port, work)
            processes.append(litellm)
            targets.append(Target("litellm", f"http://127.0.0.1:{litellm_port}/v1/chat/completions", "bench",
                                  litellm, API_KEY))
            litellm_version = subprocess.run([str(LITELLM.parent / "python"), "-c",
                                              "import importlib.metadata as m; print(m.version('litellm'))"],
                                             capture_output=True, text=True).stdout.strip()
        streams = [mode == "stream" for mode in args.modes.split(",")]
        rows = run_grid(targets, concurrencies=[int(c) for c in args.concurrency.split(",")], streams=streams,
                        blocks=args.blocks, tokens=args.tokens,
                        requests_for=lambda c: max(args.min_requests, args.requests_per_slot * c))
        relay = []
        if args.relay_tokens:
            relay_targets = targets[1:3]
            if args.floor:
                for mode in ("raw", "starlette"):
                    port = free_port()
                    floor = start_floor(upstream_port, port, mode, work / f"floor-{mode}.log")
                    processes.append(floor)
                    relay_targets.append(Target(f"floor:{mode}", f"http://127.0.0.1:{port}/v1/chat/completions",
                                                "instant", floor))
            for target in relay_targets:
                relay.append(relay_run(target, relay_tokens=args.relay_tokens, concurrency=8, requests=64))
        report = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_average_at_end": os.getloadavg()},
            "settings": {**vars(args), "out": str(args.out)},
            "litellm_version": litellm_version,
            "rows": rows,
            "relay": relay,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(report, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
