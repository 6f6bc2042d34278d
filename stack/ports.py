"""Who holds a TCP port, read from Linux's /proc: the check before a server starts, and the proof
that the server answering on a port is the one just started.

A listening socket appears in /proc/net/tcp{,6} with its inode; a process holds it when one of its
/proc/<pid>/fd links reads `socket:[inode]`. Knows nothing about HTTP or about what the servers are.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
TCP_LISTEN = "0A"  # st column of /proc/net/tcp: TCP_LISTEN


@dataclass(frozen=True)
class PortHolder:
    pid: int
    command: str


class PortInUseError(RuntimeError):
    """A port the stack needs is taken; the message names the holder and how to stop it."""

    def __init__(self, port: int, host: str, holders: list[PortHolder]) -> None:
        self.port = port
        self.host = host
        self.holders = holders
        if holders:
            who = ", ".join(f"PID {holder.pid} ({holder.command})" for holder in holders)
            pids = " ".join(str(holder.pid) for holder in holders)
            message = f"port {port} ({host}) is held by {who}; stop it with: kill {pids}"
        else:
            message = (f"port {port} ({host}) is in use by a process this user cannot see; "
                       f"find it with: ss -ltnp 'sport = :{port}'")
        super().__init__(message)


def listening_inodes(port: int) -> set[int]:
    """Inodes of the sockets listening on `port` at any address, IPv4 or IPv6."""
    inodes: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == TCP_LISTEN:
                inodes.add(int(fields[9]))
    return inodes


def socket_holders(inodes: set[int]) -> set[int]:
    """PIDs with an open file descriptor on one of these socket inodes (those this user may read)."""
    if not inodes:
        return set()
    links = {f"socket:[{inode}]" for inode in inodes}
    pids: set[int] = set()
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # gone, or another user's process
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in links:
                    pids.add(int(entry.name))
                    break
            except OSError:
                continue
    return pids


def listening_pids(port: int) -> set[int]:
    """PIDs holding a socket that listens on `port`."""
    return socket_holders(listening_inodes(port))


def command_line(pid: int, max_chars: int = 120) -> str:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return "?"
    text = " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def port_holders(port: int) -> list[PortHolder]:
    return [PortHolder(pid, command_line(pid)) for pid in sorted(listening_pids(port))]


def ensure_port_free(port: int, host: str = "127.0.0.1") -> None:
    """Raise PortInUseError, naming the holder, unless a server could bind `host:port` now.

    Binds the way uvicorn and vLLM do (SO_REUSEADDR), so sockets in TIME_WAIT do not count, and
    closes at once: another process may still take the port before the server binds it, which is
    why readiness also proves ownership (`session_owns_port`).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise PortInUseError(port, host, port_holders(port)) from None


def session_of(pid: int) -> int | None:
    """The session id of a live (not zombie) process, else None."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # pid (comm) state ppid pgrp session ...; comm may contain spaces and parentheses.
    state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
    return None if state in "ZX" else int(session)


def session_owns_port(session: int, port: int) -> bool:
    """True when something listens on `port` and every holder belongs to `session`.

    The stack starts each server as the leader of a new session, so its worker processes (vLLM's
    engine, uvicorn's workers) share the leader's session id while a stranger's process does not.
    """
    holders = listening_pids(port)
    return bool(holders) and all(session_of(pid) == session for pid in holders)

