"""Who holds a port: the check before a server starts and the ownership proof behind readiness."""

from __future__ import annotations

import os
import socket
from typing import Iterator

import pytest

from stack.ports import PortInUseError, ensure_port_free, listening_pids, port_holders, session_owns_port
from stack.processes import free_port


@pytest.fixture
def listener() -> Iterator[int]:
    """A plain socket listening on 127.0.0.1 (a stranger to the stack); yields its port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_listening_socket_is_traced_to_its_process(listener: int) -> None:
    assert listening_pids(listener) == {os.getpid()}
    (holder,) = port_holders(listener)
    assert holder.pid == os.getpid()
    assert "pytest" in holder.command


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_held_port_is_refused_with_its_holder_and_how_to_stop_it(listener: int, host: str) -> None:
    with pytest.raises(PortInUseError) as raised:
        ensure_port_free(listener, host)
    message = str(raised.value)
    assert f"port {listener} ({host}) is held by PID {os.getpid()} (" in message
    assert message.endswith(f"stop it with: kill {os.getpid()}")


def test_free_port_passes_and_a_closed_connection_does_not_hold_it() -> None:
    port = free_port()
    ensure_port_free(port, "127.0.0.1")
    ensure_port_free(port, "0.0.0.0")
    # A server that has just stopped leaves TIME_WAIT connections behind; they must not count.
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            accepted.close()
            client.recv(1)
    ensure_port_free(port, "127.0.0.1")


def test_port_is_owned_only_by_the_session_holding_it(listener: int) -> None:
    assert session_owns_port(os.getsid(0), listener)
    assert not session_owns_port(os.getsid(0) + 1, listener)
    assert not session_owns_port(os.getsid(0), free_port())  # nobody listens there
