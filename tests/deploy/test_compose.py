"""Static checks of docker-compose.yml and .env.example (no Docker engine here): the Compose
specification's schema, variables, exposure, networks, mounts, the vLLM command against the native
stack's, and the gateway's configuration. Prometheus and Grafana wiring: test_compose_monitoring.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from gateway.settings import Settings
from stack.processes import vllm_command, vllm_env
from stack.serve import MODEL_NAME, gateway_config
from tests.deploy.compose_model import (
    TEST_SECRETS,
    InterpolationError,
    active_services,
    bind_mounts,
    hosts_on_network,
    interpolate,
    load_compose,
    named_volume_mounts,
    published_ports,
    read_env_file,
    referenced_variables,
    service_networks,
)
from tests.deploy.dockerfile_parser import read_dockerfile

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
SCHEMA = Path(__file__).parent / "compose_spec" / "compose-spec.json"
VLLM_SERVICES = ("vllm", "vllm-cpu")
# Host paths the user provides (a model folder, trained artifacts); everything else mounted is in
# the repository.
USER_DATA_VARIABLES = {"MODEL_DIR", "ARTIFACTS_DIR"}
# Host files scripts/compose_secrets.py writes (outside the repository's tracked files).
SECRET_FILE_VARIABLES = {"API_KEYS_FILE", "METRICS_TOKEN_FILE"}
# Every variable compose refuses to start without.
REQUIRED_SECRETS = {"GRAFANA_ADMIN_PASSWORD", "VLLM_API_KEY", "GATEWAY_METRICS_TOKEN_SHA256", *SECRET_FILE_VARIABLES}
# Read by the compose CLI itself, not interpolated into the file.
COMPOSE_CLI_VARIABLES = {"COMPOSE_PROFILES"}
# Flags the GPU service adds to the native command (the native stack runs on CPU only).
GPU_ONLY_ARGS = ("--tensor-parallel-size", "--gpu-memory-utilization")


def example_env(**overrides: str) -> dict[str, str]:
    """.env.example with its required secrets filled in, as a user's .env would be."""
    env = read_env_file(ENV_EXAMPLE)
    env.update(TEST_SECRETS)
    env.update(overrides)
    return env


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE, example_env())


@pytest.fixture(scope="module")
def schema_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator: jsonschema.Draft7Validator, document: dict) -> list[str]:
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
            for error in validator.iter_errors(document)]


def test_compose_file_matches_the_compose_specification(schema_validator, compose) -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    assert schema_errors(schema_validator, raw) == []
    assert schema_errors(schema_validator, compose) == []


def test_schema_rejects_a_misspelt_compose_key(schema_validator) -> None:
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["gateway"]["depend_on"] = broken["services"]["gateway"].pop("depends_on")
    errors = schema_errors(schema_validator, broken)
    assert any("depend_on" in error for error in errors), errors


def test_env_example_documents_exactly_the_variables_compose_reads() -> None:
    referenced = referenced_variables(COMPOSE.read_text())
    documented = read_env_file(ENV_EXAMPLE)
    assert set(referenced) == set(documented) - COMPOSE_CLI_VARIABLES
    # The defaults written in the compose file are the values .env.example documents.
    for name, uses in referenced.items():
        for op, default in uses:
            if op in (":-", "-"):
                assert documented[name] == default, f"{name}: compose default {default!r} != .env.example"


