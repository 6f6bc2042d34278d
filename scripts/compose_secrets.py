"""Make the secrets `docker compose up` requires, and name them in .env (docs/deploy.md, "Secrets").

    python3 scripts/compose_secrets.py                  # deploy/secrets/ and .env (from .env.example)
    python3 scripts/compose_secrets.py --key-name alice --grant 'qwen2.5-coder-0.5b-instruct'

Writes into --dir (default deploy/secrets/, git-ignored):
  api-keys.yaml   the gateway's client keys, as sha256 digests only (mounted into the gateway);
  <name>.key      the client key itself, mode 0600: hand it to the client, it is not stored elsewhere;
  metrics-token   the bearer token Prometheus sends to scrape the gateway's /metrics (mounted into
                  Prometheus; mode 0644, because Prometheus reads it as user nobody);
and sets in --env (default .env, created from .env.example when missing):
  VLLM_API_KEY                  vLLM's key, held by vLLM and the gateway only;
  GATEWAY_METRICS_TOKEN_SHA256  the metrics token's digest, for the gateway;
  API_KEYS_FILE, METRICS_TOKEN_FILE  the two mounted files.
Existing secrets are kept unless --force: running it twice changes nothing. Python's standard
library only, so it runs before any setup.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_secret(path: Path, text: str, mode: int) -> None:
    """Create `path` with `mode` from the start (no moment with wider permissions)."""
    path.unlink(missing_ok=True)
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    os.chmod(path, mode)  # umask may have narrowed it


def set_env(env_path: Path, values: dict[str, str], force: bool) -> dict[str, str]:
    """Set each KEY=VALUE in the env file (replacing an empty or, with force, any existing value).

    Returns the values now in effect (an existing non-empty value wins without force)."""
    if not env_path.exists():
        env_path.write_text((ROOT / ".env.example").read_text())
    lines = env_path.read_text().splitlines()
    effective: dict[str, str] = {}
    for key, value in values.items():
        index = next((i for i, line in enumerate(lines) if line.split("=", 1)[0].strip() == key), None)
        current = lines[index].split("=", 1)[1].strip() if index is not None else ""
        if current and not force:
            effective[key] = current
            continue
        if index is None:
            lines.append(f"{key}={value}")
        else:
            lines[index] = f"{key}={value}"
        effective[key] = value
    env_path.write_text("\n".join(lines) + "\n")
    os.chmod(env_path, 0o600)  # it now holds vLLM's key
    return effective


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=ROOT / "deploy" / "secrets")
    parser.add_argument("--env", type=Path, default=ROOT / ".env")
    parser.add_argument("--key-name", default="admin", help="holder of the client key to create")
    parser.add_argument(
        "--grant",
        action="append",
        default=None,
        help="model grant of that key (repeatable; default '*': every safety variant, not 'none')",
    )
    parser.add_argument("--force", action="store_true", help="replace existing secrets")
    args = parser.parse_args(argv)

    folder = args.dir.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    keys_file, token_file = folder / "api-keys.yaml", folder / "metrics-token"
    key_file = folder / f"{args.key_name}.key"
    created = []
    if args.force or not keys_file.exists():
        client_key = "sk-" + secrets.token_urlsafe(32)
        grants = ", ".join(f'"{grant}"' for grant in (args.grant or ["*"]))
        write_secret(key_file, client_key + "\n", 0o600)
        write_secret(
            keys_file, f'- name: "{args.key_name}"\n  sha256: "{sha256(client_key)}"\n  models: [{grants}]\n', 0o644
        )
        created += [str(keys_file), str(key_file)]
    if args.force or not token_file.exists():
        write_secret(token_file, secrets.token_urlsafe(32) + "\n", 0o644)
        created.append(str(token_file))
    token = token_file.read_text().strip()
    effective = set_env(
        args.env,
        {
            "VLLM_API_KEY": secrets.token_hex(32),
            "GATEWAY_METRICS_TOKEN_SHA256": sha256(token),
            "API_KEYS_FILE": str(keys_file),
            "METRICS_TOKEN_FILE": str(token_file),
        },
        args.force,
    )
    if effective["GATEWAY_METRICS_TOKEN_SHA256"] != sha256(token):
        print(
            f"error: {args.env} names a metrics token digest that is not {token_file}'s; rerun with --force",
            file=sys.stderr,
        )
        return 1
    for path in created:
        print(f"wrote {path}", file=sys.stderr)
    print(
        f"set VLLM_API_KEY, GATEWAY_METRICS_TOKEN_SHA256, API_KEYS_FILE, METRICS_TOKEN_FILE in {args.env}",
        file=sys.stderr,
    )
    if key_file.exists():
        print(f"client key of {args.key_name!r}: {key_file} (send it as 'Authorization: Bearer KEY')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
