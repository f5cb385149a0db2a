"""The trust boundary of the broker's Thespian sockets (issue 10, case 16): they unpickle what they
receive, so every packet must carry the broker's HMAC (actors/signing.py) and anything else is
refused before it is unpickled."""
import os
import pathlib
import pickle
import secrets
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from actorbroker.actors import signing
from tests import sockets
from actorbroker.transport.client import Client
from tests.util import ROOT, consumers_of, process_kind, wait_for


class TouchOnLoad:
    """Unpickling this creates `path`: harmless proof that a pickle was executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def thespian_packet(body):
    """Thespian's framing: the length in ASCII, '>', then the (normally pickled) body."""
    return b"%d>" % len(body) + body


def send_until_closed(port, packet):
    """Send one packet to a Thespian socket and read until the broker closes it (it answers a
    packet it cannot use with a negative ack and closes): the packet has then been handled.
    False if nothing closed it (a socket no process reads)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(packet)
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return False
    return True


def thespian_ports(broker):
    """{port: the kind of process listening on it} for every TCP port of the broker's processes
    but the client port."""
    listening = sockets.listening_sockets(broker.processes())
    return {port: process_kind(pid) for pid, _, port in listening if port != broker.port}


def exchange(client, consumer, producer, count):
    """`count` sends on `producer` all reach `consumer` (acknowledged)."""
    sent = [producer.send(b"m%d" % i) for i in range(count)]
    producer.flush()
    offsets = [f.result(10) for f in sent]
    got = [consumer.receive(timeout=10) for _ in range(count)]
    assert [m.id for m in got] == offsets
    consumer.ack(got, sync=True)


def serves_clients(broker, topic, count=20):
    """A new client can subscribe, send and receive, and stats agree."""
    with Client(*broker.address) as client:
        consumer = client.subscribe(topic, "s", "exclusive", "c")
        producer = client.producer(topic)
        exchange(client, consumer, producer, count)
        stats = client.stats(topic)
        assert (stats["msgs_in"], stats["producers"]) == (count, 1)
        assert [c["name"] for c in consumers_of(stats, "s")] == ["c"]


def refusals_logged(broker):
    logs = [broker.data_dir / "broker.log", broker.data_dir / "serve.stderr"]
    return sum(path.read_text(errors="replace").count("refused a Thespian packet")
               for path in logs if path.exists())


def test_foreign_pickles_on_every_thespian_socket_are_refused_unexecuted(start_broker, topic, tmp_path):
    """Case 16: a well-framed Thespian packet whose pickle would create a file, sent unsigned and
    with a forged MAC to the admin port and to every actor's socket, is never unpickled; the
    broker goes on serving, its live connection included, and stops cleanly."""
    b = start_broker("--default-dispatch", "reliable")
    with Client(*b.address) as client:   # every kind of actor alive: shards, topic, log, sub, disp
        consumer = client.subscribe(topic, "live", "exclusive", "c")
        producer = client.producer(topic)
        exchange(client, consumer, producer, 10)
        ports = thespian_ports(b)
        kinds = set(ports.values())
        assert b.admin_port in ports
        assert {"ab-admin", "ab-root", "ab-listener", "ab-conn", "ab-shard", "ab-topic", "ab-log",
                "ab-sub", "ab-disp"} <= kinds, ports
        markers, unread = [], []
        for port in ports:
            unsigned, forged = tmp_path / f"unsigned-{port}", tmp_path / f"forged-{port}"
            markers += [unsigned, forged]
            forged_mac = secrets.token_bytes(signing.MAC_BYTES)
            for packet in (pickle.dumps(TouchOnLoad(unsigned)), forged_mac + pickle.dumps(TouchOnLoad(forged))):
                if not send_until_closed(port, thespian_packet(packet)):
                    unread.append((port, ports[port]))
        assert [m.name for m in markers if m.exists()] == []
        assert unread == []   # no socket where connections just queue
        assert refusals_logged(b) == len(markers)   # each refused, logged once
        exchange(client, consumer, producer, 10)
        stats = client.stats(topic)
        assert stats["msgs_in"] == 20 and consumers_of(stats, "live")[0]["unacked"] == 0
    serves_clients(b, topic + "-after")
    assert b.stop(signal.SIGTERM) == []
    assert b.proc.returncode == 0


NOBODY = 65534


def lanes_closed_for_another_user(names):
    """Connect to each abstract socket from a forked process running as `nobody` (no exec: the
    interpreter may live where nobody cannot read); for each, whether the broker closed it."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: plain system calls only, always ends in os._exit
        status = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            for name in names:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(10)
                    s.connect("\0" + name)
                    try:
                        closed = s.recv(1) == b""
                    except ConnectionResetError:
                        closed = True
                    except TimeoutError:
                        closed = False
                    os.write(write_end, b"1" if closed else b"0")
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        answers = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return [a == ord("1") for a in answers]


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another user needs root")
def test_lanes_from_another_users_process_are_closed_unread(start_broker, topic):
    """Unix lanes are abstract sockets (no file permissions, names listed in /proc/net/unix): a
    process of another user that connects to one is closed before anything is read."""
    b = start_broker("--default-dispatch", "reliable")
    with Client(*b.address) as client:
        consumer = client.subscribe(topic, "live", "exclusive", "c")
        producer = client.producer(topic)
        exchange(client, consumer, producer, 10)
        lanes = [n for n in sockets.unix_listening_names(b.processes()) if n.startswith("actorbroker-lane-")]
        assert len(lanes) >= 3, lanes   # the topic's, its log's, its dispatcher's
        assert lanes_closed_for_another_user(lanes) == [True] * len(lanes)
        exchange(client, consumer, producer, 10)
    assert (b.data_dir / "broker.log").read_text().count("refused a lane from another user") == len(lanes)