def test_required_secrets_stop_compose_until_set() -> None:
    env = read_env_file(ENV_EXAMPLE)
    for name in sorted(REQUIRED_SECRETS):
        assert env[name] == "", name
        with pytest.raises(InterpolationError, match=name):
            load_compose(COMPOSE, example_env(**{name: ""}))
    grafana = load_compose(COMPOSE, example_env())["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "test-password"
    assert "${GRAFANA_ADMIN_PASSWORD:?" in COMPOSE.read_text()


def test_interpolation_follows_the_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $$SET $SET", env) == "x d  d $SET x"
    assert interpolate("${SET:+alt}${EMPTY:+alt}", env) == "alt"
    with pytest.raises(InterpolationError, match="EMPTY"):
        interpolate("${EMPTY:?must be set}", env)
    assert interpolate("${EMPTY?must be set}", env) == ""


@pytest.mark.parametrize("profile, vllm_service", [("gpu", "vllm"), ("cpu", "vllm-cpu")])
def test_each_profile_runs_one_vllm_that_answers_as_vllm(compose, profile: str, vllm_service: str) -> None:
    services = active_services(compose, {profile})
    assert set(services) == {vllm_service, "gateway", "prometheus", "grafana"}
    assert hosts_on_network(services, "backend")["vllm"] == vllm_service
    assert read_env_file(ENV_EXAMPLE)["COMPOSE_PROFILES"] == "gpu"


def test_only_the_gateway_is_published_beyond_loopback(compose) -> None:
    exposed = {name: published_ports(service) for name, service in compose["services"].items()}
    assert [(p.host_ip, p.host_port, p.container_port) for p in exposed["gateway"]] == [("0.0.0.0", 8000, 8000)]
    assert [(p.host_ip, p.container_port) for p in exposed["prometheus"]] == [("127.0.0.1", 9090)]
    assert [(p.host_ip, p.container_port) for p in exposed["grafana"]] == [("127.0.0.1", 3000)]
    for name in VLLM_SERVICES:
        assert exposed[name] == [] and "expose" not in compose["services"][name]
    # The gateway's container port is the one its image's command listens on.
    cmd = read_dockerfile(REPO / "Dockerfile").stage("gateway").last("CMD").exec_form()
    assert cmd[cmd.index("--port") + 1] == "8000"


def test_vllm_sits_on_the_internal_network_only(compose) -> None:
    networks = compose["networks"]
    assert networks["backend"].get("internal") is True
    services = compose["services"]
    for name in VLLM_SERVICES:
        attached = set(service_networks(services[name]))
        assert attached == {"backend", "model-download"}
    # The download network reaches the hub, so nothing else may join it.
    on_download = {n for n, s in services.items() if "model-download" in service_networks(s)}
    assert on_download == set(VLLM_SERVICES)
    assert "backend" in service_networks(services["gateway"])


@pytest.mark.parametrize("overrides", [
    {},
    {"MAX_MODEL_LEN": "8192", "SERVED_MODEL_NAME": "qwen2.5-7b-instruct", "VLLM_MODEL": "Qwen/Qwen2.5-7B-Instruct"},
], ids=["defaults", "hub-model-8k"])
@pytest.mark.parametrize("name", VLLM_SERVICES)
def test_vllm_command_is_the_native_command(name: str, overrides: dict[str, str]) -> None:
    env = example_env(**overrides)
    service = load_compose(COMPOSE, env)["services"][name]
    argv = service["entrypoint"] + service["command"]
    extra: tuple[str, ...] = ()
    if name == "vllm":
        extra = ("--tensor-parallel-size", env["VLLM_TENSOR_PARALLEL_SIZE"],
                 "--gpu-memory-utilization", env["VLLM_GPU_MEMORY_UTILIZATION"])
    expected = vllm_command(env["VLLM_MODEL"], served_model_name=env["SERVED_MODEL_NAME"], port=8000,
                            host="0.0.0.0", max_model_len=int(env["MAX_MODEL_LEN"]),
                            python=Path(argv[0]), extra_args=extra)
    assert argv == expected
    assert set(extra[::2]) <= set(GPU_ONLY_ARGS)


@pytest.mark.parametrize("gpus", ["1", "4"])
def test_gpu_vllm_reserves_as_many_gpus_as_its_tensor_parallel_degree(gpus: str) -> None:
    example = read_env_file(ENV_EXAMPLE)
    assert example["VLLM_GPU_COUNT"] == example["VLLM_TENSOR_PARALLEL_SIZE"]
    service = load_compose(COMPOSE, example_env(VLLM_GPU_COUNT=gpus, VLLM_TENSOR_PARALLEL_SIZE=gpus))["services"]["vllm"]
    [device] = service["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": gpus, "capabilities": ["gpu"]}
    command = service["command"]
    assert command[command.index("--tensor-parallel-size") + 1] == gpus


def test_cpu_vllm_gets_the_native_environment(compose, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        monkeypatch.delenv(key)
    native_keys = set(vllm_env())
    environment = compose["services"]["vllm-cpu"]["environment"]
    assert native_keys <= set(environment)
    assert environment["HF_HUB_OFFLINE"] == "1"


def test_every_mounted_path_exists_and_is_read_only(compose) -> None:
    raw_services = yaml.safe_load(COMPOSE.read_text())["services"]
    user_data_seen = set()
    for name, service in compose["services"].items():
        pairs = zip(raw_services[name].get("volumes", []), service.get("volumes", []), strict=True)
        for raw_volume, volume in pairs:
            mounts = bind_mounts({"volumes": [volume]})
            if not mounts:
                continue  # a named volume
            mount = mounts[0]
            assert mount.read_only, f"{name}: host path {mount.source} must be mounted :ro"
            variables = set(referenced_variables(raw_volume))  # only a source can hold one
            if variables:
                assert variables <= USER_DATA_VARIABLES | SECRET_FILE_VARIABLES, f"{name}: {raw_volume}"
                user_data_seen |= variables
                continue
            assert (REPO / mount.source).exists(), f"{name} mounts {mount.source}, which does not exist"
    assert user_data_seen == USER_DATA_VARIABLES | SECRET_FILE_VARIABLES


def test_the_gateway_requires_keys_and_the_metrics_token_that_only_prometheus_holds(compose) -> None:
    gateway, prometheus = compose["services"]["gateway"], compose["services"]["prometheus"]
    environment = gateway["environment"]
    assert environment["GATEWAY_REQUIRE_API_KEYS"] == "true"
    keys_mount = {m.target: m.source for m in bind_mounts(gateway)}
    assert keys_mount[environment["GATEWAY_API_KEYS_FILE"]] == "/secrets/api-keys.yaml"
    assert environment["GATEWAY_METRICS_TOKEN_SHA256"] == "0" * 64
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in scrape["scrape_configs"] if j["job_name"] == "gateway")
    token_mount = {m.target: m.source for m in bind_mounts(prometheus)}
    assert token_mount[job["authorization"]["credentials_file"]] == "/secrets/metrics-token"
    holders = [name for name, service in compose["services"].items()
               if "/secrets/metrics-token" in {m.source for m in bind_mounts(service)}]
    assert holders == ["prometheus"]


def test_only_vllm_and_the_gateway_hold_vllms_key(compose) -> None:
    holders = sorted(name for name, service in compose["services"].items()
                     if "test-key" in (service.get("environment") or {}).values())
    assert holders == ["gateway", "vllm", "vllm-cpu"]
    for name in VLLM_SERVICES:
        assert compose["services"][name]["environment"]["VLLM_API_KEY"] == "test-key"


def test_named_volumes_are_declared_and_hold_the_hf_cache(compose) -> None:
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        assert set(named_volume_mounts(service)) <= declared, name
    for name in VLLM_SERVICES:
        service = compose["services"][name]
        assert named_volume_mounts(service)["hf-cache"] == service["environment"]["HF_HOME"]


def test_gateway_waits_for_a_healthy_vllm(compose) -> None:
    depends = compose["services"]["gateway"]["depends_on"]
    for name in VLLM_SERVICES:
        # required: false because the inactive profile's vLLM is absent; the active one is awaited.
        assert depends[name] == {"condition": "service_healthy", "required": False}
        test = compose["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD" and "http://127.0.0.1:8000/health" in test[-1]


def gateway_settings(compose: dict, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The gateway's settings as the container builds them: its environment plus the YAML file."""
    service = compose["services"]["gateway"]
    mounts = {m.target: m.source for m in bind_mounts(service)}
    for key in [k for k in os.environ if k.startswith("GATEWAY_")]:
        monkeypatch.delenv(key)
    for key, value in service["environment"].items():
        monkeypatch.setenv(key, value)
    config_in_container = service["environment"]["GATEWAY_CONFIG"]
    monkeypatch.setenv("GATEWAY_CONFIG", str(REPO / mounts[config_in_container]))
    return Settings()


def test_gateway_settings_point_at_compose_services(compose, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = gateway_settings(compose, monkeypatch)
    gateway = compose["services"]["gateway"]
    for profile, vllm_service in (("gpu", "vllm"), ("cpu", "vllm-cpu")):
        services = active_services(compose, {profile})
        for url in settings.upstream_urls:
            host, port = url.removeprefix("http://").split(":")
            reachable = {h: s for net in service_networks(gateway) for h, s in hosts_on_network(services, net).items()}
            assert reachable.get(host) == vllm_service, url
            command = services[vllm_service]["command"]
            assert port == command[command.index("--port") + 1]
    assert settings.upstream_api_key is not None
    assert settings.upstream_api_key.get_secret_value() == "test-key"
    served = example_env()["SERVED_MODEL_NAME"]
    assert served in [model.upstream_name for model in settings.models]
    container_paths = {m.target for m in bind_mounts(gateway)}
    for model in settings.models:
        assert str(model.model_path) in container_paths
        for artifact in model.artifacts.values():
            assert artifact.is_relative_to("/artifacts")


def test_gateway_config_mirrors_make_serve(compose, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compose gateway serves what `make serve` serves, artifacts included (when trained)."""
    settings = gateway_settings(compose, monkeypatch)
    native = gateway_config("/model", MODEL_NAME, vllm_port=8000, with_dro=True)["models"]
    for model in native:
        model["artifacts"] = {variant: "/artifacts" / Path(path).relative_to(REPO / "artifacts")
                              for variant, path in model["artifacts"].items()}
    in_compose = [model.model_dump(include={"name", "model_path", "default_variant", "artifacts"})
                  for model in settings.models]
    # Natively the model path is a local folder; in compose the model is mounted at /model.
    expected = [{**{key: value for key, value in model.items() if key in {"name", "default_variant", "artifacts"}},
                 "model_path": Path("/model")} for model in native]
    assert in_compose == expected, (
        "deploy/gateway/config.yaml (and the ConfigMap in deploy/k8s/gateway.yaml) must serve the models and "
        "variants `make serve` serves: when a trained artifact is committed under artifacts/, add it there")
