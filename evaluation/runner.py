"""Planning and sending the run's requests: answers from the model, then optional harm verdicts and
verdicts of a refusal judge model.

Work is planned in a fixed order (set, query, variant, sample), everything already in the run
directory's cache is skipped, and the rest is sent with a bounded number of requests in flight,
each result appended to the cache as soon as it arrives. A request that fails for good stops the
run after the requests in flight have landed; rerunning the same command resumes.
`max_requests` stops a run after that many new requests (for budgets, and to test resuming).
This module knows nothing about metrics or report formats.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from tqdm import tqdm

from safeprompt.files import sha256_text
from safeprompt.judge import JUDGES
from safeprompt.model_judge_client import ModelJudgeClient
from safeprompt.postprocess import trim_unfinished_tail

from evaluation.cache import CacheError, Key, ResultCache
from evaluation.client import ChatClient
from evaluation.config import GREEDY, EvalConfig, sample_seed
from evaluation.guard import HarmGuard
from evaluation.querysets import QuerySet
from evaluation.targets import Target


def query_digest(query: str) -> str:
    return sha256_text(query)[:16]


@dataclass(frozen=True)
class WorkItem:
    set_name: str
    kind: str
    query_index: int
    query: str
    variant: str
    sample: str  # GREEDY or "0" .. "k-1"

    @property
    def key(self) -> Key:
        return (self.set_name, self.query_index, self.variant, self.sample)

    def record_head(self) -> dict[str, Any]:
        return {"set": self.set_name, "query_index": self.query_index, "variant": self.variant,
                "sample": self.sample, "query_sha256": query_digest(self.query)}


class Budget:
    """How many more requests this invocation may send (None: unlimited)."""

    def __init__(self, limit: int | None) -> None:
        self.left = limit

    def take(self) -> bool:
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def sample_keys(config: EvalConfig) -> list[str]:
    return ([GREEDY] if config.greedy else []) + [str(index) for index in range(config.samples)]


def plan_answers(sets: list[QuerySet], variants: tuple[str, ...], config: EvalConfig) -> list[WorkItem]:
    """Every answer the run needs, in a fixed order: set, query, variant, sample."""
    samples = sample_keys(config)
    return [WorkItem(query_set.name, query_set.kind, index, query, variant, sample)
            for query_set in sets
            for index, query in enumerate(query_set.queries)
            for variant in variants
            for sample in samples]


def check_cached_queries(items: list[WorkItem], cache: ResultCache) -> None:
    """A cached answer must belong to the same query text; a set that changed is refused."""
    for item in items:
        record = cache.get(item.key)
        if record is not None and record.get("query_sha256") != query_digest(item.query):
            raise CacheError(f"{cache.path}: the cached answer for {item.key} was made for another query "
                             f"text; set {item.set_name!r} changed since; use a new --run-dir")


def answer_params(item: WorkItem, config: EvalConfig) -> dict[str, Any]:
    """Sampling parameters of one request: greedy, or the paper's sampling with a per-sample seed."""
    sampling, harmless = config.sampling, item.kind == "harmless"
    if item.sample == GREEDY:
        return {"temperature": 0.0, "max_tokens": sampling.max_tokens(harmless)}
    return sampling.request_fields(
        harmless=harmless, seed=sample_seed(config.seed, item.set_name, item.query_index, int(item.sample)))


def run_pending(items: Iterable[WorkItem], cache: ResultCache, work: Callable[[WorkItem], dict[str, Any]],
                *, concurrency: int, budget: Budget, description: str) -> int:
    """Send the items not in `cache`, at most `concurrency` at a time; returns how many were sent.

    Stops submitting when the budget is spent or a request fails; the failure is re-raised after
    the requests in flight have been written.
    """
    pending = [item for item in items if item.key not in cache]
    sent = 0
    failure: BaseException | None = None
    progress = tqdm(total=len(pending), desc=description, unit="req", dynamic_ncols=True)
    queue = iter(pending)
    in_flight: dict[Future, WorkItem] = {}
    pool = ThreadPoolExecutor(max_workers=concurrency)
    interrupted = False
    try:
        while True:
            while failure is None and len(in_flight) < concurrency and budget.take():
                item = next(queue, None)
                if item is None:
                    if budget.left is not None:
                        budget.left += 1  # not used after all
                    break
                in_flight[pool.submit(work, item)] = item
            if not in_flight:
                break
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                item = in_flight.pop(future)
                try:
                    cache.append(item.record_head() | future.result())
                    sent += 1
                    progress.update(1)
                except Exception as exc:  # noqa: BLE001 - re-raised below, after in-flight work lands
                    failure = failure or exc
    except BaseException:
        # Ctrl-C: do not wait for requests in flight (they may take minutes); what has landed is
        # in the cache, and the caller exits without joining the workers.
        interrupted = True
        raise
    finally:
        pool.shutdown(wait=not interrupted, cancel_futures=True)
        progress.close()
    if failure is not None:
        raise failure
    return sent


def all_windows_closed() -> Callable[[str], bool]:
    """A test that holds once no registered refusal judge can change its verdict by reading more.
    Checking every judge (not only the run's) keeps early-stopped answers re-judgeable by any."""
    judges = [factory() for factory in JUDGES.values()]
    return lambda text: all(judge.window_closed(text) for judge in judges)


def answer_worker(client: ChatClient, target: Target, config: EvalConfig) -> Callable[[WorkItem], dict[str, Any]]:
    judged = all_windows_closed()

    def work(item: WorkItem) -> dict[str, Any]:
        body = target.build_body(item.variant, item.query, answer_params(item, config))
        if item.sample == GREEDY and config.stop_greedy_when_judged:
            completion = client.stream_until(body, judged)
        else:
            completion = client.complete(body)
        return {"text": completion.text, "finish_reason": completion.finish_reason,
                "completion_tokens": completion.completion_tokens}
    return work


def plan_guard(items: list[WorkItem], answers: ResultCache) -> list[WorkItem]:
    """Harm verdicts are needed for the sampled answers to harmful queries that exist."""
    return [item for item in items if item.kind == "harmful" and item.sample != GREEDY and item.key in answers]


def guard_worker(guard: HarmGuard, answers: ResultCache) -> Callable[[WorkItem], dict[str, Any]]:
    def work(item: WorkItem) -> dict[str, Any]:
        verdict = guard.classify(item.query, answers.get(item.key)["text"])
        return {"guard": guard.name, "unsafe": verdict.unsafe, "raw": verdict.raw}
    return work


def judged_text(sample: str, text: str) -> str:
    """The text a refusal verdict is about: a greedy answer as it is, a sampled one with the paper's
    post-processing (its unfinished last sentence cut)."""
    return text if sample == GREEDY else trim_unfinished_tail(text)


def answer_digest(text: str) -> str:
    return sha256_text(text)[:16]


def plan_model_judge(items: list[WorkItem], answers: ResultCache) -> list[WorkItem]:
    """Every answer that exists gets a verdict of the refusal judge model."""
    return [item for item in items if item.key in answers]


def model_judge_worker(judge: ModelJudgeClient, answers: ResultCache) -> Callable[[WorkItem], dict[str, Any]]:
    def work(item: WorkItem) -> dict[str, Any]:
        text = judged_text(item.sample, answers.get(item.key)["text"])
        verdict = judge.verdict(item.query, text)
        return {"judge": judge.name, "refusal": verdict.refusal, "p_refusal": verdict.p_refusal,
                "raw": verdict.raw, "answer_sha256": answer_digest(text)}
    return work
