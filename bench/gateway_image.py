"""Size and start-up time of gateway images (docs/deploy.md, "The gateway image without torch").

    PYTHONPATH=. .venv/bin/python bench/gateway_image.py --image dro-gateway:local \\
        --image dro-gateway:before-torch=/tmp/before/artifacts --runs 7 --out docs/performance/gateway_image.json

Each `--image NAME[=ARTIFACTS]` is started `--runs` times, the images alternating (ABAB), with the
same config: one model with the committed Qwen `dro` artifact from ARTIFACTS (default: the project's
artifacts/; an image of an older artifact format needs the artifacts of its own commit). Start-up
= `docker run` called -> the first 200 from /health, polled every 20 ms on loopback (host
network); the gateway has then loaded and checked its artifact and serves. The upstream is a closed
port: /health does not need vLLM. Reported: image size (docker image inspect), and the minimum,
median and maximum start-up of the runs; also the resident memory after start (docker stats).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """upstream_urls: [http://127.0.0.1:9]
models:
  - name: qwen2.5-coder-0.5b-instruct
    default_variant: dro
    artifacts: {dro: /artifacts/qwen2.5-coder-0.5b-instruct/dro}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_once(image: str, artifacts: Path, config: Path) -> tuple[float, float]:
    """Seconds from `docker run` to /health 200, and resident MiB just after."""
    port = free_port()
    started = time.monotonic()
    container = subprocess.run(
        [
            "docker",
            "run",
            "-d",
            "--rm",
            "--network",
            "host",
            "-e",
            "GATEWAY_CONFIG=/etc/gw/config.yaml",
            "-v",
            f"{config}:/etc/gw/config.yaml:ro",
            "-v",
            f"{artifacts}:/artifacts:ro",
            image,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > 120:
                logs = subprocess.run(["docker", "logs", container], capture_output=True, text=True)
                raise RuntimeError(f"{image} did not start: {logs.stderr[-2000:]}")
            time.sleep(0.02)
        elapsed = time.monotonic() - started
        stats = (
            subprocess.run(
                ["docker", "stats", "--no-stream", "--format", "{{.MemUsage}}", container],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.split("/")[0]
            .strip()
        )
        return elapsed, to_mib(stats)
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)


def to_mib(text: str) -> float:
    units = {"KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0, "B": 1 / 2**20}
    for unit, factor in units.items():
        if text.endswith(unit):
            return round(float(text[: -len(unit)]) * factor, 1)
    raise ValueError(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", action="append", required=True, help="NAME[=ARTIFACTS_DIR]")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    images = {}
    for item in args.image:
        name, _, folder = item.partition("=")
        images[name] = Path(folder or ROOT / "artifacts").resolve()
    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "config.yaml"
        config.write_text(CONFIG)
        config.chmod(0o644)
        timings: dict[str, list[float]] = {name: [] for name in images}
        memory: dict[str, list[float]] = {name: [] for name in images}
        for run in range(args.runs):
            for name, artifacts in images.items():
                seconds, mib = start_once(name, artifacts, config)
                timings[name].append(seconds)
                memory[name].append(mib)
                print(f"run {run + 1} {name}: {seconds:.2f} s, {mib} MiB", file=sys.stderr, flush=True)
    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "runs": args.runs, "images": {}}
    for name in images:
        size = subprocess.run(
            ["docker", "image", "inspect", "--format", "{{.Size}}", name], capture_output=True, text=True, check=True
        ).stdout.strip()
        values = sorted(timings[name])
        result["images"][name] = {
            "size_mb": round(int(size) / 1e6),
            "startup_s_min": round(values[0], 2),
            "startup_s_median": round(statistics.median(values), 2),
            "startup_s_max": round(values[-1], 2),
            "rss_mib_median": statistics.median(memory[name]),
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
