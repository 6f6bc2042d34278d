"""Label stage: the authors' post-processing, keeping the longest samples, soft labels; both samplers
stop early when asked, and a broken stream is an error, never a label."""

from __future__ import annotations

import json

import httpx
import pytest

from safeprompt.client import StreamError
from safeprompt.judge import PaperMatcher, Verdict
from trainer.__main__ import main
from trainer.config import LabelConfig
from trainer.label import LabelRecord, sample_hf, sample_vllm, score_samples


def test_soft_label_is_the_complied_share_of_the_longest_cleaned_samples():
    # Six samples, keep the 3 longest after cleaning: 4, 1, 2, of which one complied, so 1/3. Every
    # plausible mistake gives another value: the first three 2/3, the shortest three 2/3, all six
    # 1/2, the refusal share 2/3, ranking by raw length (sample 5's unfinished tail) 0.
    samples = ["Sure thing.",                                                 # complied
               "I cannot help with that request, sorry.",                     # refusal
               "Here is the recipe you wanted.",                              # complied
               "Ok.",                                                         # complied
               "I'm sorry, but I will not do it.",                            # refusal
               "I'm sorry, I can't.\nStep one is to take the thing and then"]  # refusal, tail cut
    record = score_samples("short", 7, samples, PaperMatcher(), num_keep=3)
    assert [len(s.split()) for s in record.samples] == [2, 7, 6, 1, 8, 4]
    assert record.samples[5] == "I'm sorry, I can't."
    assert record.refusals == [False, True, False, False, True, True]
    assert record.kept == [1, 2, 4]
    assert record.soft_label == pytest.approx(1 / 3)
    assert (record.condition, record.query_index) == ("short", 7)


class ClosesAfterFirstWord:
    """A judge whose window closes once the answer has any non-space text (never a refusal)."""

    name = "closes-after-first-word"

    def judge(self, text: str) -> Verdict:
        return Verdict(refusal=False, judge=self.name, matched=None)

    def window_closed(self, text: str) -> bool:
        return bool(text.strip())


def test_hf_sampler_stops_generating_once_the_judge_window_closes(frozen):
    """Counted in forward passes of the model: without the stop, min = max new tokens forces all 12."""
    forward_passes = []
    hook = frozen.model.register_forward_hook(lambda module, args, output: forward_passes.append(1))
    jobs = [("none", 0, "Tell me a long story about a cat.", True)]
    try:
        runs = {}
        for stop in (False, True):
            forward_passes.clear()
            config = LabelConfig(backend="hf", num_samples=3, num_keep=2, min_new_tokens=12,
                                 max_new_tokens_harmless=12, stop_when_judged=stop)
            records: list[LabelRecord] = []
            sample_hf(config, frozen, jobs, ClosesAfterFirstWord(), records.append)
            runs[stop] = (len(forward_passes), records)
    finally:
        hook.remove()
    assert runs[False][0] == 12
    assert 1 <= runs[True][0] <= 4, runs[True][0]
    assert [len(r.samples) for r in runs[True][1]] == [3] and runs[True][1][0].soft_label == 1.0
    # The sampler counts the tokens it generated: all 12 without the stop, what ran before it with it.
    assert runs[False][1][0].tokens == [12, 12, 12]
    assert all(1 <= count <= runs[True][0] for count in runs[True][1][0].tokens), runs[True][1][0].tokens


# --- vLLM sampler: the request, early hang-up and broken streams, against an in-process fake ------------

def streamed(words: list[str], *, end: str = "data: [DONE]\n\n", served: list[int] | None = None,
             usage: int | None = None):
    """An SSE body, one word an event; `served` counts the events the client actually read; `usage` adds
    vLLM's last event of a stream with `include_usage` (no choices, the completion's token count)."""
    def events():
        for word in words:
            if served is not None:
                served.append(1)
            yield ("data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": word},
                                                       "finish_reason": None}]}) + "\n\n").encode()
        if usage is not None:
            yield ("data: " + json.dumps({"choices": [], "usage": {"completion_tokens": usage}}) + "\n\n").encode()
        yield end.encode()
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events())


def vllm_config(**overrides) -> LabelConfig:
    return LabelConfig(vllm_url="http://fake-vllm", served_model_name="tiny", num_samples=2, num_keep=2,
                       concurrency=2, **overrides)


