"""Benchmark: the same requests through the gateway and straight to a real vLLM CPU server, in
alternating blocks (issue 12; figures in docs/performance.md).

    PYTHONPATH=. .venv/bin/python bench/gateway_vs_vllm.py --out docs/performance/vs_vllm.json

Starts vLLM's CPU build on a real small chat model (`--model smollm2`, the embedded default of
the tests' machine kind, or `qwen`, or a folder) and the gateway in front of it (one worker, judge
and metrics on). Two pairs are compared, each sending vLLM exactly the same prompt both ways:

- `none`: the gateway's `MODEL@none` against the bare messages sent to vLLM;
- `default`: the gateway's `MODEL@default` (it adds the human safety prompt) against the same
  system message written by the client and sent to vLLM;
- `soft`: the gateway's `MODEL@soft`, a random soft prompt of `--soft-tokens` rows at the model's
  hidden size, against the same `prompt_embeds` system message built by the client (same dtype).

`--vllm-python` and `--vllm-arg` run another vLLM build (a GPU one, `--load-format dummy` for random
weights of a model shape; bench/gpu_gateway_check.py does that).

Greedy, `--tokens` tokens, streaming (so time to first token is seen), closed loop at each
concurrency; blocks alternate direct/gateway (ABBA) so slow drifts of a shared machine cancel.
Reported: median and p95 latency each way, their ratio (gateway / direct), and time to first token.
`--paired N` adds N requests each way per pair sent one after the other (the order alternating), and
the mean of the N paired differences (gateway - direct) with its 95% interval, and their quartiles:
on 2 shared cores the machine's speed drifts within minutes,
which blocks of requests average over but a pair taken seconds apart does not see. `--pin 0:1` runs
vLLM on CPU 0 and the gateway with the load generator on CPU 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch
import yaml

from bench.loadgen import Result, percentile, run_load
from safeprompt.artifact import Manifest, read_model_info
from safeprompt.artifact_write import save_artifact
from safeprompt.embeds import prompt_embeds_part
from safeprompt.files import atomic_write_text
from safeprompt.prompts import HUMAN_PROMPTS
from safeprompt.torch_payload import encode_prompt_embeds
from stack.processes import (
    VLLM_PYTHON,
    ManagedProcess,
    free_port,
    lists_model,
    servers_stopped_on_exit,
    start_gateway,
    vllm_command,
    vllm_env,
)
from stack.vllm import prepare_model

QUESTION = {"role": "user", "content": "Give me one tip for writing clear emails."}


def body(model: str, system: str | list | None, tokens: int) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [QUESTION]
    return {"model": model, "messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True}


def run(url: str, request: dict, concurrency: int, requests: int) -> Result:
    return asyncio.run(run_load(url, request, concurrency=concurrency, requests=requests, timeout_s=300))


def summary(results: list[Result]) -> dict:
    latencies = [value for result in results for value in result.latencies_s]
    first = [value for result in results for value in result.first_token_s]
    return {"requests": len(latencies), "errors": sum(len(result.errors) for result in results),
            "p50_ms": 1000 * percentile(latencies, 50) if latencies else None,
            "p95_ms": 1000 * percentile(latencies, 95) if latencies else None,
            "ttft_p50_ms": 1000 * percentile(first, 50) if first else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, qwen or a Hugging Face model folder")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--requests-per-slot", type=int, default=6, help="requests per block = this x concurrency")
    parser.add_argument("--blocks", type=int, default=8, help="even: ABBA order")
    parser.add_argument("--soft-tokens", type=int, default=100, help="rows of the soft prompt; 0: no soft pair")
    parser.add_argument("--vllm-python", type=Path, default=VLLM_PYTHON)
    parser.add_argument("--vllm-arg", action="append", default=[], help="extra vLLM argument (repeatable)")
    parser.add_argument("--dtype", default=None, help="vLLM --dtype; soft prompts are sent in it")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--ready-timeout-s", type=float, default=600)
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="also N single requests each way per pair, one after the other, order alternating; "
                             "reports the paired differences' mean with a 95%% interval (N >= 30: a normal "
                             "approximation) and quartiles; an empty --concurrency skips the rest")
    parser.add_argument("--pin", default=None, metavar="VLLM_CPUS:GATEWAY_CPUS",
                        help="e.g. 0:1: vLLM on CPU 0; the gateway and this load generator on CPU 1 (Linux)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-vs-vllm-"))
    if args.paired and args.paired < 30:
        parser.error("--paired takes 0 or at least 30 pairs (its interval is a normal approximation)")
    pin = tuple(args.pin.split(":")) if args.pin else None
    if pin is not None and (len(pin) != 2 or not all(pin)):
        parser.error("--pin takes VLLM_CPUS:GATEWAY_CPUS, e.g. 0:1")
    model_dir = prepare_model(args.model)
    name = "bench-model"
    vllm_port, gateway_port = free_port(), free_port()
    while gateway_port == vllm_port:
        gateway_port = free_port()
    info = read_model_info(model_dir)
    serving = args.dtype or info.dtype or "float32"
    soft = None
    model: dict = {"name": name, "model_path": str(model_dir), "embeds_dtype": serving}
    if args.soft_tokens:
        soft = torch.randn(args.soft_tokens, info.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
        manifest = Manifest(name="soft", base_model=str(model_dir), hidden_size=info.hidden_size,
                            num_virtual_tokens=args.soft_tokens, chat_template_sha256=info.chat_template_sha256,
                            dtype="float32", origin="test")
        model["artifacts"] = {"soft": str(save_artifact(work / "soft", manifest, {"soft_prompt": soft}))}
    config = {"upstream_urls": [f"http://127.0.0.1:{vllm_port}"], "models": [model]}
    (work / "gateway.yaml").write_text(yaml.safe_dump(config))
    with servers_stopped_on_exit() as processes:  # also on SIGTERM/SIGINT/SIGHUP: no server is left behind
        command = vllm_command(
            model_dir, served_model_name=name, port=vllm_port, dtype=args.dtype, max_model_len=args.max_model_len,
            python=args.vllm_python, extra_args=tuple(args.vllm_arg))
        if pin is not None:  # vLLM's CPU threads are not bound by vLLM here (nobind): the OS affinity holds
            command = ["taskset", "--cpu-list", pin[0], *command]
        vllm = ManagedProcess(name="vllm", log_path=work / "vllm.log", env=vllm_env(), command=command).start()
        processes.append(vllm)
        vllm.wait_http_ok(f"http://127.0.0.1:{vllm_port}/v1/models", args.ready_timeout_s, port=vllm_port,
                          accept=lists_model(name))
        if pin is not None:  # the gateway inherits it, and the load generator runs on it too
            os.sched_setaffinity(0, cpu_list(pin[1]))
        processes.append(start_gateway(work / "gateway.yaml", port=gateway_port, log_path=work / "gateway.log"))
        direct_url = f"http://127.0.0.1:{vllm_port}/v1/chat/completions"
        gateway_url = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
        pairs = {
            "none": (body(name, None, args.tokens), body(f"{name}@none", None, args.tokens)),
            "default": (body(name, HUMAN_PROMPTS["default"], args.tokens),
                        body(f"{name}@default", None, args.tokens)),
        }
        if soft is not None:
            part = prompt_embeds_part(encode_prompt_embeds(soft, serving))
            pairs["soft"] = (body(name, [part], args.tokens), body(f"{name}@soft", None, args.tokens))
        rows = []
        for concurrency in [int(value) for value in args.concurrency.split(",") if value]:
            requests = args.requests_per_slot * concurrency
            for pair, (direct_body, gateway_body) in pairs.items():
                run(direct_url, direct_body, concurrency, concurrency)  # warm-up
                run(gateway_url, gateway_body, concurrency, concurrency)
                direct: list[Result] = []
                through: list[Result] = []
                for block in range(args.blocks):
                    gateway_first = block % 4 in (1, 2)  # A B B A
                    order = [(through, gateway_url, gateway_body), (direct, direct_url, direct_body)]
                    for results, url, request in (order if gateway_first else order[::-1]):
                        results.append(run(url, request, concurrency, requests))
                d, g = summary(direct), summary(through)
                row = {"pair": pair, "concurrency": concurrency, "direct": d, "gateway": g,
                       "p50_ratio": g["p50_ms"] / d["p50_ms"], "p95_ratio": g["p95_ms"] / d["p95_ms"],
                       "ttft_ratio": (g["ttft_p50_ms"] / d["ttft_p50_ms"]) if d["ttft_p50_ms"] and g["ttft_p50_ms"]
                       else None}
                rows.append(row)
                print(json.dumps(row), flush=True)
        for pair, (direct_body, gateway_body) in pairs.items() if args.paired else ():
            row = paired_row(pair, direct_url, direct_body, gateway_url, gateway_body, args.paired)
            rows.append(row)
            print(json.dumps(row), flush=True)
        report = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "pin": args.pin,
                        "load_average_at_end": os.getloadavg()},
            "model": str(model_dir.name),
            "serving_dtype": serving,
            "settings": {**vars(args), "out": str(args.out)},
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(report, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")


def paired_row(pair: str, direct_url: str, direct_body: dict, gateway_url: str, gateway_body: dict, n: int) -> dict:
    """`n` requests each way at concurrency 1, direct and gateway back to back (order alternating), so
    that each difference is taken over seconds, not over the minutes the machine's speed drifts in."""
    run(direct_url, direct_body, 1, 1)  # warm-up
    run(gateway_url, gateway_body, 1, 1)
    total: list[float] = []
    first: list[float] = []
    direct: list[Result] = []
    through: list[Result] = []
    for index in range(n):
        sides = [(direct, direct_url, direct_body), (through, gateway_url, gateway_body)]
        for results, url, request in sides if index % 2 == 0 else sides[::-1]:
            results.append(run(url, request, 1, 1))
        d, g = direct[-1], through[-1]
        if d.latencies_s and g.latencies_s:
            total.append(g.latencies_s[0] - d.latencies_s[0])
        if d.first_token_s and g.first_token_s:
            first.append(g.first_token_s[0] - d.first_token_s[0])
    d_summary, g_summary = summary(direct), summary(through)
    both = d_summary["p50_ms"] and g_summary["p50_ms"]
    return {"pair": pair, "mode": "paired", "concurrency": 1, "direct": d_summary, "gateway": g_summary,
            "pairs": n, "pairs_with_a_failed_side": n - len(total),
            "p50_ratio": g_summary["p50_ms"] / d_summary["p50_ms"] if both else None,
            # alternating the order cancels a steady drift in the mean; the quartiles show the spread
            "paired_diff_mean_ms": 1000 * sum(total) / len(total) if total else None,
            "paired_diff_mean_ci95_ms": mean_interval_ms(total),
            "paired_diff_p25_p50_p75_ms": quartiles_ms(total),
            "paired_ttft_diff_mean_ms": 1000 * sum(first) / len(first) if first else None,
            "paired_ttft_diff_mean_ci95_ms": mean_interval_ms(first),
            "paired_ttft_diff_p25_p50_p75_ms": quartiles_ms(first)}


def quartiles_ms(values: list[float]) -> list[float] | None:
    """First quartile, median and third quartile in ms (interpolated; None under two values)."""
    if len(values) < 2:
        return None
    return [1000 * value for value in statistics.quantiles(values, n=4, method="inclusive")]


def mean_interval_ms(values: list[float]) -> list[float] | None:
    """Normal-approximation 95% interval of the mean, in ms (None under two values)."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
    return [1000 * (mean - half), 1000 * (mean + half)]


def cpu_list(text: str) -> set[int]:
    """CPUs in taskset's list form: "1", "0,2", "2-3"."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


if __name__ == "__main__":
    main()
