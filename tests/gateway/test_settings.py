"""The settings (gateway/settings.py): YAML and environment, and what a model's configuration refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.settings import ModelConfig, Settings


@pytest.mark.parametrize("config, message", [
    ({"name": "a@b"}, "must not contain '@'"),
    ({"name": "m", "default_variant": "dro"}, "default_variant"),
    ({"name": "m", "artifacts": {"short": "/x"}}, "reserved"),
    ({"name": "m", "split": {"nope": 1.0}}, "split variant"),
    ({"name": "m", "split": {"none": 0.0}}, "all be zero"),
])
def test_model_config_validation(config: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelConfig(**config)


def test_settings_from_yaml_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("upstream_urls: ['http://a:1/']\nmodels:\n  - name: m\njudge: paper\n")
    monkeypatch.setenv("GATEWAY_CONFIG", str(config))
    monkeypatch.setenv("GATEWAY_SYSTEM_MESSAGE_POLICY", "replace")
    settings = Settings()
    assert settings.upstream_urls == ["http://a:1"]
    assert settings.models[0].name == "m" and settings.system_message_policy == "replace"
    monkeypatch.setenv("GATEWAY_UPSTREAM_URLS", '["ftp://x"]')
    with pytest.raises(ValidationError, match="http://"):
        Settings()


def test_allow_forced_artifacts_must_name_an_artifact() -> None:
    with pytest.raises(ValidationError, match="not an artifact variant"):
        ModelConfig(name="m", allow_forced_artifacts=["dro"])


@pytest.mark.parametrize("field", ["connect_timeout_s", "read_timeout_s"])
@pytest.mark.parametrize("value", [0, -1])
def test_upstream_timeouts_must_be_positive(field: str, value: float) -> None:
    """aiohttp would take 0 as "no timeout"; the gateway refuses it at start-up instead."""
    with pytest.raises(ValidationError, match=field):
        Settings(upstream_urls=["http://a:1"], models=[{"name": "m"}], **{field: value})
