"""Label stage: sample answers per (condition, query), judge refusal, soft label = fraction complied.

Paper recipe (authors' `generate.py`, `evaluate.py`): 25 samples at temperature 1.0, top_p 0.9,
top_k 50, min 10 / max 300 (harmful) or 200 (harmless) new tokens; each sample is cut at eos,
decoded without special tokens, stripped, and trailing unfinished lines are dropped; the 20
longest (whitespace words) are kept and judged; label = share judged *not* a refusal (1 =
complied). The paper's harmful-side LlamaGuard check is not reproduced (no LlamaGuard here): the
judge alone decides, for harmful and harmless queries alike.

The recipe's sampling settings are `LabelConfig.sampling` (`safeprompt.sampling`, the same model
`dro-eval` samples with). Two samplers share them: `sample_vllm` (an OpenAI-compatible vLLM server
through `safeprompt.client`, streaming, `concurrency` requests in flight, one seeded request per
sample; an error event or a stream cut short raises instead of labelling a truncated answer) and
`sample_hf` (HF `generate`, all samples of a query in one batched call). With `stop_when_judged` a
sample stops as soon as the judge's window is closed (`Judge.window_closed`): the verdict is final,
the tail is not generated.

With `LabelConfig.model_judge` the verdicts come from a refusal judge *model* behind an
OpenAI-compatible API instead of the string judge (`safeprompt.model_judge_client`; docs/judges.md): it reads the
query and each cleaned sample, right after the sample is drawn (in the vLLM sampler's worker threads,
so judging overlaps sampling). A verdict it cannot read counts as complied and is counted per record
(`unknown`). Samples then always run to the end (the model reads whole answers).

Knows nothing about hidden states or files (the pipeline persists and resumes records).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import torch

from safeprompt.client import ChatClient
from safeprompt.judge import Judge
from safeprompt.model_judge_client import ModelJudgeClient
from safeprompt.postprocess import trim_unfinished_tail
from trainer.chat import render_ids
from trainer.config import LabelConfig
from trainer.extract import system_text


@dataclass(frozen=True)
class LabelRecord:
    """One (condition, query): its samples, verdicts, the kept indices and the soft label."""

    condition: str
    query_index: int
    samples: list[str]
    refusals: list[bool]
    kept: list[int]
    soft_label: float
    # Tokens each sample generated, as the sampler counted them (None where it could not: a vLLM stream
    # the judge hung up on ends before vLLM reports usage).
    tokens: list[int | None]
    # Verdicts a refusal judge model could not read (counted as complied); 0 with a string judge.
    unknown: int = 0

    def to_json(self) -> dict:
        return self.__dict__.copy()


def score_samples(condition: str, query_index: int, samples: list[str], judge: Judge, num_keep: int,
                  tokens: list[int | None] | None = None,
                  verdicts: list[bool | None] | None = None) -> LabelRecord:
    """Judge cleaned samples, keep the `num_keep` longest, label = fraction of kept that complied.

    `verdicts`, when given, are a judge model's on the cleaned samples (None: unreadable, counted as
    complied) and replace `judge`'s."""
    cleaned = [trim_unfinished_tail(s) for s in samples]
    if verdicts is None:
        refusals = [judge.judge(s).refusal for s in cleaned]
        unknown = 0
    else:
        refusals = [verdict is True for verdict in verdicts]
        unknown = sum(verdict is None for verdict in verdicts)
    order = sorted(range(len(cleaned)), key=lambda i: len(cleaned[i].split()), reverse=True)
    kept = sorted(order[:num_keep])
    soft = sum(not refusals[i] for i in kept) / len(kept)
    return LabelRecord(condition, query_index, cleaned, refusals, kept, soft,
                       list(tokens) if tokens is not None else [None] * len(samples), unknown)


def sample_seed(config: LabelConfig, query_index: int, sample_index: int) -> int:
    """Seeded per query like the paper's set_seed(query_index); one seed per sample."""
    return config.seed + 1000 * query_index + sample_index


def chat_messages(condition: str, query: str) -> list[dict[str, str]]:
    system = system_text(condition)
    messages = [] if system is None else [{"role": "system", "content": system}]
    return messages + [{"role": "user", "content": query}]


# --- vLLM sampler ---------------------------------------------------------------------------------

