"""Client API keys (gateway/auth.py) through the real chat and models routes (mock vLLM): 401 without a
valid key, 403 for a model or variant not granted, `none` only by explicit grant, keys held as sha256
only, never forwarded to vLLM nor logged, and an open gateway when no key is configured."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.auth import KeyRing, hash_key
from gateway.request_log import configure_request_log
from gateway.settings import ApiKeyConfig, ModelConfig, Settings
from tests.gateway.mock_vllm import error_of, ok, post, start_gateway

ALICE, BOB, ROOT = "sk-alice-0123456789", "sk-bob-0123456789", "sk-root-0123456789"
KEYS = [
    {"name": "alice", "sha256": hash_key(ALICE), "models": ["tiny"]},  # every safety variant, not `none`
    {"name": "bob", "sha256": hash_key(BOB), "models": ["tiny@short"]},
    {"name": "root", "sha256": hash_key(ROOT), "models": ["*", "*@none"]},
]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def running() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.mark.parametrize("headers, message", [
    ({}, "missing API key"), ({"Authorization": "Basic abc"}, "missing API key"),
    (bearer("sk-wrong"), "invalid API key"), (bearer(hash_key(ALICE)), "invalid API key"),
])
def test_no_valid_key_is_a_401_before_the_body_is_read(running, headers: dict, message: str) -> None:
    client, service, upstream = start_gateway(running, ok, api_keys=KEYS)
    response = post(client, headers=headers)
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    error = error_of(response)
    assert error["message"].startswith(message)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, "invalid_api_key")
    assert upstream.bodies == []
    assert service.metrics.registry.get_sample_value(
        "dro_gateway_request_errors_total", {"model": "unknown", "variant": "unknown", "kind": "unauthorized"}) == 1
    assert client.get("/v1/models").status_code == 401


@pytest.mark.parametrize("key, model, status", [
    (ALICE, "tiny", 200), (ALICE, "tiny@default", 200), (ALICE, "tiny@none", 403),
    (BOB, "tiny@short", 200), (BOB, "tiny", 200), (BOB, "tiny@mistral", 403), (BOB, "tiny@none", 403),
    (ROOT, "tiny@none", 200), (ROOT, "tiny@mistral", 200),
])
def test_each_key_uses_only_what_it_is_granted(running, key: str, model: str, status: int) -> None:
    client, _, upstream = start_gateway(running, ok, api_keys=KEYS)
    response = post(client, headers=bearer(key), model=model)
    assert response.status_code == status
    if status == 403:
        error = error_of(response)
        assert error["code"] == "model_not_granted" and error["param"] == "model" and model.split("@")[1] in \
            error["message"]
        assert upstream.bodies == []
    else:
        assert len(upstream.bodies) == 1


def test_the_bare_id_is_checked_against_the_variant_it_resolves_to(running) -> None:
    client, _, upstream = start_gateway(running, ok, api_keys=KEYS, model={"default_variant": "none"})
    assert post(client, headers=bearer(ALICE)).status_code == 403
    assert post(client, headers=bearer(ROOT)).status_code == 200


def test_models_lists_only_what_the_key_may_use(running) -> None:
    client, _, _ = start_gateway(running, ok, api_keys=KEYS)
    ids = {key: {m["id"] for m in client.get("/v1/models", headers=bearer(key)).json()["data"]}
           for key in (ALICE, BOB, ROOT)}
    assert ids[BOB] == {"tiny", "tiny@short"}
    assert "tiny@none" not in ids[ALICE] and {"tiny", "tiny@default", "tiny@mistral"} <= ids[ALICE]
    assert "tiny@none" in ids[ROOT]


def test_the_key_is_neither_forwarded_nor_logged(running, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[dict] = []

    def upstream_headers(request):
        seen.append(dict(request.headers))
        return ok(request)

    caplog.set_level(logging.DEBUG)
    request_log = io.StringIO()
    configure_request_log(request_log)
    client, _, _ = start_gateway(running, upstream_headers, api_keys=KEYS, log_prompts=True)
    assert post(client, headers=bearer(ALICE)).status_code == 200
    post(client, headers=bearer(ALICE + "x"))
    assert seen and all(ALICE not in str(headers) for headers in seen)
    assert len(request_log.getvalue().splitlines()) == 2
    for text in (caplog.text, request_log.getvalue()):
        assert ALICE not in text and hash_key(ALICE) not in text


def test_without_keys_the_gateway_is_open(running) -> None:
    client, _, _ = start_gateway(running, ok)
    assert post(client, model="tiny@none").status_code == 200
    assert post(client, headers=bearer("anything"), model="tiny@none").status_code == 200


def test_keys_from_a_file(running, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"- name: carol\n  sha256: {hash_key('sk-carol')}\n  models: ['tiny@none']\n")
    client, _, _ = start_gateway(running, ok, api_keys_file=keys_file)
    assert post(client, headers=bearer("sk-carol"), model="tiny@none").status_code == 200
    assert post(client, headers=bearer("sk-carol"), model="tiny@short").status_code == 403
    assert post(client, model="tiny@none").status_code == 401


@pytest.mark.parametrize("grant, message", [("nope", "not served"), ("tiny@dro", "names variant"),
                                            ("*@nope", "names variant")])
def test_a_grant_naming_nothing_served_stops_the_gateway(grant: str, message: str) -> None:
    settings = Settings(models=[ModelConfig(name="tiny")],
                        api_keys=[ApiKeyConfig(name="k", sha256=hash_key("k"), models=[grant])])
    with pytest.raises(ValueError, match=message):
        KeyRing.from_settings(settings)


def test_keys_are_configured_as_digests_only() -> None:
    with pytest.raises(ValueError, match="sha256"):
        ApiKeyConfig(name="k", sha256="sk-plain-text-key")
    twice = [ApiKeyConfig(name=name, sha256=hash_key("same")) for name in ("a", "b")]
    with pytest.raises(ValueError, match="twice"):
        KeyRing.from_settings(Settings(models=[ModelConfig(name="tiny")], api_keys=twice))


METRICS_TOKEN = "metrics-token-0123456789"


def test_metrics_need_the_metrics_token_and_ready_hides_its_details_without_it(running) -> None:
    client, _, _ = start_gateway(running, ok, api_keys=KEYS, metrics_token_sha256=hash_key(METRICS_TOKEN))
    for headers in ({}, bearer("sk-wrong"), bearer(ALICE), bearer(hash_key(METRICS_TOKEN))):
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
    scraped = client.get("/metrics", headers=bearer(METRICS_TOKEN))
    assert scraped.status_code == 200 and "dro_gateway_requests_total" in scraped.text
    public = client.get("/ready", headers=bearer(ALICE))
    assert public.status_code == 200 and public.json() == {"status": "ready"}
    detailed = client.get("/ready", headers=bearer(METRICS_TOKEN)).json()
    assert detailed["status"] == "ready" and detailed["upstreams"][0]["url"].startswith("http")


def test_without_a_metrics_token_metrics_and_ready_stay_open(running) -> None:
    client, _, _ = start_gateway(running, ok)
    assert client.get("/metrics").status_code == 200
    assert "upstreams" in client.get("/ready").json()


def test_require_api_keys_refuses_to_start_without_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="require_api_keys is set but no API key is configured"):
        KeyRing.from_settings(Settings(require_api_keys=True, models=[ModelConfig(name="tiny")]))
    empty = tmp_path / "keys.yaml"
    empty.write_text("[]\n")
    with pytest.raises(ValueError, match="require_api_keys"):
        KeyRing.from_settings(Settings(require_api_keys=True, api_keys_file=empty, models=[ModelConfig(name="tiny")]))
    assert KeyRing.from_settings(Settings(require_api_keys=True, api_keys=KEYS[:1],
                                          models=[ModelConfig(name="tiny")])).enabled