def test_shared_secret_file_is_used_and_never_exposed(start_broker, topic, tmp_path):
    secret = secrets.token_hex(32).encode()
    path = tmp_path / "cluster.secret"
    path.write_bytes(secret + b"\n")
    path.chmod(0o600)
    b = start_broker("--cluster-secret-file", str(path))
    serves_clients(b, topic)
    for pid in b.processes():
        for name in ("environ", "cmdline"):
            try:
                exposed = pathlib.Path(f"/proc/{pid}/{name}").read_bytes()
            except (ProcessLookupError, FileNotFoundError):   # ended since it was listed
                continue
            assert secret not in exposed, (pid, name)
    assert b.stop(signal.SIGTERM) == []
    assert b.proc.returncode == 0


def test_a_new_data_dir_is_private_to_the_broker_user(start_broker, tmp_path):
    data_dir = tmp_path / "new" / "data"
    b = start_broker("--data-dir", str(data_dir))
    assert data_dir.stat().st_mode & 0o777 == 0o700
    with Client(*b.address) as client:   # started through: a SIGTERM during start-up can hang
        client.ping()
    assert b.stop(signal.SIGTERM) == []


def serve_with_secret_file(tmp_path, content, mode):
    """serve with a secret file of this content and mode: (exit status, stderr), when refused."""
    path = tmp_path / "cluster.secret"
    path.write_bytes(content)
    path.chmod(mode)
    run = subprocess.run(
        [sys.executable, "-m", "actorbroker.scripts.cli", "serve", "--port", "0",
         "--data-dir", str(tmp_path / "data"), "--cluster-secret-file", str(path)],
        cwd=ROOT, capture_output=True, timeout=60)
    return run.returncode, run.stderr


def test_secret_file_readable_by_others_or_short_is_refused(tmp_path):
    secret = secrets.token_hex(32).encode()
    for mode in (0o640, 0o604):
        status, stderr = serve_with_secret_file(tmp_path, secret, mode)
        assert status == 1 and b"chmod 600" in stderr
    status, stderr = serve_with_secret_file(tmp_path, b"too short", 0o600)
    assert status == 1 and b"at least 32" in stderr


