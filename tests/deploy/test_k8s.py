"""Static checks of the Kubernetes manifests in deploy/k8s (no cluster here): every object is valid
against the Kubernetes API schemas of the versions named below (kubernetes-validate's bundled
OpenAPI schemas, strict), selectors match pod labels, Services, probes and monitors name ports the
containers open, the HPA and PDB target the gateway, only the gateway may reach vLLM, the vLLM
command is the native one, the gateway settings load, and the dashboards ConfigMap is current.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from gateway.settings import Settings
from stack.processes import vllm_command
from tests.deploy.dockerfile_parser import read_dockerfile

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
# An older release that many managed clusters still run, and the newest schemas kubernetes-validate
# carries: the manifests use only APIs that are stable across that range.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")
# Custom resources: no bundled schema; their structure is checked by the tests below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}
BUILT_IN_KINDS = {
    ("v1", "Namespace"), ("v1", "PersistentVolumeClaim"), ("v1", "ConfigMap"), ("v1", "Service"),
    ("apps/v1", "Deployment"), ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"), ("networking.k8s.io/v1", "NetworkPolicy"),
}


def load_objects() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects = []
    for name in kustomization["resources"]:
        for document in yaml.safe_load_all((K8S / name).read_text()):
            if document is not None:
                objects.append(document)
    return objects


OBJECTS = load_objects()


def find(kind: str, name: str) -> dict:
    matches = [o for o in OBJECTS if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "matchExpressions are not used here"
    return bool(selector["matchLabels"]) and selector["matchLabels"].items() <= labels.items()


def pods_of(kind_selector: dict) -> list[dict]:
    """Pod templates of the Deployments whose pods a label selector picks."""
    return [d["spec"]["template"] for d in OBJECTS
            if d["kind"] == "Deployment" and selects(kind_selector, d["spec"]["template"]["metadata"]["labels"])]


def container_ports(template: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_built_in_objects_match_the_kubernetes_schemas(version: str) -> None:
    kinds = {(o["apiVersion"], o["kind"]) for o in OBJECTS}
    assert kinds <= BUILT_IN_KINDS | CUSTOM_KINDS, kinds - BUILT_IN_KINDS - CUSTOM_KINDS
    for obj in OBJECTS:
        if (obj["apiVersion"], obj["kind"]) in BUILT_IN_KINDS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_schema_validation_rejects_a_misplaced_field() -> None:
    deployment = yaml.safe_load(yaml.safe_dump(find("Deployment", "dro-gateway")))
    deployment["spec"]["template"]["spec"]["containers"][0]["port"] = 8000
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_workload_selectors_match_their_pod_labels() -> None:
    for deployment in (o for o in OBJECTS if o["kind"] == "Deployment"):
        assert selects(deployment["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    for name in ("dro-gateway", "vllm"):
        assert len(pods_of({"matchLabels": {"app.kubernetes.io/name": name}})) == 1


def test_services_and_probes_point_at_open_container_ports() -> None:
    for service in (o for o in OBJECTS if o["kind"] == "Service"):
        templates = pods_of({"matchLabels": service["spec"]["selector"]})
        assert len(templates) == 1, service["metadata"]["name"]
        ports = container_ports(templates[0])
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports or target in ports.values(), f"{service['metadata']['name']}: {target}"
    for deployment in (o for o in OBJECTS if o["kind"] == "Deployment"):
        ports = container_ports(deployment["spec"]["template"])
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in container:
                    assert container[probe]["httpGet"]["port"] in ports


def test_pod_monitors_scrape_named_ports_of_existing_pods() -> None:
    for monitor in (o for o in OBJECTS if o["kind"] == "PodMonitor"):
        templates = pods_of(monitor["spec"]["selector"])
        assert len(templates) == 1, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in container_ports(templates[0])
            assert endpoint["path"] == "/metrics"


def test_gateway_scales_horizontally_and_keeps_a_pod_through_disruptions() -> None:
    deployment = find("Deployment", "dro-gateway")
    hpa = find("HorizontalPodAutoscaler", "dro-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "dro-gateway"}
    assert hpa["spec"]["minReplicas"] >= 2
    # Utilization targets are relative to requests: without a CPU request the HPA cannot act.
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert "cpu" in container["resources"]["requests"]
    pdb = find("PodDisruptionBudget", "dro-gateway")
    assert selects(pdb["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert "affinity" not in deployment["spec"]["template"]["spec"]
    assert find("Service", "dro-gateway")["spec"].get("sessionAffinity", "None") == "None"


def test_only_gateway_pods_and_monitoring_reach_vllm() -> None:
    policy = find("NetworkPolicy", "vllm-only-from-gateway")
    vllm = find("Deployment", "vllm")["spec"]["template"]
    gateway = find("Deployment", "dro-gateway")["spec"]["template"]
    assert selects(policy["spec"]["podSelector"], vllm["metadata"]["labels"])
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    pod_peers = [peer["podSelector"] for peer in rule["from"] if "podSelector" in peer]
    assert len(pod_peers) == 1 and selects(pod_peers[0], gateway["metadata"]["labels"])
    assert not selects(pod_peers[0], vllm["metadata"]["labels"])
    namespaces = [peer["namespaceSelector"]["matchLabels"] for peer in rule["from"] if "namespaceSelector" in peer]
    assert namespaces == [{"kubernetes.io/metadata.name": "monitoring"}]
    assert [p["port"] for p in rule["ports"]] == ["http"]


def test_vllm_command_is_the_native_command_and_parallelism_matches_the_gpus() -> None:
    [container] = find("Deployment", "vllm")["spec"]["template"]["spec"]["containers"]
    argv = container["command"] + container["args"]
    tensor_parallel = argv[argv.index("--tensor-parallel-size") + 1]
    expected = vllm_command(
        argv[argv.index("--model") + 1], served_model_name=argv[argv.index("--served-model-name") + 1],
        port=8000, host="0.0.0.0", max_model_len=int(argv[argv.index("--max-model-len") + 1]),
        python=Path("python3"),
        extra_args=("--tensor-parallel-size", tensor_parallel,
                    "--gpu-memory-utilization", argv[argv.index("--gpu-memory-utilization") + 1]),
    )
    assert argv == expected
    assert container["resources"]["limits"]["nvidia.com/gpu"] == tensor_parallel
    assert container["resources"]["requests"]["nvidia.com/gpu"] == tensor_parallel
    assert container["image"] == yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["vllm"]["image"]


def test_gateway_settings_load_and_point_at_the_vllm_service(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    deployment = find("Deployment", "dro-gateway")["spec"]["template"]
    [container] = deployment["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    config_dir = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    assert env["GATEWAY_CONFIG"]["value"] == f"{config_dir}/config.yaml"
    config = tmp_path / "config.yaml"
    config.write_text(find("ConfigMap", "dro-gateway-config")["data"]["config.yaml"])
    for key in [k for k in os.environ if k.startswith("GATEWAY_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("GATEWAY_CONFIG", str(config))
    settings = Settings()
    vllm_service = find("Service", "vllm")
    assert settings.upstream_urls == [f"http://vllm:{vllm_service['spec']['ports'][0]['port']}"]
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    for model in settings.models:
        assert str(model.model_path) in mounted
        assert all(path.is_relative_to("/artifacts") for path in model.artifacts.values())
    vllm_args = find("Deployment", "vllm")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert vllm_args[vllm_args.index("--served-model-name") + 1] in [m.upstream_name for m in settings.models]
    # The same models and variants as compose serves.
    compose_config = yaml.safe_load((REPO / "deploy" / "gateway" / "config.yaml").read_text())
    assert yaml.safe_load(config.read_text())["models"] == compose_config["models"]


def test_gateway_pods_run_as_the_images_unprivileged_user() -> None:
    [container] = find("Deployment", "dro-gateway")["spec"]["template"]["spec"]["containers"]
    security = container["securityContext"]
    user = read_dockerfile(REPO / "Dockerfile").stage("gateway").last("USER").text
    assert f"{security['runAsUser']}:{security['runAsGroup']}" == user
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["capabilities"]["drop"] == ["ALL"] and security["allowPrivilegeEscalation"] is False
    assert container["args"] == read_dockerfile(REPO / "Dockerfile").stage("gateway").last("CMD").exec_form()
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/tmp"]["name"] == "tmp"  # writable scratch under a read-only root
    assert all(m.get("readOnly") for path, m in mounts.items() if path != "/tmp")


def test_pods_reference_existing_configmaps_and_claims() -> None:
    for deployment in (o for o in OBJECTS if o["kind"] == "Deployment"):
        for volume in deployment["spec"]["template"]["spec"]["volumes"]:
            if "configMap" in volume:
                find("ConfigMap", volume["configMap"]["name"])
            if "persistentVolumeClaim" in volume:
                find("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])




# The Secrets the operator creates (deploy/k8s/kustomization.yaml says how): none is shipped, and
# nothing may start without them.
SECRET_KEYS = {"dro-gateway-secrets": {"vllm-api-key", "api-keys.yaml", "metrics-token-sha256"},
               "dro-gateway-metrics": {"token"}}


def secret_references() -> list[tuple[str, str, str, bool]]:
    """(workload, secret, key, optional) for every secret a Deployment or PodMonitor reads."""
    found = []
    for deployment in (o for o in OBJECTS if o["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        name = deployment["metadata"]["name"]
        for container in pod["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    found.append((name, ref["name"], ref["key"], ref.get("optional", False)))
        for volume in pod["volumes"]:
            if "secret" in volume:
                for item in volume["secret"]["items"]:
                    found.append((name, volume["secret"]["secretName"], item["key"], volume["secret"].get("optional", False)))
    for monitor in (o for o in OBJECTS if o["kind"] == "PodMonitor"):
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            credentials = endpoint.get("authorization", {}).get("credentials")
            if credentials:
                found.append((f"PodMonitor/{monitor['metadata']['name']}", credentials["name"], credentials["key"],
                              credentials.get("optional", False)))
    return found


def test_secrets_are_required_and_each_held_only_where_needed() -> None:
    references = secret_references()
    assert all(not optional for *_, optional in references), references
    assert {(secret, key) for _, secret, key, _ in references} == {
        (secret, key) for secret, keys in SECRET_KEYS.items() for key in keys}
    holders = {}
    for workload, secret, key, _ in references:
        holders.setdefault((secret, key), set()).add(workload)
    assert holders[("dro-gateway-secrets", "vllm-api-key")] == {"dro-gateway", "vllm"}
    assert holders[("dro-gateway-metrics", "token")] == {"PodMonitor/dro-gateway"}
    [gateway] = [o for o in OBJECTS if o["kind"] == "Deployment" and o["metadata"]["name"] == "dro-gateway"]
    env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GATEWAY_REQUIRE_API_KEYS"]["value"] == "true"
    mounts = {m["name"]: m["mountPath"] for m in gateway["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert env["GATEWAY_API_KEYS_FILE"]["value"] == f"{mounts['api-keys']}/api-keys.yaml"


def test_dashboards_configmap_is_current_and_provisioned_by_label() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_dashboards", K8S / "render_dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (K8S / "grafana-dashboards.yaml").read_text()
    assert committed == module.render_dashboards_configmap(), (
        "deploy/k8s/grafana-dashboards.yaml is stale: run python deploy/k8s/render_dashboards.py")
    configmap = find("ConfigMap", "dro-gateway-dashboards")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboards = sorted(p.name for p in (REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
    assert sorted(configmap["data"]) == dashboards
    for text in configmap["data"].values():
        uids = set(re.findall(r'"uid":\s*"([^"]+)"', text)) & {"prometheus"}
        assert uids == {"prometheus"}  # the datasource uid kube-prometheus-stack's Grafana provisions
