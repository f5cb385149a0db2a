"""The broker's processes: loopback-only sockets, and nothing left behind however serve ends."""
import os
import re
import signal

import pytest

from tests import sockets
from tests.util import processes_of_kind
from tests.wire import RawConnection


def test_every_socket_of_the_process_tree_listens_on_loopback_only(start_broker):
    b = start_broker()
    conn = RawConnection(*b.address)   # a connection adds a ConnectionActor and a transport
    conn.hello()
    pids = b.processes()
    assert len(pids) >= 5              # serve, admin, logger, broker root, listener, ...
    listening = sockets.listening_sockets(pids)
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


@pytest.mark.parametrize("dispatch", ["non_reliable", "reliable"])
def test_sigterm_ends_client_connections_before_their_topics(start_broker, topic, dispatch):
    """A stopping broker closes its client connections first: a client sees its connection end
    (and may reconnect elsewhere), never its producers and consumers closed one by one with
    `topic_lost` or `subscription_lost` by topics that happened to stop before its shard."""
    b = start_broker()
    conns = []
    for i in range(4):   # on both shards
        conn = RawConnection(*b.address)
        conn.hello()
        conn.request({"op": "producer", "topic": topic, "dispatch": dispatch})
        conn.request({"op": "subscribe", "topic": topic, "subscription": f"s{i}", "type": "failover",
                      "consumer": f"c{i}", "dispatch": dispatch})
        conns.append(conn)
    b.proc.send_signal(signal.SIGTERM)
    for conn in conns:
        frames = []
        while True:
            frame = conn.recv_frame(timeout=30)
            if frame is None:
                break
            frames.append(frame)
        assert not [f for f in frames if f.get("op") == "closed"], frames
        conn.close()
    assert b.stop() == []
    assert b.proc.returncode == 0
    # each was closed on purpose, by its shard, before the actor system's shutdown began
    closed = re.findall(r"shard \S+: (\d+) client connections closed: broker stopping",
                        (b.data_dir / "broker.log").read_text())
    assert sum(int(n) for n in closed) == len(conns)


def test_sigkill_of_serve_still_stops_every_process(start_broker):
    b = start_broker()
    conn = RawConnection(*b.address)
    conn.hello()
    pids = b.processes()
    b.proc.kill()                       # serve cannot clean up: the actors must notice
    b.proc.wait()
    assert b.wait_gone(pids, timeout=30) == []
    assert conn.expect_closed(timeout=5)


def test_sigkill_of_serve_while_it_stops_the_broker_still_stops_every_process(start_broker):
    """serve killed -9 in the middle of its own stop (after the root had StopClients, while the
    client connections were still closing): the root ignored serve's death as it was stopping
    already; the whole actor system stayed up for good, its root spinning on the dead serve's
    pidfd (found running an hour after a test). It shuts down now."""
    import socket
    from tests.util import wait_for
    b = start_broker()
    RawConnection(*b.address).hello()
    pids = b.processes()
    held = processes_of_kind(b, "ab-conn")
    for pid in held:   # the clients' stop waits for them
        os.kill(pid, signal.SIGSTOP)
    try:
        b.proc.send_signal(signal.SIGTERM)

        def refused():   # the listener had StopClients: the root is stopping
            try:
                socket.create_connection(b.address, timeout=1).close()
                return False
            except OSError:
                return True
        wait_for(refused, lambda gone: gone, timeout=30)
        b.proc.kill()
        b.proc.wait()
    finally:
        for pid in held:
            os.kill(pid, signal.SIGCONT)
    assert b.wait_gone(pids, timeout=30) == []


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


def test_tcp_lanes_carry_records_and_listen_on_loopback_only(start_broker, topic):
    """--lanes tcp (for several hosts) moves the same records, receipts and deliveries over TCP
    lanes, which bind the actor host like every other socket of the broker."""
    from actorbroker.transport.client import Client
    b = start_broker("--lanes", "tcp")
    with Client(*b.address) as client:
        consumer = client.subscribe(topic, "s", "exclusive", "c")
        producer = client.producer(topic)
        offsets = [producer.send(f"m{i}".encode()) for i in range(50)]
        producer.flush()
        got = [consumer.receive(timeout=10) for _ in range(50)]
        assert [m.id for m in got] == [f.result(5) for f in offsets]
        assert [m.payload for m in got] == [f"m{i}".encode() for i in range(50)]
        listening = sockets.listening_sockets(b.processes())
        assert len(listening) > 3    # admin, actors, client port, and now the lanes
        assert all(host == "127.0.0.1" for _, host, _ in listening), listening


