"""A small Dockerfile reader for static checks: stages, instructions, exec-form arguments, flags.

Understands what the project's Dockerfiles use: parser directives, comments, line continuations,
`FROM image AS name`, instruction flags (`--from=`, `--interval=`), exec (JSON) and shell forms,
and `.dockerignore` allowlists. It knows nothing about building images; no heredocs, no ONBUILD.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_FLAG = re.compile(r"^--([a-z-]+)=(\S*)\s*")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    text: str  # the arguments, continuations joined, flags removed
    flags: dict[str, str]
    line: int  # 1-based line where the instruction starts

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form RUN/CMD/ENTRYPOINT/HEALTHCHECK CMD, else None."""
        text = self.text
        if self.keyword == "HEALTHCHECK":
            if not text.startswith("CMD"):
                return None
            text = text[3:].strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        if not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
            raise ValueError(f"line {self.line}: exec form must be a JSON array of strings")
        return value

    def words(self) -> list[str]:
        """Shell-style split of the arguments (for COPY, USER, ENV, ARG)."""
        return shlex.split(self.text)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [ins for ins in self.instructions if ins.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    global_args: list[Instruction]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}; stages: {[s.name for s in self.stages]}")

    @property
    def default_target(self) -> Stage:
        """The stage `docker build` builds without --target: the last one."""
        return self.stages[-1]


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join continuation lines; drop comments, blank lines and parser directives."""
    lines: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # comment lines are removed even inside a continuation, as Docker does
        if not current:
            start = number
        if stripped.endswith("\\"):
            current.append(stripped[:-1].strip())
            continue
        current.append(stripped)
        lines.append((start, " ".join(part for part in current if part)))
        current = []
    if current:
        raise ValueError(f"line {start}: the file ends inside a line continuation")
    return lines


def parse_dockerfile(text: str) -> Dockerfile:
    global_args: list[Instruction] = []
    stages: list[Stage] = []
    for line, logical in _logical_lines(text):
        keyword, _, rest = logical.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        flags: dict[str, str] = {}
        while match := _FLAG.match(rest):
            flags[match.group(1)] = match.group(2)
            rest = rest[match.end():]
        instruction = Instruction(keyword, rest, flags, line)
        if keyword == "FROM":
            words = rest.split()
            if len(words) == 3 and words[1].upper() == "AS":
                stages.append(Stage(base=words[0], name=words[2]))
            elif len(words) == 1:
                stages.append(Stage(base=words[0], name=None))
            else:
                raise ValueError(f"line {line}: cannot read FROM {rest!r}")
        elif not stages:
            if keyword != "ARG":
                raise ValueError(f"line {line}: only ARG may come before the first FROM, got {keyword}")
            global_args.append(instruction)
        else:
            stages[-1].instructions.append(instruction)
    if not stages:
        raise ValueError("no FROM instruction")
    return Dockerfile(global_args, stages)


def read_dockerfile(path: Path) -> Dockerfile:
    return parse_dockerfile(path.read_text())


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore glob: `**` spans directories, `*` and `?` stay within one."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def dockerignore_excludes(patterns_text: str, relative_path: str) -> bool:
    """Whether `.dockerignore` keeps `relative_path` out of the build context.

    The last matching pattern wins, `!` re-includes, and a pattern that matches a parent directory
    matches everything below it, as Docker does.
    """
    patterns = [line.strip() for line in patterns_text.splitlines()
                if line.strip() and not line.strip().startswith("#")]
    parts = Path(relative_path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex((pattern[1:] if negate else pattern).strip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded
