"""Write the Grafana dashboard JSON in deploy/grafana/dashboards/ from the panel list below.

The committed JSON is what Grafana loads; this script is how it is made, so every panel's PromQL is
in one readable place. tests/deploy/test_dashboards_static.py checks the committed file equals this
script's output, and tests/deploy/test_prometheus_dashboards.py evaluates every expression against a
real Prometheus scraping the real gateway and vLLM.

    .venv/bin/python scripts/build_dashboards.py          # rewrite the JSON
    .venv/bin/python scripts/build_dashboards.py --check  # exit 1 if the JSON is stale
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

DASHBOARD_PATH = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dashboards" / "dro-gateway.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}

SEL = 'model=~"$model", variant=~"$variant"'
JUDGED = f'dro_gateway_answers_judged_total{{{SEL}, judge=~"$judge"}}'
REFUSED = f'dro_gateway_refusals_total{{{SEL}, judge=~"$judge"}}'
REQUESTS = f"dro_gateway_requests_total{{{SEL}}}"
ERRORS = f"dro_gateway_request_errors_total{{{SEL}}}"
# The sampled audit of live verdicts by a model judge (gateway/audit.py): a confusion matrix.
AUDITED = f"dro_gateway_audited_answers_total{{{SEL}}}"


def audited(**labels: str) -> str:
    return f"dro_gateway_audited_answers_total{{{SEL}, " + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def audit_agreement(window: str) -> str:
    """Share of audited answers where the live verdict equals the audit judge's (unknown never does)."""
    agreed = (f"sum by (model, variant) (increase({audited(live='refusal', audit='refusal')}[{window}]) "
              f"or increase({audited(live='compliance', audit='compliance')}[{window}]))")
    total = f"sum by (model, variant) (increase({AUDITED}[{window}]))"
    return f"({agreed} or {total} * 0) / {total}"


def ratio(numerator: str, denominator: str, by: str, window: str) -> str:
    """sum(rate(num)) / sum(rate(den)) by labels; 0 instead of no data when num has no series."""
    function = "increase" if window == "$__range" else "rate"
    num = f"sum by ({by}) ({function}({numerator}[{window}]))"
    den = f"sum by ({by}) ({function}({denominator}[{window}]))"
    return f"({num} or {den} * 0) / {den}"


def quantiles(metric: str, by: str = "model, variant") -> list[tuple[str, str]]:
    return [
        (f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{SEL}}}[$__rate_interval])))",
         f"p{int(q * 100)} {{{{model}}}}/{{{{variant}}}}")
        for q in (0.5, 0.95, 0.99)
    ]