def refused_serve(tmp_path, *options):
    """serve with these options, expected to refuse them before it starts anything: its stderr
    (it exited 1 and made no data folder)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "actorbroker.scripts.cli", "serve", "--port", "0",
         "--data-dir", str(tmp_path / "data"), *options],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        stderr = proc.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:   # it serves: stopped in order (SIGTERM) before failing
        proc.terminate()
        proc.communicate(timeout=30)
        raise AssertionError(f"serve started with {options}")
    assert proc.returncode == 1, stderr
    assert not (tmp_path / "data").exists()
    return stderr


def test_thespian_sockets_off_loopback_need_a_multi_host_convention(tmp_path):
    # Thespian's sockets unpickle what they receive: a single broker (no shared secret, so no
    # other host could ever join) refuses to put them on another interface, before starting.
    assert b"not a loopback address" in refused_serve(tmp_path, "--actor-host", "0.0.0.0")


@pytest.mark.parametrize("actor_host,refusal", [
    ("0.0.0.0", b"not 0.0.0.0"), ("::", b"not 0.0.0.0"), ("203.0.113.5", b"not a private address"),
    ("8.8.4.4", b"not a private address"), ("broker.example", b"takes an IP address")])
def test_actor_host_with_a_secret_file_keeps_the_guards_of_cluster_bind(tmp_path, actor_host, refusal):
    """--actor-host with --cluster-secret-file put Thespian's unpickling sockets on 0.0.0.0 or on a
    public address, where --cluster-bind refuses both: the same guards apply to it now."""
    path = tmp_path / "cluster.secret"
    path.write_bytes(secrets.token_hex(32).encode())
    path.chmod(0o600)
    stderr = refused_serve(tmp_path, "--actor-host", actor_host, "--cluster-secret-file", str(path))
    assert refusal in stderr, stderr


# --- the signing serializer itself (pure, no sockets) ------------------------------------------

def test_signed_pickle_round_trips_and_refuses_without_unpickling(tmp_path):
    signer = signing.SignedPickle(signing.new_secret())
    message = ("sender", {"topic": "/a", "n": [1, 2, 3]})
    assert signer.loads(signer.dumps(message)) == message
    marker = tmp_path / "executed"
    evil = pickle.dumps(TouchOnLoad(marker))
    other = signing.SignedPickle(signing.new_secret())
    tampered = bytearray(signer.dumps(message))
    tampered[-2] ^= 1
    refused = [evil, b"", b"x" * 10, bytes(signing.MAC_BYTES) + evil,
               other.dumps(TouchOnLoad(marker)), bytes(tampered)]
    for packet in refused:
        with pytest.raises(signing.UnsignedPacket):
            signer.loads(packet)
    assert not marker.exists()
    assert signer.refused == len(refused)


def test_secret_shorter_than_32_bytes_is_refused():
    with pytest.raises(ValueError):
        signing.SignedPickle(b"x" * 31)
    assert len({signing.new_secret() for _ in range(10)}) == 10


def _lane_challenges(ports, wait_s=2.0):
    """Connect to listening sockets of the broker, all at once: a TCP lane sends its 16-byte
    challenge at once; a Thespian socket sends nothing. Returns [(socket, challenge)] of the
    lanes; the others are closed once `wait_s` has passed with nothing from them."""
    pending = {}
    for port in ports:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        s.setblocking(False)
        pending[s] = b""
    lanes = []
    deadline = time.monotonic() + wait_s
    while pending and time.monotonic() < deadline:
        ready, _, _ = select.select(list(pending), [], [], max(0.0, deadline - time.monotonic()))
        for s in ready:
            chunk = s.recv(16 - len(pending[s]))
            got = pending[s] + chunk
            if not chunk or len(got) == 16:
                del pending[s]
                if len(got) == 16:
                    s.setblocking(True)
                    lanes.append((s, got))
                else:
                    s.close()
            else:
                pending[s] = got
    for s in pending:
        s.close()
    return lanes


def test_tcp_lanes_refuse_a_peer_without_the_broker_secret(start_broker, topic):
    """--lanes tcp: a process that reaches a lane's port but does not know the broker's secret
    is closed before any frame of it is read; the broker's own lanes still carry records."""
    from actorbroker.transport.lanes import LaneOp, encode_lane_frame, lane_proof
    b = start_broker("--lanes", "tcp")
    with Client(*b.address) as client:
        consumer = client.subscribe(topic, "s", "exclusive", "c")
        producer = client.producer(topic)
        producer.send(b"before").result(10)
        assert consumer.receive(timeout=10).payload == b"before"
        lanes = _lane_challenges([port for _pid, _host, port in sockets.listening_sockets(b.processes())
                                  if port != b.port])
        assert len(lanes) >= 2, "the topic and the dispatcher each listen for lanes"
        forged = encode_lane_frame([LaneOp.HELLO, "intruder"]) + encode_lane_frame([LaneOp.ACK, 1, [0], 1])
        wrong_secret = signing.new_secret()
        for s, challenge in lanes:
            with s:
                s.sendall(lane_proof(wrong_secret, challenge) + forged)
                s.settimeout(10)
                assert s.recv(100) == b"", "a lane without the secret's proof must be closed"
        # the log goes through Thespian's logger process: it is written a moment later
        wait_for(lambda: (b.data_dir / "broker.log").read_text().count("refused a TCP lane without a valid proof"),
                 lambda n: n == len(lanes))
        producer.send(b"after").result(10)
        assert consumer.receive(timeout=10).payload == b"after"
