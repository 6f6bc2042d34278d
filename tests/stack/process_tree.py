"""What a test needs to prove that nothing a command started survives it, read from /proc.

Orphans are re-parented to PID 1, so survivors are found by the session and process group they
were started in, not by their parent chain.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def _stat(pid_dir: Path) -> tuple[str, int, int, int] | None:
    try:
        stat = (pid_dir / "stat").read_text()
    except OSError:
        return None
    state, ppid, pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
    return state, int(ppid), int(pgrp), int(session)


def live_processes() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, pgrp, session) of every live (not zombie) process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(entry)
            if stat is not None and stat[0] not in ("Z", "X"):
                table[int(entry.name)] = stat[1:]
    return table


def children_of(pid: int) -> set[int]:
    return {child for child, (ppid, _pgrp, _session) in live_processes().items() if ppid == pid}


def survivors(leaders: set[int]) -> dict[int, str]:
    """Live processes whose process group or session is led by one of `leaders`, with their command lines."""
    found = {}
    for pid, (_ppid, pgrp, session) in live_processes().items():
        if pgrp in leaders or session in leaders:
            try:
                found[pid] = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
    return found


def kill_groups(leaders: set[int] | list[int]) -> None:
    """SIGKILL the process groups led by `leaders` (a test's last-resort cleanup); gone groups are skipped."""
    for leader in leaders:
        try:
            os.killpg(leader, signal.SIGKILL)
        except ProcessLookupError:
            pass
