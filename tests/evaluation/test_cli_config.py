"""The command line builds the pydantic EvalConfig: the same flags as ever, the paper's sampling
defaults from `safeprompt.sampling`, one-line errors, and an unchanged run fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from evaluation.__main__ import build_parser, config_from_args, describe_validation_error, main
from evaluation.config import EvalConfig, GuardSettings, derive_seed
from safeprompt.judge.model_judge import ModelJudgeSettings
from evaluation.runner import WorkItem, answer_params
from safeprompt.sampling import PAPER_SAMPLING
from trainer.config import LabelConfig

FLAGS = ["--base-url", "--model", "--mode", "--variants", "--artifact", "--api-key-env", "--sets", "--custom-set",
         "--limit", "--data-dir", "--no-greedy", "--samples", "--keep", "--temperature", "--top-p", "--top-k",
         "--min-tokens", "--max-tokens-harmful", "--max-tokens-harmless", "--seed", "--full-greedy-answers",
         "--judge", "--guard-url", "--guard-model", "--guard-api-key-env", "--model-judge-url",
         "--model-judge-model", "--model-judge-format", "--model-judge-threshold", "--model-judge-no-constrain",
         "--model-judge-api-key-env", "--run-dir", "--concurrency", "--timeout-s", "--max-requests", "--no-chart"]


def parse(*argv: str) -> EvalConfig:
    return config_from_args(build_parser().parse_args(["--base-url", "http://h:1", "--model", "m",
                                                       "--run-dir", "/tmp/r", *argv]))


def test_the_flags_are_the_ones_dro_eval_always_had() -> None:
    flags = [option for action in build_parser()._actions for option in action.option_strings
             if option.startswith("--") and option != "--help"]
    assert flags == FLAGS


def test_defaults_are_the_configs_and_the_papers_sampling() -> None:
    config = parse()
    assert config == EvalConfig(base_url="http://h:1", model="m", run_dir=Path("/tmp/r"))
    assert config.sampling == PAPER_SAMPLING
    assert LabelConfig().sampling == PAPER_SAMPLING  # the trainer's labels sample the same way


def test_every_flag_reaches_its_field(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KEY", "secret-a")
    monkeypatch.setenv("GUARD_KEY", "secret-b")
    config = parse("--mode", "direct", "--variants", "none,dro", "--artifact", f"dro={tmp_path}",
                   "--api-key-env", "KEY", "--sets", "advbench", "--custom-set", "x:harmful:q.txt", "--limit", "5",
                   "--data-dir", str(tmp_path), "--no-greedy", "--samples", "4", "--keep", "3",
                   "--temperature", "0.7", "--top-p", "0.8", "--top-k", "20", "--min-tokens", "2",
                   "--max-tokens-harmful", "30", "--max-tokens-harmless", "20", "--seed", "9",
                   "--full-greedy-answers", "--judge", "paper", "--guard-url", "http://g", "--guard-model", "lg",
                   "--guard-api-key-env", "GUARD_KEY", "--concurrency", "2", "--timeout-s", "5",
                   "--max-requests", "7", "--no-chart")
    assert config.public_dict() == {
        "base_url": "http://h:1", "model": "m", "run_dir": "/tmp/r", "variants": ["none", "dro"], "mode": "direct",
        "artifacts": {"dro": str(tmp_path)}, "sets": ["advbench"], "custom_sets": ["x:harmful:q.txt"], "limit": 5,
        "greedy": False, "samples": 4, "keep": 3, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_tokens": 2,
        "max_tokens_harmful": 30, "max_tokens_harmless": 20, "seed": 9, "judge": "paper",
        "guard": {"base_url": "http://g", "model": "lg", "max_tokens": 10}, "concurrency": 2, "timeout_s": 5.0,
        "max_requests": 7, "data_dir": str(tmp_path), "chart": False, "stop_greedy_when_judged": False,
        "model_judge": None}
    assert config.api_key.get_secret_value() == "secret-a"
    assert config.guard == GuardSettings("http://g", "lg", "secret-b")
    assert "secret" not in repr(config)


def test_the_run_fingerprint_is_unchanged() -> None:
    """A run directory written before the config became pydantic must still resume."""
    assert parse("--samples", "3").fingerprint() == {
        "artifacts": {}, "max_tokens_harmful": 300, "max_tokens_harmless": 200, "min_tokens": 10, "mode": "gateway",
        "model": "m", "seed": 0, "stop_greedy_when_judged": True, "temperature": 1.0, "top_k": 50, "top_p": 0.9}


def test_requests_carry_the_shared_sampling() -> None:
    config = parse("--samples", "2", "--temperature", "0.5", "--max-tokens-harmless", "40")
    sampled = answer_params(WorkItem("good", "harmless", 3, "q", "none", "1"), config)
    assert sampled == {"temperature": 0.5, "top_p": 0.9, "top_k": 50, "min_tokens": 10, "max_tokens": 40,
                       "seed": sampled["seed"]}
    assert answer_params(WorkItem("bad", "harmful", 3, "q", "none", "greedy"), config) == {
        "temperature": 0.0, "max_tokens": 300}
    assert derive_seed(7, "pooled", "harmful", "dro") == 279435625  # bootstrap seeds of published reports


@pytest.mark.parametrize("argv, message", [
    (["--top-p", "1.5"], "--top-p: Input should be less than or equal to 1"),
    (["--samples", "2", "--keep", "3"], "--keep must be in [1, --samples=2], got 3"),
    (["--mode", "direct"], "--variants all needs the gateway's model list; name the variants in direct mode"),
    (["--concurrency", "0"], "--concurrency: Input should be greater than 0"),
])
def test_invalid_settings_are_one_line_errors(argv: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValidationError) as error:
        parse(*argv)
    assert message in describe_validation_error(error.value)
    assert main(["--base-url", "http://h:1", "--model", "m", "--run-dir", "/tmp/r", *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"dro-eval: error: {message}"


def test_command_line_errors_before_the_config(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    for argv, message in ((["--guard-url", "http://g"], "--guard-url and --guard-model go together"),
                          (["--api-key-env", "NO_SUCH_KEY"], "environment variable NO_SUCH_KEY is not set"),
                          (["--mode", "direct", "--artifact", "a=x", "--artifact", "a=y"], "given twice")):
        assert main(["--base-url", "http://h:1", "--model", "m", "--run-dir", "/tmp/r", *argv]) == 2
        assert message in capsys.readouterr().err


def test_model_judge_flags_reach_their_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUDGE_KEY", "secret-c")
    config = parse("--model-judge-url", "http://j:9", "--model-judge-model", "allenai/wildguard",
                   "--model-judge-format", "wildguard", "--model-judge-threshold", "0.7",
                   "--model-judge-no-constrain", "--model-judge-api-key-env", "JUDGE_KEY")
    assert config.model_judge == ModelJudgeSettings(base_url="http://j:9", model="allenai/wildguard",
                                                    format="wildguard", threshold=0.7, constrain=False,
                                                    api_key="secret-c")
    assert config.stop_greedy_when_judged is False  # the judge model reads whole answers
    assert config.public_dict()["model_judge"] == {
        "base_url": "http://j:9", "model": "allenai/wildguard", "format": "wildguard", "threshold": 0.7,
        "constrain": False, "max_chars": 4000, "timeout_s": 60.0}
    assert "secret-c" not in repr(config)
    defaults = parse("--model-judge-url", "http://j:9", "--model-judge-model", "judge").model_judge
    assert defaults == ModelJudgeSettings(base_url="http://j:9", model="judge")
    assert defaults.name == "model:ask:judge"


def test_model_judge_needs_whole_greedy_answers() -> None:
    with pytest.raises(ValidationError, match="reads whole answers"):
        EvalConfig(base_url="http://h:1", model="m", run_dir=Path("/tmp/r"),
                   model_judge=ModelJudgeSettings(base_url="http://j", model="judge"))


@pytest.mark.parametrize("argv, message", [
    (["--model-judge-url", "http://j"], "--model-judge-url and --model-judge-model go together"),
    (["--model-judge-threshold", "0.6"], "--model-judge-* options need --model-judge-url and --model-judge-model"),
    (["--model-judge-url", "http://j", "--model-judge-model", "m", "--model-judge-threshold", "1.5"],
     "--model-judge-threshold: Input should be less than 1"),
])
def test_model_judge_flag_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--base-url", "http://h:1", "--model", "m", "--run-dir", "/tmp/r", *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"dro-eval: error: {message}"


def test_without_greedy_answers_a_model_judge_leaves_the_fingerprint_alone() -> None:
    plain = parse("--no-greedy", "--samples", "3")
    judged = parse("--no-greedy", "--samples", "3", "--model-judge-url", "http://j", "--model-judge-model", "m")
    assert judged.fingerprint() == plain.fingerprint()  # an existing run directory resumes with the judge added
