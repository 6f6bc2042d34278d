"""Reading docker-compose.yml as Compose does, without a Docker engine: `.env` files, variable
interpolation (`${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`,
`${VAR:+alt}`, `$$`), profiles, short-syntax volumes and ports, networks and aliases.

Knows the Compose specification's rules for these; knows nothing about this project's services.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*)|(?P<invalid>))"
)


class InterpolationError(ValueError):
    """A required variable is missing (`${VAR:?message}`) or a `$` expression is malformed."""


# What a user's .env holds beyond .env.example once scripts/compose_secrets.py ran and the Grafana
# password is set: the values every required variable gets in the tests.
TEST_SECRETS = {
    "GRAFANA_ADMIN_PASSWORD": "test-password",
    "VLLM_API_KEY": "test-key",
    "GATEWAY_METRICS_TOKEN_SHA256": "0" * 64,
    "API_KEYS_FILE": "/secrets/api-keys.yaml",
    "METRICS_TOKEN_FILE": "/secrets/metrics-token",
}


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file; comments and blank lines ignored, quotes stripped."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise ValueError(f"{path}:{number}: not a KEY=VALUE line: {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("invalid") is not None:
            raise InterpolationError(f"invalid interpolation in {text!r}")
        name = match.group("braced") or match.group("plain")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset_or_empty else value
        if op in (":?", "?"):
            if unset_or_empty:
                raise InterpolationError(f"required variable {name} is missing: {arg}")
            return value
        if op in (":+", "+"):
            return "" if unset_or_empty else arg
        return value or ""

    if "${" in text and re.search(r"\$\{[^}]*\$\{", text):
        raise InterpolationError(f"nested interpolation is not supported here: {text!r}")
    return _VARIABLE.sub(substitute, text)


def interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


def referenced_variables(text: str) -> dict[str, list[tuple[str | None, str]]]:
    """Every variable the file references, with each (operator, argument) it is used with."""
    found: dict[str, list[tuple[str | None, str]]] = {}
    for match in _VARIABLE.finditer(text):
        name = match.group("braced") or match.group("plain")
        if name:
            found.setdefault(name, []).append((match.group("op"), match.group("arg") or ""))
    return found


@dataclass(frozen=True)
class BindMount:
    source: str
    target: str
    read_only: bool


def load_compose(path: Path, env: dict[str, str]) -> dict[str, Any]:
    return interpolate_tree(yaml.safe_load(path.read_text()), env)


def active_services(compose: dict[str, Any], profiles: set[str]) -> dict[str, dict[str, Any]]:
    """Services without profiles, plus those with one of `profiles`."""
    return {name: service for name, service in compose["services"].items()
            if not service.get("profiles") or set(service["profiles"]) & profiles}


def bind_mounts(service: dict[str, Any]) -> list[BindMount]:
    """Host-path mounts of a service (short syntax `SOURCE:TARGET[:MODE]`); named volumes excluded."""
    mounts = []
    for volume in service.get("volumes", []):
        if not isinstance(volume, str):
            raise ValueError(f"long-syntax volume not handled here: {volume!r}")
        source, target, *mode = volume.split(":")
        if source.startswith((".", "/", "~")):
            mounts.append(BindMount(source, target, read_only=mode == ["ro"]))
    return mounts


def named_volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Named volume -> container path."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if not source.startswith((".", "/", "~")):
            mounts[source] = target
    return mounts


@dataclass(frozen=True)
class PublishedPort:
    host_ip: str | None
    host_port: int
    container_port: int


def published_ports(service: dict[str, Any]) -> list[PublishedPort]:
    ports = []
    for spec in service.get("ports", []):
        parts = str(spec).split(":")
        if len(parts) == 3:
            ports.append(PublishedPort(parts[0], int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            ports.append(PublishedPort(None, int(parts[0]), int(parts[1])))
        else:
            raise ValueError(f"port {spec!r}: publish host and container ports explicitly")
    return ports


def service_networks(service: dict[str, Any]) -> dict[str, list[str]]:
    """Network -> aliases of the service on it."""
    networks = service.get("networks", ["default"])
    if isinstance(networks, list):
        return {name: [] for name in networks}
    return {name: list((config or {}).get("aliases", [])) for name, config in networks.items()}


def hosts_on_network(services: dict[str, dict[str, Any]], network: str) -> dict[str, str]:
    """Host name -> service, for every service (by name and alias) attached to `network`."""
    hosts: dict[str, str] = {}
    for name, service in services.items():
        aliases = service_networks(service).get(network)
        if aliases is not None:
            for host in [name, *aliases]:
                hosts[host] = name
    return hosts