# (title, panel type, unit, [(expr, legend)], description, width)
PANELS: list[tuple[str, str, str, list[tuple[str, str]], str, int]] = [
    ("Refusal rate by model and variant", "timeseries", "percentunit",
     [(ratio(REFUSED, JUDGED, "model, variant, judge", "$__rate_interval"), "{{model}}/{{variant}} ({{judge}})")],
     "Share of judged answers (choices) the judge called a refusal, per model and safety-prompt variant. "
     "Same judge and same meaning as the evaluation harness's refusal rate.", 12),
    ("Split comparison: refusal rate over the dashboard range", "bargauge", "percentunit",
     [(ratio(REFUSED, JUDGED, "model, variant", "$__range"), "{{model}}/{{variant}}")],
     "Variants of one model side by side, over the whole selected time range (traffic split).", 6),
    ("Split comparison: answers judged and refusals", "table", "short",
     [(f"sum by (model, variant) (increase({JUDGED}[$__range]))", "judged"),
      (f"sum by (model, variant) (increase({REFUSED}[$__range]))", "refusals")],
     "Counts behind the split comparison, so a difference can be read with its sample size.", 6),
    ("Live judge agreement with the audit judge", "bargauge", "percentunit",
     [(audit_agreement("$__range"), "{{model}}/{{variant}}")],
     "Share of the audited sample where the live judge's verdict equals the audit model judge's, over the "
     "selected range (an answer the audit judge could not read counts as a disagreement). Empty without "
     "audit_judge in the gateway settings.", 6),
    ("Audited sample: live vs audit judge refusal rate", "bargauge", "percentunit",
     [(ratio(audited(live="refusal"), AUDITED, "model, variant", "$__range"), "live {{model}}/{{variant}}"),
      (ratio(audited(audit="refusal"), AUDITED, "model, variant", "$__range"), "audit {{model}}/{{variant}}")],
     "Refusal rate on the same audited answers, by the live judge and by the audit model judge, over the "
     "selected range: how far the live refusal rate is off, and in which direction.", 6),
    ("Audited sample: live verdict against the audit judge's", "table", "short",
     [(f"sum by (model, variant, live, audit) (increase({AUDITED}[$__range]))", "{{live}} / {{audit}}")],
     "The confusion matrix behind the agreement: audited answers over the selected range, one row per "
     "model, variant, live verdict and audit verdict (refusal, compliance, unknown).", 6),
    ("Audit judge: judged, failed and pending", "timeseries", "short",
     [(f"sum by (model, variant) (rate({AUDITED}[$__rate_interval]))", "judged/s {{model}}/{{variant}}"),
      ("sum by (reason) (rate(dro_gateway_audit_failures_total[$__rate_interval]))", "failed/s {{reason}}"),
      ("sum(dro_gateway_audit_pending)", "pending")],
     "Sampled answers judged and not judged per second (queue_full, shutdown, connect, timeout, status, "
     "bad_answer, internal), and how many wait. The audit never delays or fails a client's request.", 6),
    ("Traffic share by variant", "timeseries", "percentunit",
     [(f"sum by (model, variant) (rate({REQUESTS}[$__rate_interval])) / ignoring(variant) group_left "
       f"sum by (model) (rate({REQUESTS}[$__rate_interval]))", "{{model}}/{{variant}}")],
     "Share of each model's requests served by each variant: the configured split, as observed.", 8),
    ("Request rate by status", "timeseries", "reqps",
     [(f"sum by (model, variant, status) (rate({REQUESTS}[$__rate_interval]))", "{{model}}/{{variant}} {{status}}")],
     "Requests per second answered, by HTTP status.", 8),
    ("Error rate", "timeseries", "percentunit",
     [(ratio(ERRORS, REQUESTS, "model, variant", "$__rate_interval"), "{{model}}/{{variant}}")],
     "Share of requests that ended in an error of any kind (client disconnects included).", 8),
    ("Errors by kind", "timeseries", "reqps",
     [(f"sum by (kind) (rate({ERRORS}[$__rate_interval]))", "{{kind}}"),
      (f"sum by (kind) (rate(dro_gateway_upstream_errors_total{{{SEL}}}[$__rate_interval]))", "upstream {{kind}}")],
     "Errors per second by kind; upstream_* kinds are failures of vLLM.", 8),
    ("End-to-end latency", "timeseries", "s", quantiles("dro_gateway_request_duration_seconds"),
     "Request accepted to last byte sent, percentiles.", 8),
    ("Time to first token", "timeseries", "s", quantiles("dro_gateway_time_to_first_token_seconds"),
     "Request accepted to the first content token, percentiles.", 8),
    ("Gateway overhead", "timeseries", "s", quantiles("dro_gateway_overhead_seconds"),
     "Time the gateway itself adds (latency minus time waiting on vLLM), percentiles.", 8),
    ("Tokens per second", "timeseries", "short",
     [(f"sum by (model, variant) (rate(dro_gateway_completion_tokens_total{{{SEL}}}[$__rate_interval]))",
       "completion {{model}}/{{variant}}"),
      (f"sum by (model, variant) (rate(dro_gateway_prompt_tokens_total{{{SEL}}}[$__rate_interval]))",
       "prompt {{model}}/{{variant}}")],
     "Completion and prompt tokens per second (prompt tokens include soft-prompt rows).", 8),
    ("Requests in flight", "timeseries", "short",
     [(f"sum by (model, variant) (dro_gateway_requests_in_flight{{{SEL}}})", "{{model}}/{{variant}}")],
     "Requests accepted by the gateway and not yet finished.", 8),
    ("Loaded soft-prompt artifacts", "table", "short",
     [('dro_gateway_artifact_info{model=~"$model"}', "artifact")],
     "One row per soft-prompt artifact the gateway loaded: model, variant, origin, rows, template hash.", 8),
    ("vLLM queue", "timeseries", "short",
     [("sum by (model_name) (vllm:num_requests_running)", "running {{model_name}}"),
      ("sum by (model_name) (vllm:num_requests_waiting)", "waiting {{model_name}}")],
     "Requests vLLM is running and holding in its queue.", 8),
    ("vLLM KV-cache usage", "timeseries", "percentunit",
     [("max by (model_name) (vllm:kv_cache_usage_perc)", "{{model_name}}")],
     "Fraction of vLLM's KV-cache blocks in use (1 = full; then requests queue or get preempted).", 8),
    ("vLLM generation throughput", "timeseries", "short",
     [("sum by (model_name) (rate(vllm:generation_tokens_total[$__rate_interval]))", "{{model_name}}")],
     "Tokens per second vLLM generates, all clients included.", 8),
]


