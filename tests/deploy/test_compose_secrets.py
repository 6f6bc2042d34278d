"""scripts/compose_secrets.py: the secrets compose requires, made once, named in .env, usable by the gateway."""

from __future__ import annotations

import hashlib
import importlib.util
import stat
from pathlib import Path

from gateway.auth import KeyRing
from gateway.settings import ModelConfig, Settings
from tests.deploy.compose_model import load_compose, read_env_file

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("compose_secrets", REPO / "scripts" / "compose_secrets.py")
assert _spec and _spec.loader
compose_secrets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compose_secrets)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secrets_are_made_once_and_fit_the_gateway_and_compose(tmp_path: Path) -> None:
    folder, env_path = tmp_path / "secrets", tmp_path / ".env"
    assert compose_secrets.main(["--dir", str(folder), "--env", str(env_path), "--key-name", "alice"]) == 0
    env = read_env_file(env_path)
    key = (folder / "alice.key").read_text().strip()
    token = (folder / "metrics-token").read_text().strip()
    assert _mode(folder / "alice.key") == 0o600 and _mode(env_path) == 0o600
    assert _mode(folder / "metrics-token") == 0o644  # Prometheus reads it as user nobody
    assert env["GATEWAY_METRICS_TOKEN_SHA256"] == hashlib.sha256(token.encode()).hexdigest()
    assert len(env["VLLM_API_KEY"]) == 64 and env["API_KEYS_FILE"] == str(folder / "api-keys.yaml")
    assert key not in (folder / "api-keys.yaml").read_text()
    ring = KeyRing.from_settings(Settings(require_api_keys=True, api_keys_file=env["API_KEYS_FILE"],
                                          models=[ModelConfig(name="m")]))
    holder = ring.authenticate(f"Bearer {key}")
    assert holder is not None and holder.name == "alice"
    assert holder.may_use("m", "dro") and not holder.may_use("m", "none")
    # Compose starts with this .env once the Grafana password is set.
    compose = load_compose(REPO / "docker-compose.yml", {**env, "GRAFANA_ADMIN_PASSWORD": "pw"})
    assert compose["services"]["gateway"]["environment"]["GATEWAY_UPSTREAM_API_KEY"] == env["VLLM_API_KEY"]

    # A second run keeps every secret; --force replaces them.
    assert compose_secrets.main(["--dir", str(folder), "--env", str(env_path), "--key-name", "alice"]) == 0
    assert read_env_file(env_path) == env and (folder / "alice.key").read_text().strip() == key
    assert compose_secrets.main(["--dir", str(folder), "--env", str(env_path), "--key-name", "alice", "--force"]) == 0
    again = read_env_file(env_path)
    assert again["VLLM_API_KEY"] != env["VLLM_API_KEY"] and (folder / "alice.key").read_text().strip() != key
