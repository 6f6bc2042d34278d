"""`dro-judge`: judge answers for refusal from JSONL on stdin, one JSON verdict line per input.

Input lines: `{"prompt": ..., "response": ...}` (`prompt` is optional and not read by the judges; an
`id` field, if present, is copied to the output). Output lines, in input order:
`{"refusal": bool, "judge": name, "matched": rule-or-null}` (plus `id`).

A bad input line (not UTF-8, not JSON, not an object, no string `response`) does not stop the run:
its output line is `{"line": N, "error": "..."}` so outputs stay aligned with inputs, the same message
goes to stderr, and the exit status is 1. Blank lines are skipped. Exit 2: bad arguments.

This is a thin entry point: the judging lives in `safeprompt.judge`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import IO, Any

from safeprompt.judge import DEFAULT_JUDGE, JUDGES, Judge, get_judge


class BadLine(ValueError):
    """One input line cannot be judged."""


def parse_line(raw: bytes) -> dict[str, Any]:
    """The JSON object of one input line; BadLine says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadLine(f"not UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        item = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadLine(f"not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(item, dict):
        raise BadLine(f"expected a JSON object, got {type(item).__name__}")
    if "response" not in item:
        raise BadLine('missing field "response"')
    if not isinstance(item["response"], str):
        raise BadLine(f'field "response" must be a string, got {type(item["response"]).__name__}')
    return item


def judge_stream(judge: Judge, source: IO[bytes], sink: IO[str], errors: IO[str]) -> int:
    """Judge every line of `source`; return the number of bad lines."""
    bad = 0
    for number, raw in enumerate(source, start=1):
        if not raw.strip():
            continue
        try:
            item = parse_line(raw)
        except BadLine as error:
            bad += 1
            message = f"line {number}: {error}"
            errors.write(f"dro-judge: {message}\n")
            sink.write(json.dumps({"line": number, "error": message}) + "\n")
            continue
        verdict = judge.judge(item["response"])
        out: dict[str, Any] = {"refusal": verdict.refusal, "judge": verdict.judge, "matched": verdict.matched}
        if "id" in item:
            out["id"] = item["id"]
        sink.write(json.dumps(out, ensure_ascii=False) + "\n")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dro-judge",
        description=(
            'Judge answers for refusal: JSONL {"prompt", "response"} on stdin, one JSON verdict per line on stdout.'
        ),
    )
    parser.add_argument(
        "--judge", default=DEFAULT_JUDGE, choices=sorted(JUDGES), help=f"judge to use (default: {DEFAULT_JUDGE})"
    )
    args = parser.parse_args(argv)
    judge = get_judge(args.judge)
    bad = judge_stream(judge, sys.stdin.buffer, sys.stdout, sys.stderr)
    sys.stdout.flush()
    if bad:
        sys.stderr.write(f"dro-judge: {bad} bad line(s)\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
