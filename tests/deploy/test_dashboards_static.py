"""deploy/ Prometheus and Grafana files: valid, wired to the compose service names, current.

Whether every panel's PromQL returns data is proven against a real Prometheus in
test_prometheus_dashboards.py; this module checks the files themselves, in milliseconds.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_prometheus_scrapes_gateway_and_vllm() -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    assert config["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["gateway"]["static_configs"][0]["targets"] == ["gateway:8000"]
    assert jobs["vllm"]["static_configs"][0]["targets"] == ["vllm:8000"]
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in jobs.values())


def test_promtool_accepts_config(tmp_path: Path) -> None:
    """promtool also checks that the gateway job's token file exists: given one where compose mounts it."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: install the Debian package prometheus (make test does)"
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    token = tmp_path / "gateway-metrics-token"
    token.write_text("token\n")
    assert text.count("/etc/prometheus/gateway-metrics-token") == 1
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace("/etc/prometheus/gateway-metrics-token", str(token)))
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    token.unlink()
    missing = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert missing.returncode != 0


def test_grafana_datasource_and_provider() -> None:
    datasource = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    [source] = datasource["datasources"]
    assert source["uid"] == "prometheus" and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "dro-gateway.yaml")
    [entry] = provider["providers"]
    assert entry["type"] == "file"
    # docker-compose.yml mounts deploy/grafana/dashboards at this path.
    compose = load_yaml(ROOT / "docker-compose.yml")
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{entry['options']['path']}:ro" in mounts


def test_dashboard_json_is_generated_and_current() -> None:
    assert [path.name for path in DASHBOARDS] == ["dro-gateway.json"]
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_dashboards.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def all_targets() -> list[tuple[str, dict, dict]]:
    found = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                found.append((path.name, panel, target))
    return found


def test_every_panel_uses_the_provisioned_datasource() -> None:
    targets = all_targets()
    assert len(targets) >= 16
    for _, panel, target in targets:
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}
        assert target["datasource"]["uid"] == "prometheus"
        assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_required_panels_are_present() -> None:
    exprs = " ".join(target["expr"] for _, _, target in all_targets())
    for metric in (
        "dro_gateway_refusals_total", "dro_gateway_answers_judged_total", "dro_gateway_requests_total",
        "dro_gateway_request_errors_total", "dro_gateway_upstream_errors_total",
        "dro_gateway_request_duration_seconds_bucket", "dro_gateway_time_to_first_token_seconds_bucket",
        "dro_gateway_overhead_seconds_bucket", "dro_gateway_completion_tokens_total",
        "dro_gateway_prompt_tokens_total", "dro_gateway_requests_in_flight", "dro_gateway_artifact_info",
        "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
        "dro_gateway_audited_answers_total", "dro_gateway_audit_failures_total", "dro_gateway_audit_pending",
    ):
        assert metric in exprs, metric
    titles = [panel["title"] for _, panel, _ in all_targets()]
    assert any("Split comparison" in title for title in titles)
    assert "Live judge agreement with the audit judge" in titles


def test_metric_names_exist_in_gateway_metrics() -> None:
    """Every dro_gateway_* name a panel reads is one GatewayMetrics exposes."""
    from prometheus_client import CollectorRegistry

    from gateway.prometheus import GatewayMetrics

    metrics = GatewayMetrics(CollectorRegistry())
    exposed = set()
    for family in metrics.registry.collect():
        exposed.add(family.name + ("_total" if family.type == "counter" else ""))
        if family.type == "histogram":
            exposed.add(family.name + "_bucket")
    used = set(re.findall(r"dro_gateway_[a-z_]+", " ".join(target["expr"] for _, _, target in all_targets())))
    assert used <= exposed, used - exposed
