"""Every dashboard panel, proven against a real Prometheus scraping the real gateway and real vLLM.

A real Prometheus scrapes the real gateway (python -m gateway) and the real vLLM CPU server (tiny
random model) under the deploy config's job names. The model serves a soft-prompt artifact (`dro`,
random rows, sent to vLLM as prompt embeds) and the human `default` prompt. Traffic goes through the
official `openai` client: both variants by explicit id and by a 50/50 split, streaming and not,
n=2, an unknown model (404) and a request vLLM rejects (upstream 4xx). The tiny model's text is random, so refusals are
made deterministic with `logit_bias` (one token forced and repeated: "Sorry" is a refusal for the
paper's matcher, " Unfortunately" for the phrase judge, " Sure" for neither), and every answer the
client received is judged client-side with the gateway's judge. The same vLLM is also the gateway's
audit judge (every answer sampled), so the audit panels have data. Then:
- Prometheus' refusal counter equals the refusals in the answers the client received, per variant;
- every request answered with 200 was audited once, and no audit failed;
- every PromQL expression of every dashboard panel, with Grafana's variables substituted, is
  accepted by Prometheus and returns at least one finite value.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from pathlib import Path

import openai
import pytest

from gateway.telemetry import AUDIT_FAILURE_REASONS
from safeprompt.judge import DEFAULT_JUDGE, get_judge

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DASHBOARDS = sorted((Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards").glob("*.json"))
# Grafana's variables as a dashboard with everything selected over the last minutes would send them.
GRAFANA_VARIABLES = {
    "$__rate_interval": "2m",
    "$__interval": "5s",
    "$__range": "10m",
    "$model": ".*",
    "$variant": ".*",
    "$judge": ".*",
}


def substitute_variables(expr: str) -> str:
    # Longest names first, so $__rate_interval is not read as $__interval's prefix or similar.
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    leftover = re.findall(r"\$\w+", expr)
    assert not leftover, f"unsubstituted Grafana variables {leftover} in {expr}"
    return expr


def dashboard_expressions() -> list[tuple[str, str]]:
    found = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                found.append((f"{path.name}: {panel['title']} [{target['refId']}]", target["expr"]))
    return found


# Single tokens of SmolLM2's tokenizer whose repetition is a refusal for some judge.
REFUSAL_TOKENS = ("Sorry", " Unfortunately")
COMPLIANCE_TOKEN = " Sure"


def forced_token_id(model_dir: Path, judge_name: str, refusal: bool) -> int:
    """A single token whose repetition the judge calls a refusal (or not), for `logit_bias`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    judge = get_judge(judge_name)
    for text in (REFUSAL_TOKENS if refusal else (COMPLIANCE_TOKEN,)):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and judge.judge(tokenizer.decode(ids * 24)).refusal == refusal:
            return ids[0]
    raise AssertionError(f"no forced token gives refusal={refusal} for judge {judge_name}")


class Traffic:
    """Sends requests and keeps what the client received, for counting refusals client-side."""

    def __init__(self, client: openai.OpenAI, judge_name: str) -> None:
        self.client = client
        self.judge = get_judge(judge_name)
        self.answers: list[tuple[str, str]] = []  # (variant, text) per choice received
        self.statuses: Counter[int] = Counter()

    def chat(self, model: str, prompt: str, *, stream: bool = False, temperature: float = 0.0, **extra) -> None:
        messages = [{"role": "user", "content": prompt}]
        raw = self.client.chat.completions.with_raw_response.create(
            model=model, messages=messages, stream=stream, max_tokens=24, temperature=temperature, **extra)
        variant = raw.headers["x-safety-variant"]
        self.statuses[raw.http_response.status_code] += 1
        if stream:
            texts: dict[int, str] = {}
            for chunk in raw.parse():
                for choice in chunk.choices:
                    texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            self.answers.extend((variant, texts[index]) for index in sorted(texts))
        else:
            completion = raw.parse()
            self.answers.extend((variant, choice.message.content or "") for choice in completion.choices)

    def refusals_by_variant(self) -> Counter[str]:
        return Counter(variant for variant, text in self.answers if self.judge.judge(text).refusal)

    def answers_by_variant(self) -> Counter[str]:
        return Counter(variant for variant, _ in self.answers)