@pytest.mark.parametrize("option, value, text", [
    ("--heartbeat-ms", "0", "not in [200, 60000]"),     # announced as is, it closed every connection
    ("--heartbeat-ms", "60001", "not in [200, 60000]"),
    ("--max-frame", "10", "not in [1024,"),
    ("--io-shards", "0", "--io-shards"),
    ("--max-backlog", "-1", "below 0"),
    ("--port", "70000", "not in [0, 65535]"),           # it hung 30 s, then "no answer from the broker"
    ("--port", "-1", "not in [0, 65535]"),
    ("--metrics-port", "65536", "not in [0, 65535]"),
])
def test_serve_refuses_values_it_cannot_serve_with_before_starting(tmp_path, option, value, text):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "actorbroker.scripts.cli", "serve", "--port", "0",
                           "--data-dir", str(tmp_path / "d"), option, value],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and text in done.stderr, done.stderr
    assert not (tmp_path / "d").exists()    # refused before anything started


@pytest.mark.parametrize("content, text", [
    ('["admin", "t2"]', "expected a JSON object"),             # a hello with such a token hung
    ('{"t": "admin"}', "must be a list of strings"),            # granted nothing, silently
    ('{"t": ["admn"]}', "unknown permission 'admn'"),
    ('{"t": ["consume"]}', "unknown permission 'consume'"),
    ("not json", "is not JSON"),
    ("{}", "names no token"),                                  # was auth off: everyone let in
])
def test_serve_refuses_an_auth_file_it_cannot_use(tmp_path, content, text):
    import subprocess
    import sys
    path = tmp_path / "tokens.json"
    path.write_text(content)
    done = subprocess.run([sys.executable, "-m", "actorbroker.scripts.cli", "serve", "--port", "0",
                           "--data-dir", str(tmp_path / "d"), "--auth-file", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "error: --auth-file" in done.stderr and text in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("kind", ["a file", "under /proc"])
def test_serve_refuses_a_data_dir_it_cannot_create_in_one_line(tmp_path, kind):
    import subprocess
    import sys
    path = tmp_path / "afile" if kind == "a file" else "/proc/no-such-dir/data"
    if kind == "a file":
        path.write_text("")
    done = subprocess.run([sys.executable, "-m", "actorbroker.scripts.cli", "serve", "--port", "0",
                           "--data-dir", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.startswith(f"error: --data-dir {path}: "), done.stderr
    assert "Traceback" not in done.stderr


def test_a_cli_whose_stdout_reader_left_exits_quietly_instead_of_blaming_the_broker(broker, topic):
    """`actorbroker topics --json | head -c 1`: the pipe's reader is gone before the output is
    written. Not `error: CONNECTION ... Broken pipe`: exit 141, as a shell tool ended by SIGPIPE."""
    import os
    import subprocess
    import sys
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "actorbroker.scripts.cli", "topics", "--json",
                               "--url", f"{broker.host}:{broker.port}"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


@pytest.mark.parametrize("extra", [[b"-m", b"caf\xe9"], [b"-m", b"x", b"--key", b"caf\xe9"],
                                   [b"-m", b"x", b"--attr", b"k=caf\xe9"]])
def test_a_cli_argument_that_is_not_utf8_is_one_error_line(broker, topic, extra):
    """Bytes from a Latin-1 terminal: `error: BAD_ARGUMENT ...` and exit 1, not a traceback."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable.encode(), b"-m", b"actorbroker.scripts.cli", b"produce", topic.encode(),
                           *extra, b"--url", f"{broker.host}:{broker.port}".encode()],
                          capture_output=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr.decode().strip().splitlines() == ["error: BAD_ARGUMENT: an argument is not valid UTF-8 "
                                                         "text (bytes b'\\xe9')"]


def test_sigterm_stops_in_order_although_nobody_reads_serves_stdout_any_more(start_broker, tmp_path, topic):
    """`serve | head -1`, or a log collector that died: serve's "stopping" line once raised
    BrokenPipeError, serve exited 1 without closing its clients or saving the cursors, and
    messages acknowledged just before came back after a restart."""
    from tests.test_reliable import producer, receive, send, subscribe
    data = tmp_path / "data"
    b = start_broker(data_dir=data)
    conn = RawConnection(*b.address)
    conn.hello()
    send(conn, producer(conn, topic), [b"m%d" % i for i in range(100)])
    consumer = subscribe(conn, topic, "s", start="earliest")
    got = receive(conn, 100)
    # acks without rid, as a client acks, a moment before the stop (the rid'ed one follows them)
    conn.send_frame({"op": "ack", "consumer": consumer, "ids": [m[0] for m in got[:-1]]})
    conn.request({"op": "ack", "consumer": consumer, "ids": [got[-1][0]]})
    b.proc.stdout.close()   # serve's stdout: a pipe nobody reads any more
    assert b.stop() == []
    assert b.proc.returncode == 0
    again = start_broker(data_dir=data)
    conn = RawConnection(*again.address)
    conn.hello()
    send(conn, producer(conn, topic), [b"after"])
    subscribe(conn, topic, "s")
    # anything redelivered would come first (a reliable subscription delivers in offset order)
    assert receive(conn, 1, fields=("payload",)) == [(b"after",)]


def test_actor_processes_inherit_the_temporary_directory_already_computed():
    """Thespian logs from its SIGTERM handler, which computes tempfile.gettempdir() under a lock
    the first time: a SIGTERM (die_with_parent) that came while the process computed it itself
    hung the process for good (found: actor processes forked during a subscribe storm whose topic
    was killed, idle for hours). The admin computes it before it forks any actor."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import tempfile; assert tempfile.tempdir is None; "
                          "import actorbroker.actors.system, actorbroker.actors.process; "
                          "print(tempfile.tempdir)"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() not in ("", "None")


def _processes_with(marks):
    """Live processes whose command line contains one of `marks` (found in /proc)."""
    from actorbroker.scripts import proctree
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(mark in command for mark in marks) and proctree.alive(int(entry)):
            found.append(int(entry))
    return found


def _describe(pids):
    from actorbroker.scripts import proctree
    from tests.util import parent_of
    return [(pid, parent_of(pid), proctree.name(pid)) for pid in pids]


def _listens(port):
    return any(local[1] == port for _, local, _ in sockets.tcp_sockets("0A"))


def _startup_stage(serve_pid, data_dir, admin_port):
    """How far serve's start has come: "starter" (its child starting the admin runs), "admin" (the
    admin listens), "root" (the root actor's process exists); None before."""
    from actorbroker.scripts import proctree
    from tests.util import parent_of
    procs = _processes_with([str(data_dir)])
    if any(proctree.name(p) == "ab-root" for p in procs):
        return "root"
    if _listens(admin_port):
        return "admin"
    if any(parent_of(p) == serve_pid and "actorbroker.actors.system" in open(f"/proc/{p}/cmdline").read()
           for p in procs if proctree.alive(p)):
        return "starter"
    return None


@pytest.mark.parametrize("stage", ["starter", "admin", "root"])
def test_sigkill_of_serve_while_it_starts_leaves_no_process(start_broker, tmp_path, stage):
    """kill -9 of serve during its start (before its "listening" line): the admin daemonizes, and
    only the root actor watched serve, from its StartBroker on. Killed before that, serve left the
    admin, its logger and maybe the root running for good, holding the admin port: a restart on
    the same --admin-port failed. Now every process serve started ends within a few seconds,
    whatever the moment, and the admin port can serve again."""
    import subprocess
    import sys
    import time
    from actorbroker.actors.system import free_port
    order = ["starter", "admin", "root"]
    # a start that went past the stage between two polls: again (each poll reads every process's
    # cmdline: with a few hundred processes on the machine, five starts all passed the root stage
    # unseen once)
    for attempt in range(12):
        admin_port = free_port()
        data_dir = tmp_path / f"data{attempt}"
        serve = subprocess.Popen([sys.executable, "-m", "actorbroker.scripts.cli", "serve", "--port", "0",
                                  "--data-dir", str(data_dir), "--admin-port", str(admin_port)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        # serve, its guard, the admin's tree; a process stopping the system
        marks = [str(data_dir), f"--admin-port {admin_port} ", f"--stop-system {admin_port} "]
        try:
            deadline = time.monotonic() + 60
            while True:   # poll the start until it reaches the stage (or a later one: missed)
                reached = _startup_stage(serve.pid, data_dir, admin_port)
                if reached is not None and order.index(reached) >= order.index(stage):
                    break
                assert serve.poll() is None and time.monotonic() < deadline, "serve did not start"
            serve.kill()
            serve.wait()
            if reached != stage or serve.stdout.read() != b"":
                continue   # missed (cleaned up below)
            # the guard waits for an admin still starting to listen, then stops it: on a machine
            # at load 8-10 the admin's start alone took seconds, and 10 s in all was once short
            deadline = time.monotonic() + 30
            while _processes_with(marks) and time.monotonic() < deadline:
                time.sleep(0.05)
            left = _processes_with(marks)
            assert left == [], f"processes of the killed serve left running: {_describe(left)}"
            assert not _listens(admin_port)
            break
        finally:
            for pid in _processes_with(marks):   # do not leak them into the next test or attempt
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            serve.stdout.close()
    else:
        pytest.fail(f"every start passed {stage} before it was seen")
    start_broker("--admin-port", str(admin_port), data_dir=data_dir)   # the admin port serves again
