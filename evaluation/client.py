"""How the harness reaches its servers: the shared offline client (`safeprompt.client`), sized by the run.

`target_client(config)` talks to the gateway (or vLLM in direct mode), `guard_client(config)` to
the optional harm judge, `model_judge_client(config)` to the optional refusal judge model; all allow `config.concurrency` connections and the run's timeout. The
client itself (retries, streaming, stream faults) lives in `safeprompt.client`, shared with the
trainer's labels. This module knows nothing about variants, sets or metrics.
"""

from __future__ import annotations

from safeprompt.client import ChatClient, ChatRequestError, Completion

from evaluation.config import EvalConfig

__all__ = ["ChatClient", "ChatRequestError", "Completion", "guard_client", "model_judge_client", "target_client"]


def target_client(config: EvalConfig) -> ChatClient:
    return ChatClient(config.base_url, api_key=config.api_key.get_secret_value(), timeout_s=config.timeout_s,
                      max_connections=config.concurrency)


def guard_client(config: EvalConfig) -> ChatClient:
    if config.guard is None:
        raise ValueError("the run has no harm judge (--guard-url)")
    return ChatClient(config.guard.base_url, api_key=config.guard.api_key.get_secret_value(),
                      timeout_s=config.timeout_s, max_connections=config.concurrency)


def model_judge_client(config: EvalConfig) -> ChatClient:
    if config.model_judge is None:
        raise ValueError("the run has no refusal judge model (--model-judge-url)")
    judge = config.model_judge
    return ChatClient(judge.base_url, api_key=judge.api_key.get_secret_value(),
                      timeout_s=min(judge.timeout_s, config.timeout_s), max_connections=config.concurrency)
