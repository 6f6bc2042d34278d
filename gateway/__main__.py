"""`python -m gateway` / `dro-gateway`: run the gateway with uvicorn.

Settings come from the environment (`GATEWAY_*`) and the YAML file named by `GATEWAY_CONFIG`;
the settings are validated and the artifacts checked (`gateway.service.check_settings`) before
the server binds its port. The app itself is built once per worker, by uvicorn's factory.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import uvicorn
from pydantic import ValidationError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dro-gateway", description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT: stop accepting connections and let requests in flight (streams included) "
        "finish for at most this many seconds, then cancel them (default 30)",
    )
    args = parser.parse_args(argv)

    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Must be set before prometheus_client is imported by the workers.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="dro-gateway-metrics-")

    from gateway.request_log import configure_request_log
    from gateway.service import check_settings
    from gateway.settings import Settings
    from safeprompt.artifact import ArtifactError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_request_log()
    try:
        # Fail fast, before binding the port: bad settings or an artifact that does not fit.
        check_settings(Settings())
    except (ValidationError, ArtifactError, FileNotFoundError, ValueError) as exc:
        print(f"dro-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        "gateway.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        timeout_keep_alive=5,
        # Graceful drain: uvicorn stops accepting, waits for requests in flight, cancels the rest
        # after this long (a cancelled stream closes its vLLM request, which aborts the generation).
        timeout_graceful_shutdown=args.drain_timeout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