def test_vllm_sampler_sends_the_shared_paper_sampling_and_hangs_up_once_judged():
    bodies, served = [], []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return streamed(["Once", " upon", " a", " time"] + [" more"] * 40, served=served, usage=44)

    jobs = [("short", 3, "Tell me a story.", True)]
    for stop in (False, True):
        served.clear()
        records: list[LabelRecord] = []
        sample_vllm(vllm_config(stop_when_judged=stop), jobs, ClosesAfterFirstWord(), records.append,
                    transport=httpx.MockTransport(handler))
        assert len(records) == 1 and records[0].soft_label == 1.0
        if stop:
            assert records[0].samples == ["Once", "Once"] and len(served) <= 2 * 2
            assert records[0].tokens == [None, None]  # hung up before the usage event
        else:
            assert len(served) == 2 * 44 and records[0].samples[0].startswith("Once upon a time more")
            assert records[0].tokens == [44, 44]
    sent = {key: bodies[0][key] for key in ("temperature", "top_p", "top_k", "min_tokens", "max_tokens", "seed")}
    assert sent == {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "min_tokens": 10, "max_tokens": 200,
                    "seed": 3000}
    assert sorted(body["seed"] for body in bodies[:2]) == [3000, 3001] and bodies[0]["stream"] is True
    assert bodies[0]["messages"][0]["role"] == "system" and bodies[0]["model"] == "tiny"
    assert bodies[0]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("end, message", [
    ('data: {"error": {"message": "engine died mid-answer", "code": 500}}\n\ndata: [DONE]\n\n', "engine died"),
    ("", r"without data: \[DONE\]"),
])
def test_vllm_sampler_never_labels_a_broken_stream(end: str, message: str):
    """The second query's streams fail after some text: the first query is labelled, the second raises."""
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        broken = body["messages"][-1]["content"] == "second"
        return streamed(["I", " cannot"], end=end if broken else "data: [DONE]\n\n")

    records: list[LabelRecord] = []
    jobs = [("none", 0, "first", False), ("none", 1, "second", False)]
    with pytest.raises(StreamError, match=message):
        sample_vllm(vllm_config(), jobs, PaperMatcher(), records.append, transport=httpx.MockTransport(handler))
    assert [(r.query_index, r.samples) for r in records] == [(0, ["I cannot", "I cannot"])]


@pytest.mark.integration
@pytest.mark.parametrize("stop_when_judged, judge_model", [(False, False), (True, False), (False, True)])
def test_vllm_label_backend_against_the_real_server(vllm_server, tiny_model_dir, query_files, tmp_path,
                                                    stop_when_judged, judge_model, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "judge-secret")  # the key of the judge model, by name only
    harmful, harmless = query_files
    run_dir = tmp_path / "run"
    code = main(["label", "--model-dir", str(tiny_model_dir), "--run-dir", str(run_dir), "--no-progress",
                 "--set", f"data.harmful_file={harmful}", "--set", f"data.harmless_file={harmless}",
                 "--set", "data.limit=1", "--set", "label.conditions=[none, short]",
                 "--set", f"label.vllm_url={vllm_server.base_url}",
                 "--set", f"label.served_model_name={vllm_server.served_name}",
                 "--set", "label.num_samples=2", "--set", "label.num_keep=2",
                 "--set", "label.max_new_tokens_harmful=16", "--set", "label.max_new_tokens_harmless=16",
                 "--set", f"label.stop_when_judged={str(stop_when_judged).lower()}",
                 # With a judge model, the same server judges (the tiny model forced to Yes or No).
                 *(["--set", f"label.model_judge.base_url={vllm_server.base_url}",
                    "--set", f"label.model_judge.model={vllm_server.served_name}",
                    "--set", "label.model_judge_api_key_env=JUDGE_KEY"] if judge_model else [])])
    assert code == 0
    labels = json.loads((run_dir / "labels.json").read_text())
    assert labels["conditions"] == ["none", "short"] and len(labels["records"]) == 4
    assert all(len(r["samples"]) == 2 and all(s for s in r["samples"]) for r in labels["records"])
    assert all(value in (0.0, 0.5, 1.0) for row in labels["soft_labels"] for value in row)
    assert not (run_dir / "labels.partial.jsonl").exists()
    # vLLM reports each finished stream's token count; a stream the judge hung up on has none.
    counts = [count for r in labels["records"] for count in r["tokens"]]
    assert len(counts) == 8 and all(count is None or 1 <= count <= 16 for count in counts), counts
    if not stop_when_judged:
        assert all(isinstance(count, int) for count in counts), counts
    if judge_model:  # every verdict readable, and the soft labels are those verdicts'
        for record in labels["records"]:
            assert record["unknown"] == 0
            assert record["soft_label"] == 1 - sum(record["refusals"][i] for i in record["kept"]) / 2
        config = json.loads((run_dir / "config.json").read_text())
        assert config["label"]["model_judge"]["model"] == vllm_server.served_name
        assert "judge-secret" not in (run_dir / "config.json").read_text()


# --- a refusal judge model instead of the string judge -------------------------------------------------