def write_soft_prompt_artifact(model_dir: Path, target: Path, rows: int = 4) -> Path:
    import torch

    from safeprompt.artifact import Manifest, read_model_info
    from safeprompt.artifact_write import save_artifact

    info = read_model_info(model_dir)
    manifest = Manifest(name="dro", base_model=str(model_dir), hidden_size=info.hidden_size,
                        num_virtual_tokens=rows, chat_template_sha256=info.chat_template_sha256,
                        dtype="float32", origin="test")
    soft_prompt = torch.randn(rows, info.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
    return save_artifact(target, manifest, {"soft_prompt": soft_prompt})


def test_dashboards_against_real_prometheus(gateway_factory, vllm_server, prometheus_factory, tmp_path) -> None:
    judge_name = DEFAULT_JUDGE
    artifact = write_soft_prompt_artifact(vllm_server.model_dir, tmp_path / "dro")
    model = {"name": "tiny", "upstream_model": vllm_server.served_name, "model_path": str(vllm_server.model_dir),
             "default_variant": "default", "artifacts": {"dro": str(artifact)},
             "split": {"default": 0.5, "dro": 0.5},
             # The forced answers need logit_bias, which the gateway refuses unless a model allows it.
             "allowed_extra_fields": ["logit_bias"]}
    audit = {"judge": {"base_url": vllm_server.base_url, "model": vllm_server.served_name}, "sample_rate": 1.0}
    gateway = gateway_factory(models=[model], judge=judge_name, audit_judge=audit)
    prometheus = prometheus_factory(gateway=f"127.0.0.1:{gateway.port}", vllm=f"127.0.0.1:{vllm_server.port}")
    prometheus.wait_until(lambda: prometheus.targets_up() == {"gateway": True, "vllm": True}, 60,
                          "both targets up")

    refuse = {"logit_bias": {str(forced_token_id(vllm_server.model_dir, judge_name, True)): 100}}
    comply = {"logit_bias": {str(forced_token_id(vllm_server.model_dir, judge_name, False)): 100}}
    client = gateway.openai_client()
    traffic = Traffic(client, judge_name)
    for index in range(3):
        traffic.chat("tiny@default", f"Question {index}?", **refuse)
        traffic.chat("tiny@dro", f"Question {index}?", **comply)
        traffic.chat("tiny@dro", f"Question {index}?", stream=True, **refuse)
        traffic.chat("tiny@default", f"Question {index}?", stream=True, **comply)
    # n=2 needs sampling; a +100 bias still makes the forced token the only likely one.
    traffic.chat("tiny@default", "Two answers please.", n=2, temperature=1.0, **refuse)
    for index in range(6):  # the 50/50 split, unforced text
        traffic.chat("tiny", f"Tell me about the number {index}.", stream=index % 2 == 0, user=f"user-{index}")
    with pytest.raises(openai.NotFoundError):
        traffic.client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):  # vLLM refuses max_tokens beyond its context
        traffic.client.chat.completions.create(model="tiny@default", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=50_000)

    client.close()
    refusals = traffic.refusals_by_variant()
    answers = traffic.answers_by_variant()
    assert sum(answers.values()) == 3 * 4 + 2 + 6
    # The forced answers make the count non-trivial in both directions.
    assert refusals["default"] >= 5 and refusals["dro"] >= 3
    assert sum(refusals.values()) < sum(answers.values())

    # Wait until every value asserted below has been scraped (they appear in different scrapes), then
    # compare: the counted refusals and judged answers equal the traffic sent, per variant.
    def scraped() -> dict[str, dict[str, float]]:
        def by(label: str, expr: str) -> dict[str, float]:
            return {sample["metric"][label]: float(sample["value"][1]) for sample in prometheus.query(expr)}
        selector = f'{{model="tiny", judge="{judge_name}"}}'
        return {
            "refusals": by("variant", f"sum by (variant) (dro_gateway_refusals_total{selector})"),
            "judged": by("variant", f"sum by (variant) (dro_gateway_answers_judged_total{selector})"),
            "errors": by("kind", "sum by (kind) (dro_gateway_request_errors_total)"),
            "audited": by("model", "sum by (model) (dro_gateway_audited_answers_total)"),
            "audit_failures": by("reason", "sum by (reason) (dro_gateway_audit_failures_total)"),
        }

    expected = {"refusals": {variant: float(refusals[variant]) for variant in answers},
                "judged": {variant: float(count) for variant, count in answers.items()},
                "errors": {"model_not_found": 1.0, "upstream_4xx": 1.0},
                # Choice 0 of every request answered with 200 (not the 404 nor the 400).
                "audited": {"tiny": float(3 * 4 + 1 + 6)},
                "audit_failures": {reason: 0.0 for reason in AUDIT_FAILURE_REASONS}}
    deadline = time.monotonic() + 30
    seen = scraped()
    while seen != expected and time.monotonic() < deadline:
        time.sleep(0.5)
        seen = scraped()
    assert seen == expected

    # Every panel's expression returns data. rate() needs two samples of a series in its window, and
    # the error counters appeared only with the last requests: allow a few more scrapes.
    expressions = dashboard_expressions()
    assert len(expressions) >= 16

    def panels_without_data() -> list[str]:
        empty = []
        for name, expr in expressions:
            result = prometheus.query(substitute_variables(expr))
            values = [float(sample["value"][1]) for sample in result]
            if not any(math.isfinite(value) for value in values):
                empty.append(f"{name}: {substitute_variables(expr)} -> {values}")
        return empty

    deadline = time.monotonic() + 30
    empty = panels_without_data()
    while empty and time.monotonic() < deadline:
        time.sleep(1)
        empty = panels_without_data()
    assert not empty, "panels without data:\n" + "\n".join(empty)
