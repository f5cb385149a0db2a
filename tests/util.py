"""Helpers for tests: waiting for a condition the broker makes observable, client processes."""
import os
import subprocess
import sys
import time
from pathlib import Path

from actorbroker.scripts import proctree
from tests import sockets

ROOT = Path(__file__).resolve().parent.parent


def wait_for(probe, condition, timeout=10.0, interval=0.02):
    """Call probe() until condition(result) holds; returns the last result (fails on timeout).

    For states the broker exposes only by query (stats); events that arrive as frames are awaited
    as frames instead."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if condition(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last: {result!r}")
        time.sleep(interval)


def stats(client, topic):
    return client.stats(topic)


def consumers_of(stats_frame, subscription):
    for sub in stats_frame["subscriptions"]:
        if sub["name"] == subscription:
            return sub["consumers"]
    return []


class ClientProcess:
    """A consumer in its own OS process, so that it can be killed or frozen for real."""

    def __init__(self, broker, topic, subscription, sub_type, name, heartbeat_ms=None, hold=False):
        """hold: a reliable consumer that never acknowledges what it receives."""
        args = [sys.executable, str(ROOT / "tests" / "client_proc.py"), broker.host, str(broker.port),
                topic, subscription, sub_type, name, str(heartbeat_ms or 0), "hold" if hold else "ack"]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)))
        line = self.proc.stdout.readline().decode()
        assert line.startswith("ready"), f"client process failed: {line!r}"
        self.consumer_id = int(line.split()[1])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


def failover_holding(broker, client, topic, count):
    """Failover subscription "s" of a reliable `topic`: consumer "a" in a process of its own,
    active, holding `count` messages it never acknowledges, and consumer "b" of `client` on
    standby. Returns (a's ClientProcess, b)."""
    held = ClientProcess(broker, topic, "s", "failover", "a", hold=True)
    standby = client.subscribe(topic, "s", "failover", "b")
    producer = client.producer(topic)
    for i in range(count):
        producer.send(b"m%d" % i)
    producer.flush()
    wait_for(lambda: consumers_of(client.stats(topic), "s"),
             lambda cs: [c["unacked"] for c in cs if c["name"] == "a"] == [count])
    return held, standby


def topic_round(client, admin, name):
    """A topic created, used by a producer and a consumer, closed, and deleted (churn)."""
    producer = client.producer(name)
    consumer = client.subscribe(name, "s", "exclusive", "c")
    producer.send_sync(b"hello")
    assert consumer.receive(timeout=10).payload == b"hello"
    consumer.close()
    producer.close()
    admin.delete_topic(name)


# --- broker processes by kind, and which process holds which TCP connection ---------------------

def process_kind(pid):
    """What a broker process calls itself (/proc/PID/comm: ab-root, ab-shard, ab-topic, ...)."""
    return proctree.name(pid)


def processes_of_kind(broker, kind):
    """PIDs of the broker's own processes of this kind, alive now."""
    return [pid for pid in broker.processes() if process_kind(pid) == kind]


def parent_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
        return int(data[data.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _established_tcp():
    """{inode: (local port, remote port)} of every ESTABLISHED TCP socket of the machine."""
    return {inode: (local[1], remote[1]) for inode, local, remote in sockets.tcp_sockets("01")}


def own_ports_to(port):
    """Local ports of this process's TCP connections to `port` (to learn which port a client got)."""
    established = _established_tcp()
    return {established[i][0] for i in sockets.socket_inodes(os.getpid())
            if i in established and established[i][1] == port}


def peer_ports_held_by(pid, port):
    """Remote ports of the connections accepted on `port` whose socket process `pid` holds."""
    established = _established_tcp()
    return {established[i][1] for i in sockets.socket_inodes(pid)
            if i in established and established[i][0] == port}


def raise_nofile_limit():
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; returns the old (soft, hard)."""
    import resource
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (old[1], old[1]))
    return old