def sample_vllm(config: LabelConfig, jobs: list[tuple[str, int, str, bool]], judge: Judge, on_done,
                *, transport: httpx.BaseTransport | None = None, model_judge: ModelJudgeClient | None = None) -> None:
    """Label `jobs` (condition, query_index, query, harmless) on a vLLM server; `on_done(record)` each,
    in job order, on the calling thread. `transport` replaces the network (tests); `model_judge`
    judges each sample as soon as it is drawn."""
    if not config.vllm_url or not config.served_model_name:
        raise ValueError("the vllm label backend needs label.vllm_url and label.served_model_name")
    sampling = config.sampling
    # Set on failure or Ctrl-C: streams in flight hang up at their next event instead of running on.
    abandoned = threading.Event()

    def done(text: str) -> bool:
        return abandoned.is_set() or (config.stop_when_judged and judge.window_closed(text))

    with ChatClient(config.vllm_url, timeout_s=config.request_timeout_s, max_connections=config.concurrency,
                    transport=transport) as client:
        def one_sample(condition: str, query_index: int, query: str, harmless: bool,
                       k: int) -> tuple[str, int | None, bool | None]:
            body = {"model": config.served_model_name, "messages": chat_messages(condition, query),
                    **sampling.request_fields(harmless=harmless, seed=sample_seed(config, query_index, k)),
                    "stream_options": {"include_usage": True}}
            completion = client.stream_until(body, done)
            verdict = (None if model_judge is None or abandoned.is_set()
                       else model_judge.verdict(query, trim_unfinished_tail(completion.text)).refusal)
            return completion.text, completion.completion_tokens, verdict

        pool = ThreadPoolExecutor(max_workers=config.concurrency)
        try:
            pending = [(job, [pool.submit(one_sample, *job, k) for k in range(config.num_samples)]) for job in jobs]
            for (condition, query_index, _, _), futures in pending:
                answers = [future.result() for future in futures]
                on_done(score_samples(condition, query_index, [text for text, _, _ in answers], judge, config.num_keep,
                                      [count for _, count, _ in answers],
                                      None if model_judge is None else [verdict for _, _, verdict in answers]))
        except BaseException:
            abandoned.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# --- Hugging Face sampler -------------------------------------------------------------------------

class _JudgeWindowStop:
    """StoppingCriteria: a row is done once the judge's window over its new tokens is closed."""

    def __init__(self, tokenizer, prompt_len: int, judge: Judge) -> None:
        self.tokenizer, self.prompt_len, self.judge = tokenizer, prompt_len, judge

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([self.judge.window_closed(t) for t in texts], dtype=torch.bool)


def sample_hf(config: LabelConfig, frozen, jobs: list[tuple[str, int, str, bool]], judge: Judge, on_done,
              *, model_judge: ModelJudgeClient | None = None) -> None:
    """Label `jobs` with HF `generate`: all samples of one query in one batched call, as the paper;
    `model_judge` judges a query's samples after its call (`concurrency` judge requests at once)."""
    from transformers import StoppingCriteriaList, set_seed

    tokenizer, model, sampling = frozen.tokenizer, frozen.model, config.sampling
    for condition, query_index, query, harmless in jobs:
        ids = torch.tensor([render_ids(tokenizer, system_text(condition), query)], device=frozen.device)
        set_seed(sample_seed(config, query_index, 0))
        stopping = StoppingCriteriaList([_JudgeWindowStop(tokenizer, ids.shape[1], judge)]) \
            if config.stop_when_judged else None
        randomness = (dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
                      if sampling.temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None))
        with torch.no_grad():
            output = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), **randomness,
                num_return_sequences=config.num_samples, min_new_tokens=sampling.min_tokens,
                max_new_tokens=sampling.max_tokens(harmless), pad_token_id=frozen.pad_id,
                stopping_criteria=stopping)
        generated = output[:, ids.shape[1]:]
        samples = tokenizer.batch_decode(generated, skip_special_tokens=True)
        # Finished rows are padded; with pad = eos (most chat models) the eos itself is not counted.
        tokens = (generated != frozen.pad_id).sum(dim=1).tolist()
        verdicts = None
        if model_judge is not None:
            with ThreadPoolExecutor(max_workers=config.concurrency) as pool:
                verdicts = [verdict.refusal for verdict in pool.map(
                    lambda sample: model_judge.verdict(query, trim_unfinished_tail(sample)), samples)]
        on_done(score_samples(condition, query_index, samples, judge, config.num_keep, tokens, verdicts))
