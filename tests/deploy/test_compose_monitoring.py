"""Static checks that Prometheus and Grafana, as docker-compose.yml runs them, are wired to the
files in deploy/ and to the services they watch: every scrape target and datasource URL names a
service reachable on a shared network at the port that service listens on, and every provisioned
path is where compose mounts it. The dashboards' contents are test_prometheus_dashboards.py's.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy.compose_model import (
    TEST_SECRETS,
    active_services,
    bind_mounts,
    hosts_on_network,
    load_compose,
    published_ports,
    read_env_file,
    service_networks,
)
from tests.deploy.dockerfile_parser import read_dockerfile

REPO = Path(__file__).resolve().parents[2]
PROFILES = {"gpu": "vllm", "cpu": "vllm-cpu"}


@pytest.fixture(scope="module")
def compose() -> dict:
    env = read_env_file(REPO / ".env.example")
    env.update(TEST_SECRETS)
    return load_compose(REPO / "docker-compose.yml", env)


def flag_value(argv: list[str], flag: str) -> str:
    """Value of `--flag value` or `--flag=value` in an argument list."""
    for index, arg in enumerate(argv):
        if arg == flag:
            return argv[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {argv}")


def listen_port(services: dict, name: str) -> int:
    """The port a service listens on inside its container, read from its command line."""
    if name == "gateway":
        return int(flag_value(read_dockerfile(REPO / "Dockerfile").stage("gateway").last("CMD").exec_form(), "--port"))
    if name == "prometheus":
        return int(flag_value(services[name]["command"], "--web.listen-address").rsplit(":", 1)[1])
    if name == "grafana":
        return 3000  # the image's default (GF_SERVER_HTTP_PORT is not set)
    return int(flag_value(services[name]["command"], "--port"))


def resolve(services: dict, client: str, host: str) -> str | None:
    """The service `client` reaches under the name `host` on one of its networks, if any."""
    for network in service_networks(services[client]):
        target = hosts_on_network(services, network).get(host)
        if target is not None:
            return target
    return None


def mounted_source(service: dict, container_path: str) -> Path:
    for mount in bind_mounts(service):
        if mount.target == container_path:
            return REPO / mount.source
    raise AssertionError(f"nothing is mounted at {container_path}")


@pytest.mark.parametrize("profile", PROFILES)
def test_prometheus_scrapes_gateway_and_vllm_where_they_listen(compose, profile: str) -> None:
    services = active_services(compose, {profile})
    prometheus = services["prometheus"]
    config_path = mounted_source(prometheus, flag_value(prometheus["command"], "--config.file"))
    config = yaml.safe_load(config_path.read_text())
    expected = {"gateway": "gateway", "vllm": PROFILES[profile]}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(expected)
    for job_name, job in jobs.items():
        assert job.get("metrics_path", "/metrics") == "/metrics"
        targets = [t for static in job["static_configs"] for t in static["targets"]]
        assert targets, job_name
        for target in targets:
            host, port = target.rsplit(":", 1)
            service = resolve(services, "prometheus", host)
            assert service == expected[job_name], f"{job_name}: {target} reaches {service}"
            assert int(port) == listen_port(services, service), target


def test_prometheus_and_grafana_publish_the_ports_they_listen_on(compose) -> None:
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        ports = published_ports(services[name])
        assert [p.container_port for p in ports] == [listen_port(services, name)]
        assert all(p.host_ip == "127.0.0.1" for p in ports)


def test_grafana_datasource_is_the_compose_prometheus(compose) -> None:
    services = compose["services"]
    grafana = services["grafana"]
    provisioning = mounted_source(grafana, "/etc/grafana/provisioning")
    files = sorted((provisioning / "datasources").glob("*.y*ml"))
    assert files, "no provisioned datasource"
    datasources = [ds for path in files for ds in yaml.safe_load(path.read_text())["datasources"]]
    prometheus = [ds for ds in datasources if ds["type"] == "prometheus"]
    assert [ds["uid"] for ds in prometheus] == ["prometheus"]
    url = urlsplit(prometheus[0]["url"])
    assert resolve(services, "grafana", url.hostname) == "prometheus"
    assert url.port == listen_port(services, "prometheus")


def test_grafana_loads_the_dashboards_from_where_compose_mounts_them(compose) -> None:
    grafana = compose["services"]["grafana"]
    provisioning = mounted_source(grafana, "/etc/grafana/provisioning")
    files = sorted((provisioning / "dashboards").glob("*.y*ml"))
    providers = [p for path in files for p in yaml.safe_load(path.read_text())["providers"]]
    assert providers, "no dashboard provider"
    for provider in providers:
        assert provider["type"] == "file"
        folder = mounted_source(grafana, provider["options"]["path"])
        assert sorted(folder.glob("*.json")), f"{folder} holds no dashboard"


def test_grafana_requires_a_password_and_refuses_anonymous_users(compose) -> None:
    environment = compose["services"]["grafana"]["environment"]
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert environment["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert environment["GF_SECURITY_ADMIN_PASSWORD"] == "test-password"
