"""The broker's processes: loopback-only sockets, and nothing left behind however serve ends."""
import signal

from actorbroker.scripts import proctree
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