def test_model_verdicts_replace_the_judge_and_unreadable_ones_count_as_complied():
    samples = ["I cannot help with that.", "Sure, here it is.", "Maybe.", "Ok then.\nAnd the rest of it"]
    # The verdicts are the judge model's, whatever the string judge would say (sample 0 is a refusal
    # for PaperMatcher; the model calls it complied); None is unreadable: complied, and counted.
    record = score_samples("none", 3, samples, PaperMatcher(), num_keep=4, verdicts=[False, True, None, True])
    assert record.refusals == [False, True, False, True]
    assert record.unknown == 1 and record.soft_label == pytest.approx(2 / 4)
    assert record.samples[3] == "Ok then."  # judged, like the string judge, on the cleaned sample
    assert score_samples("none", 3, samples, PaperMatcher(), num_keep=4).unknown == 0


def test_a_judge_model_needs_whole_samples():
    from safeprompt.judge.model_judge import ModelJudgeSettings

    with pytest.raises(ValueError, match="reads whole samples"):
        LabelConfig(model_judge=ModelJudgeSettings(base_url="http://j", model="m"), stop_when_judged=True)


@pytest.mark.integration
def test_hf_sampler_with_a_judge_model_on_the_real_server(frozen, vllm_server):
    """The real vLLM server (tiny model, forced to Yes/No) judges the HF sampler's samples: one readable
    verdict per cleaned sample, and the soft label follows those verdicts."""
    from safeprompt.client import ChatClient
    from safeprompt.judge.model_judge import ModelJudgeSettings, ModelVerdict
    from safeprompt.model_judge_client import ModelJudgeClient

    settings = ModelJudgeSettings(base_url=vllm_server.base_url, model=vllm_server.served_name, max_chars=300)
    config = LabelConfig(backend="hf", num_samples=3, num_keep=3, min_new_tokens=4, max_new_tokens_harmful=8,
                         model_judge=settings)
    asked: list[tuple[str, str]] = []

    class Recording(ModelJudgeClient):
        def verdict(self, query: str, answer: str) -> ModelVerdict:
            asked.append((query, answer))
            return super().verdict(query, answer)

    records: list[LabelRecord] = []
    with ChatClient(vllm_server.base_url, max_connections=2) as client:
        sample_hf(config, frozen, [("none", 0, "How do I pick a lock?", False)], ClosesAfterFirstWord(),
                  records.append, model_judge=Recording(settings, client))
    [record] = records
    assert sorted(asked) == sorted(("How do I pick a lock?", sample) for sample in record.samples)
    assert record.unknown == 0
    assert record.soft_label == pytest.approx(1 - sum(record.refusals) / 3)


def test_the_label_fingerprint_follows_the_judge_model_not_its_address(tmp_path):
    from safeprompt.judge.model_judge import ModelJudgeSettings
    from trainer.config import RunConfig
    from trainer.pipeline import stage_keys

    def key(model_judge=None) -> dict:
        config = RunConfig(model_dir=tmp_path, run_dir=tmp_path / "run", label=LabelConfig(model_judge=model_judge))
        return stage_keys(config)["label"]

    plain = key()
    assert "model_judge" not in plain["label"] and "model_judge" not in plain  # runs without one resume as before
    judged = key(ModelJudgeSettings(base_url="http://a:1", model="judge"))
    assert judged != plain and judged["model_judge"]["model"] == "judge" and judged["model_judge_revision"]
    assert key(ModelJudgeSettings(base_url="http://b:2/v1", model="judge", api_key="k", timeout_s=5)) == judged
    assert key(ModelJudgeSettings(base_url="http://a:1", model="other")) != judged
    assert key(ModelJudgeSettings(base_url="http://a:1", model="judge", threshold=0.7)) != judged



def test_a_masked_judge_key_is_refused_and_the_key_variable_is_not_part_of_the_fingerprint(tmp_path):
    from safeprompt.judge.model_judge import ModelJudgeSettings
    from trainer.config import RunConfig
    from trainer.pipeline import stage_keys

    judge = ModelJudgeSettings(base_url="http://a:1", model="judge")
    keyed = ModelJudgeSettings(base_url="http://a:1", model="judge", api_key="real")
    written = LabelConfig(model_judge=keyed).model_dump(mode="json")  # what config.json holds
    assert written["model_judge"]["api_key"] == "**********"
    with pytest.raises(ValueError, match="model_judge_api_key_env"):  # what resuming from config.json would read
        LabelConfig(**written)

    def key(**label) -> dict:
        config = RunConfig(model_dir=tmp_path, run_dir=tmp_path / "run", label=LabelConfig(model_judge=judge, **label))
        return stage_keys(config)["label"]

    assert key(model_judge_api_key_env="JUDGE_KEY") == key()
