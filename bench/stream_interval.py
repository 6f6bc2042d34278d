"""Benchmark: vLLM's `--stream-interval` behind the gateway: the gateway's CPU per token and per event.

A real vLLM CPU server (SmolLM2-135M-Instruct) started with `--stream-interval N` for each N given (in
that order, so `1,4,1,4` alternates), the gateway in front (variant `none`), 48 streamed answers of
exactly 256 tokens at concurrency 8 after a warm-up; reports the gateway process tree's CPU (psutil,
user + system) per token and per SSE event. Figures: docs/performance.md, section 4.

    PYTHONPATH=. .venv/bin/python bench/stream_interval.py 1,4,1,4 docs/performance/stream-interval.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from bench.gateway_overhead import cpu_seconds
from bench.loadgen import run_load
from safeprompt.files import atomic_write_text
from safeprompt.models import resolve_model
from stack.processes import free_port, servers_stopped_on_exit, start_gateway, start_vllm

SERVED = "smollm2-135m-instruct"
TOKENS, REQUESTS, CONCURRENCY = 256, 48, 8


def measure(interval: int, model_dir: Path, work: Path) -> dict:
    vllm_port, gateway_port = free_port(), free_port()
    with servers_stopped_on_exit() as processes:
        processes.append(start_vllm(model_dir, served_model_name=SERVED, port=vllm_port,
                                    log_path=work / f"vllm-{interval}.log",
                                    extra_args=("--stream-interval", str(interval))))
        config = {"upstream_urls": [f"http://127.0.0.1:{vllm_port}"],
                  "models": [{"name": "s", "upstream_model": SERVED, "model_path": str(model_dir),
                              "default_variant": "none"}]}
        (work / "gateway.yaml").write_text(yaml.safe_dump(config))
        gateway = start_gateway(work / "gateway.yaml", port=gateway_port, log_path=work / f"gateway-{interval}.log")
        processes.append(gateway)
        url = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
        body = {"model": "s", "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
                "max_tokens": TOKENS, "min_tokens": TOKENS, "temperature": 0, "stream": True}
        asyncio.run(run_load(url, body, concurrency=CONCURRENCY, requests=CONCURRENCY))  # warm-up
        before, started = cpu_seconds(gateway), time.perf_counter()
        result = asyncio.run(run_load(url, body, concurrency=CONCURRENCY, requests=REQUESTS, timeout_s=600))
        cpu_s, wall_s = cpu_seconds(gateway) - before, time.perf_counter() - started
    tokens = len(result.latencies_s) * TOKENS
    return {"stream_interval": interval, "requests": len(result.latencies_s), "errors": result.errors[:2],
            "chunks": result.chunks, "tokens": tokens, "gateway_cpu_s": round(cpu_s, 3), "wall_s": round(wall_s, 1),
            "gateway_us_per_token": round(1e6 * cpu_s / tokens, 1),
            "gateway_us_per_chunk": round(1e6 * cpu_s / result.chunks, 1),
            "tokens_per_s": round(tokens / wall_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("intervals", help="comma-separated stream intervals, run in this order, e.g. 1,4,1,4")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    model_dir = Path(resolve_model("smollm2"))
    work = Path(tempfile.mkdtemp(prefix="bench-stream-interval-"))
    rows = []
    for interval in (int(value) for value in args.intervals.split(",")):
        rows.append(measure(interval, model_dir, work))
        print(json.dumps(rows[-1]), flush=True)
    report = {"command": f"PYTHONPATH=. .venv/bin/python bench/stream_interval.py {args.intervals} {args.out}",
              "date": datetime.now(UTC).isoformat(timespec="seconds"), "rows": rows}
    atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
