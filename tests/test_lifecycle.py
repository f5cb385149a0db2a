"""The broker's processes: loopback-only sockets, and nothing left behind however serve ends."""
import os
import signal

import pytest

from actorbroker.scripts import proctree
from tests.util import processes_of_kind
from tests.wire import RawConnection


def test_every_socket_of_the_process_tree_listens_on_loopback_only(start_broker):
    b = start_broker()
    conn = RawConnection(*b.address)   # a connection adds a ConnectionActor and a transport
    conn.hello()
    pids = b.processes()
    assert len(pids) >= 5              # serve, admin, logger, broker root, listener, ...
    listening = proctree.listening_sockets(pids)
    ports = {port for _, _, port in listening}
    assert b.port in ports and b.admin_port in ports
    public = [(pid, host, port) for pid, host, port in listening if host != "127.0.0.1"]
    assert not public, f"sockets listening beyond loopback: {public}"
    conn.close()


def test_sigterm_stops_every_process(start_broker):
    b = start_broker()
    RawConnection(*b.address).hello()
    assert b.stop(signal.SIGTERM) == []
    assert b.proc.returncode == 0


def test_sigkill_of_serve_still_stops_every_process(start_broker):
    b = start_broker()
    conn = RawConnection(*b.address)
    conn.hello()
    pids = b.processes()
    b.proc.kill()                       # serve cannot clean up: the actors must notice
    b.proc.wait()
    assert b.wait_gone(pids, timeout=30) == []
    assert conn.expect_closed(timeout=5)


@pytest.mark.parametrize("victim", ["logger", "admin"])
def test_serve_exits_nonzero_when_the_actor_system_is_lost(start_broker, victim):
    """kill -9 of Thespian's admin or logger takes the actor system down: serve must not go on
    serving nothing, but exit non-zero (so that a service manager restarts it), leaving no
    process of the broker behind."""
    b = start_broker()
    RawConnection(*b.address).hello()
    pids = b.processes()
    admins = processes_of_kind(b, "ab-admin")
    target = b.admin_pid if victim == "admin" else next(p for p in admins if p != b.admin_pid)
    os.kill(target, signal.SIGKILL)
    assert b.proc.wait(timeout=20) != 0
    assert b.wait_gone(pids, timeout=30) == []
