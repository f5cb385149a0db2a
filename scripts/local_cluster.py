"""A three-node cluster of `actorbroker serve` on one machine: one node per network namespace
(scripts/netns.py), joined in a Thespian convention (docs/cluster.md). Used by `actorbroker bench
--scenarios cluster`; the shape is the cluster tests' fixture (tests/test_cluster.py).

Every namespace, link and process it makes is removed by `stop_all()` (processes by PID, via
LocalBroker), which the caller runs in a `finally`.
"""
import os
import signal
import time
import uuid
from pathlib import Path

from actorbroker.scripts import netns, proctree
from actorbroker.scripts.local_broker import LocalBroker
from actorbroker.transport.client.sync import Client

ADMIN_PORT = 7600


def wait_for(check, timeout, what, every=0.05):
    """Poll `check` (a state the brokers reach on their own timers) until true; the deadline only
    bounds a failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(every)


class LocalCluster:
    """Nodes a, b, c (a leads) in namespaces made here. `options`: given to every node's serve."""

    def __init__(self, directory, *options, member_timeout_ms=3000, hosts=None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.options = list(options)
        self.member_timeout_ms = member_timeout_ms
        self.hosts = hosts or netns.Hosts()
        self.own_hosts = hosts is None
        self.secret = self.dir / "cluster.secret"
        fd = os.open(self.secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32).hex().encode())
        self.nodes = {}

    def start(self, node, *extra):
        """Start (or start again: same --node, same data directory) one node's serve."""
        address = self.hosts.address(node)
        options = ["--host", address, "--cluster-bind", f"{address}:{ADMIN_PORT}", "--node", node,
                   "--cluster-secret-file", str(self.secret),
                   "--member-timeout-ms", str(self.member_timeout_ms), *self.options, *extra]
        if node != netns.NODES[0]:
            options += ["--join", f"{self.hosts.address(netns.NODES[0])}:{ADMIN_PORT}"]
        broker = LocalBroker(self.dir / node, *options, prefix=self.hosts.prefix(node))
        self.nodes[node] = broker
        return broker

    def start_all(self, timeout=60):
        for node in netns.NODES:
            self.start(node)
        self.wait_all_live(timeout)

    def url(self, node):
        host, port = self.nodes[node].address
        return f"{host}:{port}"

    def client(self, node, name=None):
        return Client(*self.nodes[node].address, name=name or f"cluster-on-{node}")

    def members(self, node, client=None, timeout=10):
        if client is not None:
            return {m["node"]: m for m in client.cluster(timeout=timeout)}
        with self.client(node) as c:
            return {m["node"]: m for m in c.cluster(timeout=timeout)}

    def live(self, node):
        return sorted(n for n, m in self.members(node).items() if m["state"] == "live")

    def wait_live(self, node, expected, timeout=30):
        def check():
            try:
                return self.live(node) == sorted(expected)
            except Exception:   # noqa: BLE001 - a node starting, or busy: ask again
                return False
        wait_for(check, timeout, f"node {node} seeing {sorted(expected)} live")

    def wait_all_live(self, timeout=60):
        """Until every running node sees every running node live."""
        running = sorted(self.nodes)
        for node in running:
            self.wait_live(node, running, timeout)

    def topic_on(self, node, dispatch="non_reliable", prefix="/cl", via=None):
        """A new topic name that the cluster places on `node` (asked of `via`, default the leader)."""
        with self.client(via or netns.NODES[0]) as c:
            for _ in range(500):
                name = f"{prefix}/{dispatch[:3]}-{uuid.uuid4().hex[:10]}"
                if c.lookup(name)["node"] == node:
                    return name
        raise RuntimeError(f"no topic name placed on {node}")

    def kill(self, node):
        """kill -9 of the node's whole process tree (serve, admin, every actor), by PID. Returns
        (time.time_ns() and time.monotonic() taken just before the first SIGKILL, time.time_ns()
        once every one of them is seen gone (polled every 5 ms; up to 30 s), the PIDs still alive
        then (none, normally))."""
        broker = self.nodes.pop(node)
        try:
            pids = broker.processes()
            at = time.time_ns(), time.monotonic()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            deadline = time.monotonic() + 30
            left = pids
            while left and time.monotonic() < deadline:
                left = [p for p in left if proctree.alive(p)]
                if left:
                    time.sleep(0.005)
            gone_ns = time.time_ns()
            broker.proc.wait()
            return (*at, gone_ns, left)
        finally:
            broker.stderr.close()
            broker.proc.stdout.close()

    def stop_all(self):
        """Stop every node (SIGCONT first, in case one was stopped), then remove the namespaces if
        they were made here; returns the broker PIDs left alive (none, normally)."""
        left = []
        try:
            for broker in list(self.nodes.values()):
                for pid in broker.processes():
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except OSError:
                        pass
                left += broker.stop()
            self.nodes.clear()
        finally:
            if self.own_hosts:
                self.hosts.remove()
        return left
