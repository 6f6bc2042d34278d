"""The YAML examples in docs/deploy.md are checked like code: each gateway config loads through the
real settings and names upstreams that exist; each compose override, merged over
docker-compose.yml as Compose merges it (`extends`, `!override`), still matches the Compose schema
and adds replicas on distinct GPUs, unpublished, on the internal network.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.settings import Settings
from tests.deploy.compose_model import (
    TEST_SECRETS,
    hosts_on_network,
    interpolate_tree,
    published_ports,
    read_env_file,
    service_networks,
)

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "deploy.md"
KINDS = ("# compose override:", "# gateway config:")


class Override:
    """A value tagged `!override`: replaces the base value instead of merging with it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!override", lambda loader, node: Override(
    loader.construct_sequence(node, deep=True) if isinstance(node, yaml.SequenceNode)
    else loader.construct_mapping(node, deep=True)))


def yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)


def blocks_of(kind: str) -> list[str]:
    return [block for block in yaml_blocks() if block.startswith(kind)]


def merge(base: Any, override: Any) -> Any:
    if isinstance(override, Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else unwrap(value)
        return merged
    assert not isinstance(override, list), "only !override sequences are used in the examples"
    return override


def unwrap(value: Any) -> Any:
    if isinstance(value, Override):
        return value.value
    if isinstance(value, dict):
        return {key: unwrap(item) for key, item in value.items()}
    return value


def merged_compose(override_text: str) -> dict:
    base = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    override = yaml.load(override_text, Loader=ComposeLoader)
    result = copy.deepcopy(base)
    for name, service in override["services"].items():
        service = dict(service)
        extends = service.pop("extends", None)
        if extends is not None:
            assert extends["file"] == "docker-compose.yml"
            start = copy.deepcopy(base["services"][extends["service"]])
        else:
            start = result["services"][name]
        result["services"][name] = merge(start, service)
    env = read_env_file(REPO / ".env.example")
    env.update(TEST_SECRETS)
    return interpolate_tree(result, env)


def test_every_yaml_example_is_of_a_checked_kind() -> None:
    blocks = yaml_blocks()
    assert blocks
    for block in blocks:
        assert block.startswith(KINDS), block.splitlines()[0]


@pytest.mark.parametrize("block", blocks_of("# compose override:"))
def test_compose_override_example_is_valid_and_adds_gpu_replicas(block: str) -> None:
    compose = merged_compose(block)
    schema = json.loads((Path(__file__).parent / "compose_spec" / "compose-spec.json").read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(compose)]
    assert errors == []
    gpu_services = {name: s for name, s in compose["services"].items() if "gpu" in s.get("profiles", [])}
    assert len(gpu_services) >= 2
    seen_devices: set[str] = set()
    for name, service in gpu_services.items():
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert not ("count" in device and "device_ids" in device), f"{name}: Docker refuses count with device_ids"
        assert not seen_devices & set(device["device_ids"]), f"{name} shares a GPU"
        seen_devices |= set(device["device_ids"])
        assert published_ports(service) == []
        assert "backend" in service_networks(service)
        assert service["command"] == compose["services"]["vllm"]["command"]


@pytest.mark.parametrize("block", blocks_of("# gateway config:"))
def test_gateway_config_example_loads_and_names_existing_upstreams(
        block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(block)
    for key in [k for k in os.environ if k.startswith("GATEWAY_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("GATEWAY_CONFIG", str(config))
    settings = Settings()
    overrides = blocks_of("# compose override:")
    compose = merged_compose(overrides[0]) if overrides else merged_compose("services: {}")
    gpu = {n: s for n, s in compose["services"].items() if "cpu" not in s.get("profiles", [])}
    hosts = hosts_on_network(gpu, "backend")
    for url in settings.upstream_urls:
        host = url.removeprefix("http://").split(":")[0]
        assert host in hosts, f"{url}: no such service on the backend network"
    assert [m.name for m in settings.models] == [read_env_file(REPO / ".env.example")["SERVED_MODEL_NAME"]]