def template_variable(name: str, query: str, include_all: bool = True) -> dict:
    return {
        "name": name, "label": name, "type": "query", "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"}, "definition": query,
        "refresh": 2, "multi": include_all, "includeAll": include_all, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]} if include_all else {},
        "sort": 1,
    }


def build_panel(index: int, x: int, y: int, spec: tuple) -> dict:
    title, kind, unit, targets, description, width = spec
    panel = {
        "id": index + 1, "type": kind, "title": title, "description": description, "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + number), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
             "range": kind == "timeseries", "instant": kind != "timeseries"}
            for number, (expr, legend) in enumerate(targets)
        ],
        "options": {},
    }
    if kind == "timeseries":
        panel["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "mean"]}}
    if kind == "bargauge":
        panel["options"] = {"orientation": "horizontal", "displayMode": "gradient",
                            "reduceOptions": {"calcs": ["lastNotNull"], "values": False}}
        panel["fieldConfig"]["defaults"].update({"min": 0, "max": 1})
    if kind == "table":
        panel["transformations"] = [{"id": "merge", "options": {}}]
    return panel


def build_dashboard() -> dict:
    panels, x, y = [], 0, 0
    for index, spec in enumerate(PANELS):
        width = spec[5]
        if x + width > 24:
            x, y = 0, y + 8
        panels.append(build_panel(index, x, y, spec))
        x += width
    return {
        "uid": "dro-gateway", "title": "DRO safety gateway", "tags": ["dro", "gateway", "vllm"],
        "description": "Refusal rate per model and safety-prompt variant, the traffic split, the audit of "
                       "live verdicts by a model judge, latency, tokens and vLLM's queue. Metrics: docs/metrics.md.",
        "schemaVersion": 39, "version": 1, "editable": False, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "timezone": "browser",
        "templating": {"list": [
            template_variable("model", "label_values(dro_gateway_requests_total, model)"),
            template_variable("variant", 'label_values(dro_gateway_requests_total{model=~"$model"}, variant)'),
            template_variable("judge", "label_values(dro_gateway_answers_judged_total, judge)"),
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render_dashboard() -> str:
    return json.dumps(build_dashboard(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the committed JSON is current")
    args = parser.parse_args()
    text = render_dashboard()
    if args.check:
        current = DASHBOARD_PATH.read_text() if DASHBOARD_PATH.is_file() else ""
        if current != text:
            print(f"{DASHBOARD_PATH} is stale: run scripts/build_dashboards.py", file=sys.stderr)
            return 1
        return 0
    DASHBOARD_PATH.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=DASHBOARD_PATH.parent, prefix=".dro-gateway.", suffix=".json")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(staging, DASHBOARD_PATH)
    print(f"wrote {DASHBOARD_PATH} ({len(PANELS)} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
