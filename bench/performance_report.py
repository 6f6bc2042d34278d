"""Tables and a chart from the gateway benchmarks' JSON (docs/performance.md).

    PYTHONPATH=. .venv/bin/python bench/performance_report.py docs/performance/overhead.json \
        [--vs-vllm docs/performance/vs_vllm.json] [--chart docs/performance/overhead.png]

Prints Markdown: per mode and concurrency, each target's latency percentiles, added latency against
`direct`, requests per second and CPU milliseconds per request of its process, and the gateway's
requests per CPU-second against LiteLLM's; the relay's chunks per CPU-second; the real-vLLM ratios.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def overhead_tables(report: dict) -> str:
    rows = report["rows"]
    lines = []
    for stream in (False, True):
        mode = [row for row in rows if row["stream"] is stream]
        if not mode:
            continue
        lines += [f"**{'streaming' if stream else 'non-streaming'}** ({report['settings']['tokens']} tokens)", "",
                  "| c | target | p50 ms | p95 ms | p99 ms | added p50 / p99 ms | req/s | CPU ms/req | req per CPU-s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in mode:
            cpu = None if row["target"] == "direct" else row.get("cpu_ms_per_request")  # not measured
            added = ("" if row["target"] == "direct" else
                     f"{_f(row.get('added_p50_ms'))} / {_f(row.get('added_p99_ms'))}")
            per_cpu = f"{1000 / cpu:.0f}" if cpu else "–"
            errors = f" ({row['errors']} errors)" if row["errors"] else ""
            lines.append(f"| {row['concurrency']} | {row['target']}{errors} | {_f(row.get('p50_ms'))} | "
                         f"{_f(row.get('p95_ms'))} | {_f(row.get('p99_ms'))} | {added} | {row['rps']:.0f} | "
                         f"{_f(cpu)} | {per_cpu} |")
        lines.append("")
    ratios = []
    for row in rows:
        if row["target"] != "litellm" or not row.get("cpu_ms_per_request"):
            continue
        for other in rows:
            if (other["stream"], other["concurrency"]) == (row["stream"], row["concurrency"]) and \
                    other["target"].startswith("gateway:") and other.get("cpu_ms_per_request"):
                ratios.append((row["stream"], row["concurrency"], other["target"],
                               row["cpu_ms_per_request"] / other["cpu_ms_per_request"]))
    if ratios:
        lines += ["Requests per CPU-second, gateway ÷ LiteLLM (same load, same run):", "",
                  "| mode | c | " + " | ".join(sorted({r[2] for r in ratios})) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in sorted({r[2] for r in ratios})) + " |"]
        targets = sorted({r[2] for r in ratios})
        for stream in (False, True):
            for concurrency in sorted({r[1] for r in ratios}):
                cells = {r[2]: r[3] for r in ratios if r[0] is stream and r[1] == concurrency}
                if cells:
                    lines.append(f"| {'stream' if stream else 'json'} | {concurrency} | " +
                                 " | ".join(f"{cells[t]:.1f}x" if t in cells else "–" for t in targets) + " |")
        lines.append("")
    for relay in report.get("relay", []):
        lines.append(f"Relay, {relay['target']}: {relay['relay_tokens']} chunks a stream, concurrency "
                     f"{relay['concurrency']}, {relay['requests']} streams: "
                     f"**{relay['chunks_per_cpu_s']:.0f} chunks per CPU-second** of the gateway "
                     "(judge and metrics on).")
    return "\n".join(lines) + "\n"


def vs_vllm_table(report: dict) -> str:
    lines = ["| c | pair | direct p50 / p95 ms | gateway p50 / p95 ms | p50 ratio | p95 ratio "
             "| TTFT direct / gateway ms |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["rows"]:
        d, g = row["direct"], row["gateway"]
        lines.append(f"| {row['concurrency']} | {row['pair']} | {d['p50_ms']:.0f} / {d['p95_ms']:.0f} | "
                     f"{g['p50_ms']:.0f} / {g['p95_ms']:.0f} | {row['p50_ratio']:.3f} | {row['p95_ratio']:.3f} | "
                     f"{_f(d['ttft_p50_ms'], 0)} / {_f(g['ttft_p50_ms'], 0)} |")
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in report["rows"] if row["target"] != "direct"]
    targets = list(dict.fromkeys(row["target"] for row in rows))
    concurrencies = sorted({row["concurrency"] for row in rows})
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, stream in zip(axes, (False, True), strict=True):
        width = 0.8 / len(targets)
        for index, target in enumerate(targets):
            values = []
            for concurrency in concurrencies:
                match = [row for row in rows if (row["target"], row["concurrency"], row["stream"]) ==
                         (target, concurrency, stream)]
                values.append(match[0].get("cpu_ms_per_request") or 0 if match else 0)
            axis.bar([i + index * width for i in range(len(concurrencies))], values, width, label=target)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(concurrencies))], [str(c) for c in concurrencies])
        axis.set_xlabel("concurrency")
        axis.set_ylabel("CPU ms per request (proxy process)")
        axis.set_title("streaming" if stream else "non-streaming")
        axis.legend(fontsize=8)
    figure.suptitle(f"Proxy CPU per request in front of an instant upstream ({report['date'][:10]})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overhead", type=Path)
    parser.add_argument("--vs-vllm", type=Path)
    parser.add_argument("--chart", type=Path)
    args = parser.parse_args()
    report = json.loads(args.overhead.read_text())
    print(overhead_tables(report))
    if args.vs_vllm:
        print(vs_vllm_table(json.loads(args.vs_vllm.read_text())))
    if args.chart:
        chart(report, args.chart)
        print(f"chart: {args.chart}")


if __name__ == "__main__":
    main()
