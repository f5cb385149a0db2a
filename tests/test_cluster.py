"""One broker over three hosts (docs/cluster.md): three network namespaces made by the test, a
real `actorbroker serve` in each, joined in a Thespian convention; clients in the test's own
namespace reach every node. Every namespace, link and process is removed by the test."""
import contextlib
import os
import signal
import threading
import time
import uuid

import pytest

from actorbroker.scripts.local_cluster import LocalCluster, wait_for
from actorbroker.transport.client.core import Reconnect
from actorbroker.transport.client.sync import Client
from actorbroker.transport.errors import (BrokerError, ConsumerBusy, ProducerBusy, ProducerClosed,
                                         TopicNotFound, TopicUnavailable)
from actorbroker.scripts import netns

TIMEOUT_MS = 3000          # member timeout (the default): a loss is declared within it

pytestmark = pytest.mark.skipif(netns.unavailable() is not None,
                                reason=f"cluster tests need network namespaces: {netns.unavailable()}")


class Cluster(LocalCluster):
    """scripts/local_cluster.py's cluster, with the checks a test wants: a kill leaves nothing
    behind, and every namespace and link is gone at the end (three_nodes)."""

    def __init__(self, tmp_path, *options):
        super().__init__(tmp_path, *options, member_timeout_ms=TIMEOUT_MS)

    def topic_on(self, node, dispatch="non_reliable"):
        return super().topic_on(node, dispatch, via="a")

    def kill(self, node):
        *_, left = super().kill(node)
        assert not left, f"processes of node {node} left after kill -9: {left}"


@pytest.fixture
def cluster(tmp_path):
    yield from three_nodes(tmp_path)


@pytest.fixture
def shared_cluster(tmp_path):
    """Three nodes whose reliable topics live in one folder they all see (`--shared-data`)."""
    yield from three_nodes(tmp_path, "--shared-data", str(tmp_path / "shared"))


def three_nodes(tmp_path, *options):
    c = Cluster(tmp_path, *options)
    try:
        for node in netns.NODES:
            c.start(node)
        c.wait_live("a", ["a", "b", "c"])
        c.wait_live("c", ["a", "b", "c"])
        yield c
    finally:
        left = c.stop_all()
        assert not left, f"broker processes left behind: {left}"
        assert not c.hosts.leftovers(), f"namespaces or links left behind: {c.hosts.leftovers()}"


def produce(client, topic, payloads, dispatch="non_reliable"):
    producer = client.producer(topic, dispatch=dispatch)
    for p in payloads:
        producer.send_sync(p)
    return producer


def receive_all(consumer, count, timeout=10):
    got = []
    while len(got) < count:
        msg = consumer.receive(timeout=timeout)
        # acknowledged before it returns: a node cut right after must not find the ack in flight
        # (its message would, rightly, be delivered again to another consumer)
        consumer.ack(msg, sync=True, timeout=timeout)
        got.append(msg.payload)
    return got


# --- configuration ---------------------------------------------------------------------------------

def test_serve_refuses_unsafe_cluster_options(tmp_path):
    """No convention on a public address without --trust-cluster-network, none on 0.0.0.0, none
    without a shared secret: serve exits 1 before starting anything."""
    import subprocess
    import sys
    secret = tmp_path / "s"
    secret.write_bytes(os.urandom(32).hex().encode())
    secret.chmod(0o600)
    cases = [
        (["--cluster-bind", "8.8.8.8:7600", "--cluster-secret-file", str(secret)], "not a private address"),
        # "private" to Python's ipaddress, not to docs/cluster.md: broadcast, documentation, reserved
        (["--cluster-bind", "255.255.255.255:7600", "--cluster-secret-file", str(secret)], "not a private address"),
        (["--cluster-bind", "203.0.113.5:7600", "--cluster-secret-file", str(secret)], "not a private address"),
        (["--cluster-bind", "240.0.0.1:7600", "--cluster-secret-file", str(secret)], "not a private address"),
        (["--cluster-bind", "0.0.0.0:7600", "--cluster-secret-file", str(secret)], "not 0.0.0.0"),
        (["--cluster-bind", "10.1.2.3:7600"], "--cluster-secret-file"),
        (["--join", "10.1.2.3:7600"], "need --cluster-bind"),
    ]
    for options, text in cases:
        done = subprocess.run([sys.executable, "-m", "actorbroker.scripts.cli", "serve", "--port", "0",
                               "--data-dir", str(tmp_path / "d"), *options],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, (options, done.stderr)
        assert text in done.stderr, (options, done.stderr)


# --- any node serves any client and any topic ------------------------------------------------------------

def test_members_and_listening_sockets(cluster):
    members = cluster.members("b")
    assert sorted(members) == ["a", "b", "c"]
    assert members["a"]["role"] == "leader" and members["b"]["role"] == "member"
    assert all(m["state"] == "live" for m in members.values())
    assert members["b"]["self"] and members["c"]["address"] == \
        f"{cluster.hosts.address('c')}:{cluster.nodes['c'].port}"
    # Thespian's sockets and the lanes are on the cluster address only: never 0.0.0.0
    for node, broker in cluster.nodes.items():
        for pid in broker.processes():
            for host in listening_hosts(pid):
                assert host in (cluster.hosts.address(node),), (node, pid, host)


def test_cluster_command_lists_the_members(cluster):
    import subprocess
    import sys
    b = cluster.nodes["b"]
    done = subprocess.run([sys.executable, "-m", "actorbroker.scripts.cli", "cluster", "--url",
                           f"{b.host}:{b.port}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["NODE", "ROLE", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    assert rows["a"][1:3] == ["leader", "live"] and rows["b"][1:4] == ["*", "member", "live"]
    assert rows["c"][1:4] == ["member", "live", f"{cluster.hosts.address('c')}:{cluster.nodes['c'].port}"]
    for row in cluster.members("a").values():
        assert {"connections", "topics", "msgs_per_s", "heartbeat_age_ms"} <= set(row)
    # --watch refreshes the table until it is stopped
    watch = subprocess.Popen([sys.executable, "-m", "actorbroker.scripts.cli", "cluster", "--url",
                              f"{b.host}:{b.port}", "--watch", "0.1"], stdout=subprocess.PIPE, text=True)
    try:
        tables = 0
        for line in watch.stdout:
            tables += "HEARTBEAT AGE" in line
            if tables == 3:
                break
        assert tables == 3
    finally:
        watch.kill()
        watch.wait()
        watch.stdout.close()


def listening_hosts(pid):
    """IPv4 addresses the process listens on (from /proc/PID/net/tcp and its fds)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
                  if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")}
        lines = open(f"/proc/{pid}/net/tcp").read().splitlines()[1:]
    except OSError:
        return []
    hosts = []
    for line in lines:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:   # LISTEN
            raw = fields[1].split(":")[0]
            hosts.append(".".join(str(int(raw[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return hosts


@pytest.mark.parametrize("sub_type", ["exclusive", "shared", "failover", "key_shared"])
def test_produce_on_a_consume_on_c_topic_on_b(cluster, sub_type):
    topic = cluster.topic_on("b")
    with cluster.client("c") as on_c, cluster.client("a") as on_a:
        consumer = on_c.subscribe(topic, "s", sub_type, "c1")
        payloads = [f"m{i}".encode() for i in range(200)]
        produce(on_a, topic, payloads)
        got = receive_all(consumer, len(payloads))
        assert sorted(got) == sorted(payloads)
        if sub_type != "shared":
            assert got == payloads
        # every node names the owner
        assert on_a.lookup(topic)["node"] == "b" and on_c.lookup(topic)["exists"]
        assert on_c.stats(topic)["node"] == "b"
        listed = [t for t in on_a.topics() if t["name"] == topic]
        assert listed and listed[0]["node"] == "b" and listed[0]["subscriptions"] == 1


def test_reliable_topic_across_nodes(cluster):
    topic = cluster.topic_on("b", "reliable")
    with cluster.client("a") as on_a, cluster.client("c") as on_c:
        consumer = on_c.subscribe(topic, "durable", "exclusive", "c1", dispatch="reliable", start="earliest")
        produce(on_a, topic, [b"r%d" % i for i in range(50)], dispatch="reliable")
        assert receive_all(consumer, 50) == [b"r%d" % i for i in range(50)]


# --- member loss ---------------------------------------------------------------------------------



def lost_within(cluster, observers, node, since, what):
    """Seconds from `since` until every observer has declared `node` lost."""
    wait_for(lambda: all(cluster.members(o)[node]["state"] == "lost" for o in observers),
             TIMEOUT_MS / 1000 + 10, f"{what}: {node} declared lost by {observers}")
    return time.monotonic() - since


def lost_both_ways(cluster, node, since):
    """`node`, cut off at `since`, is declared lost by the others, and they by it."""
    others = [other for other in ("a", "b", "c") if other != node]
    lost_within(cluster, others, node, since, f"{node} cut off")
    for other in others:
        lost_within(cluster, [node], other, since, f"{node} cut off")


def rehomed(cluster, topic, away_from, on="a"):
    """Wait until the cluster places `topic` on a node other than `away_from`; that node."""
    def placed():
        with cluster.client(on) as c:
            found = c.lookup(topic)
        return found["node"] if found["available"] and found["node"] != away_from else None
    return wait_for(placed, 10, f"{topic} re-homed away from {away_from}")


def attached(client, topic):
    """(producers, subscriptions with a consumer, their consumers' credits) of a topic, as its
    owner's stats say now."""
    try:
        stats = client.stats(topic)
    except (TopicNotFound, TopicUnavailable):   # not re-created yet
        return 0, [], []
    subs = [s for s in stats["subscriptions"] if s["consumers"]]
    return (stats["producers"], [s["name"] for s in subs],
            [c["credits"] for s in subs for c in s["consumers"]])


def test_kill_9_of_a_node(cluster):
    """B's whole process tree is killed: A and C declare it lost within the member timeout; its
    non_reliable topic is re-homed and serves A and C; its reliable topic answers
    TOPIC_UNAVAILABLE until B returns, then serves every receipted message."""
    volatile = cluster.topic_on("b")
    durable = cluster.topic_on("b", "reliable")
    elsewhere = cluster.topic_on("c")
    b, c = cluster.nodes["b"], cluster.nodes["c"]
    # a client of B with the cluster's seed addresses: it goes on on C, its consumer subscribed again
    of_b = Client(b.host, b.port, reconnect=Reconnect([(b.host, b.port), (c.host, c.port)], initial=0.05))
    with of_b, cluster.client("a") as on_a, cluster.client("c") as on_c:
        moved = of_b.subscribe(elsewhere, "m", "exclusive", "b1")
        durable_consumer = on_c.subscribe(durable, "d", "exclusive", "c1", dispatch="reliable",
                                          start="earliest")   # (acks nothing: all come again below)
        durable_producer = produce(on_a, durable, [b"r%d" % i for i in range(100)], dispatch="reliable")
        on_a_consumer = on_a.subscribe(volatile, "sa", "exclusive", "a1")
        on_c_consumer = on_c.subscribe(volatile, "sc", "exclusive", "c1")
        on_a_producer = produce(on_a, volatile, [b"before"])
        assert receive_all(on_a_consumer, 1) == receive_all(on_c_consumer, 1) == [b"before"]
        # created where they were placed (a member seen lost for a moment would have moved them)
        owners = {t["name"]: t["node"] for t in on_a.topics()}
        assert owners[volatile] == owners[durable] == "b" and owners[elsewhere] == "c", owners

        killed = time.monotonic()
        cluster.kill("b")
        # sends while the topic is lost and moving: every one is answered (a receipt, or
        # TOPIC_UNAVAILABLE while the producer is moved), none waits forever (they once did, all
        # of them); none gets INTERNAL or UNKNOWN_PRODUCER (the first few did: cluster probe)
        during = []
        while time.monotonic() - killed < 1.0:
            during.append(on_a_producer.send(b"during"))
            time.sleep(0.01)   # pacing: a send every 10 ms through the loss
        errors = []
        for future in during:
            try:
                future.result(10)
            except BrokerError as exc:
                errors.append(exc.code)
        assert set(errors) <= {"TOPIC_UNAVAILABLE"}, errors
        detected = lost_within(cluster, ["a", "c"], "b", killed, "kill -9")
        assert detected < TIMEOUT_MS / 1000 + 0.5, detected   # + the test's own polling
        # the reliable topic's producer and consumer are closed with the reasons docs/protocol.md
        # names: their lanes ended before the loss was declared
        wait_for(lambda: durable_producer.closed_reason and durable_consumer.closed_reason, 10,
                 "the reliable topic's producer and consumer closed")
        assert durable_producer.closed_reason in ("topic_lost", "node_lost")
        assert durable_consumer.closed_reason in ("subscription_lost", "node_lost")
        # The non_reliable topic is re-created on a survivor and its producer and consumers are
        # re-attached there by the broker: the clients see a gap, no `closed`, no new request.
        owner = rehomed(cluster, volatile, "b")
        assert owner in ("a", "c")
        def reattached():   # 1000 credits each (the client's receiver queue), 1 used at most
            producers, subs, credits = attached(on_a, volatile)
            return producers == 1 and subs == ["sa", "sc"] and all(c >= 999 for c in credits)
        wait_for(reattached, 10, "producer and consumers re-attached, with the credits their clients have left")
        after = [b"after-%d" % i for i in range(50)]
        for payload in after:
            on_a_producer.send_sync(payload)
        assert receive_all(on_a_consumer, 50) == after
        assert receive_all(on_c_consumer, 50) == after
        assert time.monotonic() - killed < TIMEOUT_MS / 1000 + 5.0

        produce(on_a, elsewhere, [b"moved"])
        assert receive_all(moved, 1) == [b"moved"]
        assert {m["node"]: m for m in of_b.cluster()}["c"]["self"]   # now a client of C

        for client in (on_a, on_c):
            with pytest.raises(TopicUnavailable):
                client.subscribe(durable, "d", "exclusive", "c1", dispatch="reliable")
            with pytest.raises(TopicUnavailable):
                client.producer(durable, dispatch="reliable")

    cluster.start("b")   # same node name, same data directory
    cluster.wait_live("a", ["a", "b", "c"])
    cluster.wait_live("c", ["a", "b", "c"])
    with cluster.client("c") as on_c:
        assert on_c.lookup(durable)["node"] == "b"
        consumer = on_c.subscribe(durable, "d", "exclusive", "c1", dispatch="reliable")
        assert receive_all(consumer, 100) == [b"r%d" % i for i in range(100)]


@contextlib.contextmanager
def stopped_until_lost(cluster, node):
    """Every process of `node` stopped (SIGSTOP) until the other nodes have declared it lost, and
    for the `with` block; continued at its end."""
    pids = cluster.nodes[node].processes()
    stopped = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        lost_within(cluster, [n for n in ("a", "b", "c") if n != node], node, stopped, "SIGSTOP")
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_sigstop_of_a_node_then_it_fences_itself(cluster):
    """A stopped node keeps its sockets open: the heartbeat finds it lost; its non_reliable topic
    goes to a survivor; once continued it learns it was lost, ends its own copy, and comes back as
    a new incarnation: the topic never has two owners."""
    topic = cluster.topic_on("b")
    with cluster.client("a") as on_a, cluster.client("c") as on_c:
        consumer = on_c.subscribe(topic, "s", "shared", "c1")
        with stopped_until_lost(cluster, "b"):
            owner = rehomed(cluster, topic, "b", on="c")
            # no socket told C: the loss itself re-attaches its consumer on the survivor
            wait_for(lambda: attached(on_c, topic)[1] == ["s"], 10, "the consumer re-attached")
            produce(on_a, topic, [b"x%d" % i for i in range(20)])
            assert sorted(receive_all(consumer, 20)) == sorted(b"x%d" % i for i in range(20))
        cluster.wait_live("a", ["a", "b", "c"])
        cluster.wait_live("b", ["a", "b", "c"])
        # one owner, the survivor, in every node's view; B's own copy is gone
        for node in ("a", "b", "c"):
            with cluster.client(node) as c:
                assert c.lookup(topic)["node"] == owner
                assert [t["node"] for t in c.topics() if t["name"] == topic] == [owner]
        with cluster.client("b") as on_b:
            produce(on_b, topic, [b"from-b"])
        assert receive_all(consumer, 1) == [b"from-b"]


def send_when_attached(producer, payload, timeout=15):
    """send_sync, again while the producer is being moved to its topic's new node
    (TOPIC_UNAVAILABLE, docs/protocol.md, Cluster)."""
    def attempt():
        try:
            producer.send_sync(payload)
            return True
        except TopicUnavailable:
            return None
    wait_for(attempt, timeout, f"{payload!r} sent", every=0.2)


def test_link_cut_between_two_nodes(cluster):
    """Only the A-B link goes down: A and B declare each other lost, C sees both; B's topic is
    unavailable from A (never opened a second time) and keeps serving C; when the link is back,
    A reaches it again. B fenced its copy then (A had declared it lost): C's producer and
    consumer of it, whose links were never cut, are moved to its new copy and see nothing but a
    gap (they were closed `topic_deleted`: cluster probe, 5 of 5)."""
    topic = cluster.topic_on("b")
    with cluster.client("c") as on_c:
        consumer = on_c.subscribe(topic, "s", "exclusive", "c1")
        producer = produce(on_c, topic, [b"before"])
        assert receive_all(consumer, 1) == [b"before"]
        cut = time.monotonic()
        cluster.hosts.cut("a", "b")
        try:
            lost_within(cluster, ["a"], "b", cut, "link cut")
            lost_within(cluster, ["b"], "a", cut, "link cut")
            assert cluster.live("c") == ["a", "b", "c"]
            with cluster.client("a") as on_a:
                with pytest.raises(TopicUnavailable):
                    on_a.producer(topic)
            producer.send_sync(b"still")
            assert receive_all(consumer, 1) == [b"still"]
        finally:
            cluster.hosts.mend("a", "b")
        cluster.wait_live("a", ["a", "b", "c"])
        cluster.wait_live("b", ["a", "b", "c"])
        wait_for(lambda: attached(on_c, topic)[:2] == (1, ["s"]), 15,
                 "C's producer and consumer attached to the topic after the fence")
        send_when_attached(producer, b"healed")
        assert receive_all(consumer, 1) == [b"healed"]
        assert (producer.closed_reason, consumer.closed_reason) == (None, None)
    # the next use from anywhere finds the one copy
    with cluster.client("a") as on_a, cluster.client("c") as on_c:
        owner = on_a.lookup(topic)["node"]
        consumer = on_c.subscribe(topic, "s2", "exclusive", "c1")
        produce(on_a, topic, [b"healed again"])
        assert receive_all(consumer, 1) == [b"healed again"]
        assert [t["node"] for t in on_c.topics() if t["name"] == topic] == [on_a.lookup(topic)["node"]]
        assert owner in ("a", "b", "c")


def test_a_node_cut_off_from_every_other_keeps_serving_its_clients(cluster):
    """B's links to A and C go down for 15 s; its client port stays reachable. B keeps answering
    its own clients all along (it lived ~13 s: its heartbeats to the unreachable members clogged
    Thespian's 20 transmits in progress, nothing else left its root, serve gave the node up and
    exited), and once the links are back every node sees every other live."""
    cut = time.monotonic()
    cluster.hosts.cut("b", "a")
    cluster.hosts.cut("b", "c")
    try:
        lost_within(cluster, ["b"], "a", cut, "cut off")
        while time.monotonic() - cut < 15:
            assert cluster.nodes["b"].proc.poll() is None, "b's serve exited while cut off"
            with cluster.client("b") as on_b:
                assert "b" in [m["node"] for m in on_b.cluster(timeout=5)]
            time.sleep(1)
    finally:
        cluster.hosts.mend("b", "a")
        cluster.hosts.mend("b", "c")
    for node in "abc":
        cluster.wait_live(node, ["a", "b", "c"])


def cut_off(cluster, node):
    """Take every link between `node` and the other nodes down (its client port stays up)."""
    for other in netns.NODES:
        if other != node:
            cluster.hosts.cut(node, other)


def mend_all(cluster, node):
    for other in netns.NODES:
        if other != node:
            cluster.hosts.mend(node, other)


def test_a_node_cut_off_and_healed_fences_itself_and_no_one_else(cluster):
    """docs/cluster.md, fencing of a node: B is cut off from A and C long enough for each side
    to declare the other lost, then its links come back. B saw no majority: it fences itself
    (its stale copy of its topic ends: its own client's consumer is moved to the topic's copy
    on the survivor, with a gap and no `closed`).
    A and C kept a majority: what B declared fences neither of them, so their clients'
    producer and consumer of B's re-homed topic, and of A's own topic, go on with no `closed`,
    and every node names one owner for each. (They were once all closed, `topic_deleted`: A and
    C fenced themselves because B had declared them lost.)"""
    moved = cluster.topic_on("b")
    kept = cluster.topic_on("a")
    with cluster.client("a") as on_a, cluster.client("c") as on_c, cluster.client("b") as on_b:
        consumer = on_a.subscribe(moved, "s", "shared", "a1")
        producer = produce(on_c, moved, [b"before"])
        assert receive_all(consumer, 1) == [b"before"]
        kept_consumer = on_c.subscribe(kept, "k", "exclusive", "c1")
        kept_producer = produce(on_a, kept, [b"k-before"])
        assert receive_all(kept_consumer, 1) == [b"k-before"]
        stale = on_b.subscribe(moved, "b", "exclusive", "b1")   # B's own client, on B's copy
        cut = time.monotonic()
        cut_off(cluster, "b")
        try:
            lost_both_ways(cluster, "b", cut)
            owner = rehomed(cluster, moved, "b")
            assert owner in ("a", "c")
            wait_for(lambda: attached(on_a, moved)[:2] == (1, ["s"]), 10,
                     "producer and consumer re-attached on the survivor")
            producer.send_sync(b"during")
            assert receive_all(consumer, 1) == [b"during"]
        finally:
            mend_all(cluster, "b")
        # A and C accept B again only once it came back as a new incarnation: it fenced itself
        for node in ("a", "b", "c"):
            cluster.wait_live(node, ["a", "b", "c"])
        wait_for(lambda: "b" in attached(on_c, moved)[1], 15, "B's client moved from its stale copy")
        producer.send_sync(b"after")
        assert receive_all(consumer, 1) == [b"after"]
        assert receive_all(stale, 1) == [b"after"] and stale.closed_reason is None
        kept_producer.send_sync(b"k-after")
        assert receive_all(kept_consumer, 1) == [b"k-after"]
        assert producer.closed_reason is None and consumer.closed_reason is None
        assert kept_producer.closed_reason is None and kept_consumer.closed_reason is None
        for node in ("a", "b", "c"):
            with cluster.client(node) as c:
                assert c.lookup(moved)["node"] == owner and c.lookup(kept)["node"] == "a"
                listed = {(t["name"], t["node"]) for t in c.topics() if t["name"] in (moved, kept)}
                assert listed == {(moved, owner), (kept, "a")}, (node, listed)


def test_a_node_without_a_majority_in_view_creates_no_reliable_topic(cluster):
    """docs/cluster.md: a reliable topic is never opened a second time. B, cut off, created a new
    reliable topic on its own disk while A and C created the same one on C: after the cut healed,
    both stayed, each with receipted messages the other lacked (a reader saw only one side's).
    A node that sees no majority refuses to create one (TOPIC_UNAVAILABLE)."""
    topic = f"/split/{uuid.uuid4().hex[:10]}"
    with cluster.client("a") as on_a, cluster.client("b") as on_b:
        cut = time.monotonic()
        cut_off(cluster, "b")
        try:
            lost_both_ways(cluster, "b", cut)
            with pytest.raises(TopicUnavailable):
                on_b.producer(topic, dispatch="reliable")
            producer = produce(on_a, topic, [b"majority"], dispatch="reliable")
        finally:
            mend_all(cluster, "b")
        for node in ("a", "b", "c"):
            cluster.wait_live(node, ["a", "b", "c"])
        producer.send_sync(b"after")
        owners = set()
        for node in ("a", "b", "c"):
            with cluster.client(node) as c:
                listed = [t["node"] for t in c.topics() if t["name"] == topic]
                assert len(listed) == 1, (node, listed)
                owners.add(listed[0])
                reader = c.subscribe(topic, f"r-{node}", "exclusive", "r", dispatch="reliable", start="earliest")
                assert receive_all(reader, 2) == [b"majority", b"after"]
        assert len(owners) == 1 and owners != {"b"}


def test_a_cut_off_nodes_consumers_and_producers_leave_the_other_nodes_topics(cluster):
    """docs/cluster.md, "When a member is lost": B is cut off from A and C (its clients still
    reach it). Once A declares B lost, A's topic drops what B's connections had on it, as a lane's
    EOF would have: the failover standby on C is promoted and gets the messages, an exclusive
    newcomer on C gets in, an exclusive producer on C too, and A's stats list none of B's. (They
    stayed on A for good: a cut ends no lane, and B's ConnectionActors, which end them on their
    side with `closed` `node_lost`, cannot tell A.)"""
    topic = cluster.topic_on("a", "reliable")
    with cluster.client("a") as on_a, cluster.client("b") as on_b, cluster.client("c") as on_c:
        held = on_b.subscribe(topic, "fo", "failover", "fo-b", dispatch="reliable")
        standby = on_c.subscribe(topic, "fo", "failover", "fo-c", dispatch="reliable")
        holder = on_b.subscribe(topic, "ex", "exclusive", "ex-b", dispatch="reliable")
        produce(on_b, topic, [b"before"], dispatch="reliable").close()
        exclusive = on_b.producer(topic, dispatch="reliable", access="exclusive")
        assert receive_all(held, 1) == [b"before"] and receive_all(holder, 1) == [b"before"]
        wait_for(lambda: held.active is True and standby.active is False, 10, "fo-b active, fo-c standby")
        cut = time.monotonic()
        cut_off(cluster, "b")
        try:
            lost_within(cluster, ["a"], "b", cut, "cut off")
            wait_for(lambda: held.closed_reason == "node_lost" and holder.closed_reason == "node_lost"
                     and exclusive.closed_reason == "node_lost", 10, "B's clients told node_lost")
            wait_for(lambda: standby.active is True, 10, "the standby on C promoted")

            def newcomer():
                try:
                    return on_c.subscribe(topic, "ex", "exclusive", "ex-c", dispatch="reliable")
                except ConsumerBusy:   # while A holds B's consumer
                    return None
            taker = wait_for(newcomer, 10, "an exclusive newcomer on C gets in")

            def producer():
                try:
                    return on_c.producer(topic, dispatch="reliable", access="exclusive")
                except ProducerBusy:   # while A holds B's producer
                    return None
            wait_for(producer, 10, "an exclusive producer on C gets in").send_sync(b"during")
            assert receive_all(standby, 1) == [b"during"]
            assert receive_all(taker, 1) == [b"during"]
            stats = on_a.stats(topic)
            assert stats["producers"] == 1
            assert {s["name"]: [c["name"] for c in s["consumers"]] for s in stats["subscriptions"]} == \
                {"fo": ["fo-c"], "ex": ["ex-c"]}
        finally:
            mend_all(cluster, "b")
    for node in ("a", "b", "c"):
        cluster.wait_live(node, ["a", "b", "c"])


def test_sends_pipelined_through_a_kill_of_the_topics_node_get_topic_unavailable_only(cluster):
    """docs/protocol.md, Cluster: a non_reliable producer whose topic's node dies is moved under
    the same id; the client sees a gap and TOPIC_UNAVAILABLE for sends meanwhile. The sends in
    flight as the lane ended got INTERNAL, and the next ones UNKNOWN_PRODUCER, before the move
    began (cluster probe: 5 of 5, raw sends every 5 ms)."""
    from tests.wire import RawConnection
    topic = cluster.topic_on("b")
    conn = RawConnection(*cluster.nodes["a"].address)
    conn.hello()
    producer_id = conn.request({"op": "producer", "topic": topic})["producer"]
    rids = iter(range(10_000, 20_000))
    sent, answers, done = [], {}, threading.Event()

    def sender():
        while not done.is_set():
            rid = next(rids)
            sent.append(rid)
            conn.send_frame({"op": "send", "rid": rid, "producer": producer_id, "msgs": [{"payload": b"x"}]})
            time.sleep(0.005)
    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        cluster.kill("b")
        time.sleep(1.5)
    finally:
        done.set()
        thread.join(5)
    deadline = time.monotonic() + 20
    while len(answers) < len(sent) and time.monotonic() < deadline:
        frame = conn.recv_frame(timeout=5)
        assert frame is not None, "connection closed"
        if frame["op"] == "ping":
            conn.send_frame({"op": "pong", "rid": frame["rid"]})
        elif frame.get("rid") in sent:
            assert frame["rid"] not in answers, f"answered twice: {frame}"
            answers[frame["rid"]] = frame.get("code", frame["op"])
        else:
            assert frame["op"] != "closed", frame
    assert len(answers) == len(sent), f"{len(sent) - len(answers)} sends unanswered"
    assert set(answers.values()) <= {"receipt", "TOPIC_UNAVAILABLE"}, sorted(
        (rid, code) for rid, code in answers.items() if code not in ("receipt", "TOPIC_UNAVAILABLE"))
    assert "TOPIC_UNAVAILABLE" in answers.values()
    conn.close()


def test_sends_in_flight_to_a_cut_off_node_are_answered_when_it_is_lost(cluster):
    """docs/cluster.md: a request forwarded to the topic's node just before that node was lost is
    answered TOPIC_UNAVAILABLE when the loss is declared. So are the sends a producer on A made to
    B's topic after B was cut off (a cut ends no lane: no receipt, no EOF): none is left without
    an answer (they were, for good, and the producer's flush never ended); the producer, re-
    attached to the topic's new node, sends again."""
    topic = cluster.topic_on("b")
    with cluster.client("a") as on_a:
        producer = on_a.producer(topic)
        producer.send_sync(b"before")
        cut = time.monotonic()
        cut_off(cluster, "b")
        try:
            in_flight = [producer.send(b"in flight %d" % i) for i in range(20) if not time.sleep(0.01)]
            lost_within(cluster, ["a"], "b", cut, "cut off")
            producer.flush(timeout=20)   # (a bound on a failure: they were never answered)
            for sent in in_flight:
                assert isinstance(sent.exception(0), (TopicUnavailable, type(None))), sent.exception(0)
            assert any(isinstance(sent.exception(0), TopicUnavailable) for sent in in_flight)
            rehomed(cluster, topic, "b")

            def again():
                try:
                    return producer.send_sync(b"again") is not None
                except TopicUnavailable:   # still being re-attached
                    return False
            wait_for(again, 10, "the producer re-attached")
            assert producer.closed_reason is None
        finally:
            mend_all(cluster, "b")
    for node in ("a", "b", "c"):
        cluster.wait_live(node, ["a", "b", "c"])


def test_leader_killed(cluster):
    """docs/cluster.md: the leader is needed to join, not to serve. Killed, it is declared lost;
    topics on the other nodes keep working; when it returns, the members join it again."""
    on_c_topic = cluster.topic_on("c")
    with cluster.client("b") as on_b, cluster.client("c") as on_c:
        consumer = on_c.subscribe(on_c_topic, "s", "exclusive", "c1")
        killed = time.monotonic()
        cluster.kill("a")
        lost_within(cluster, ["b", "c"], "a", killed, "leader killed")
        produce(on_b, on_c_topic, [b"m%d" % i for i in range(10)])
        assert receive_all(consumer, 10) == [b"m%d" % i for i in range(10)]
        fresh = f"/cl/new-{uuid.uuid4().hex[:8]}"   # a new topic is placed on a survivor
        assert on_b.lookup(fresh)["node"] in ("b", "c")
        fresh_consumer = on_c.subscribe(fresh, "s", "exclusive", "c1")
        produce(on_b, fresh, [b"new"])
        assert receive_all(fresh_consumer, 1) == [b"new"]
    cluster.start("a")
    cluster.wait_live("a", ["a", "b", "c"])
    cluster.wait_live("b", ["a", "b", "c"])
    cluster.wait_live("c", ["a", "b", "c"])


# --- reliable topics in a shared folder (--shared-data) ----------------------------------------------

def test_shared_data_a_survivor_takes_a_reliable_topic_over(shared_cluster):
    """B, holding a reliable topic's log in the shared folder, is killed: the topic's next use
    opens it on a survivor, from the log, with every receipted message; when B returns it does
    not open it again: one owner."""
    cluster = shared_cluster
    durable = cluster.topic_on("b", "reliable")
    sent = [b"r%d" % i for i in range(100)]
    with cluster.client("a") as on_a, cluster.client("c") as on_c:
        on_c.subscribe(durable, "d", "exclusive", "c1", dispatch="reliable", start="earliest").close()
        produce(on_a, durable, sent, dispatch="reliable")   # all receipted
        killed = time.monotonic()
        cluster.kill("b")
        lost_within(cluster, ["a", "c"], "b", killed, "kill -9")
        consumer = on_c.subscribe(durable, "d", "exclusive", "c1", dispatch="reliable")
        assert receive_all(consumer, 100) == sent
        owner = on_a.lookup(durable)["node"]
        assert owner in ("a", "c") and on_c.lookup(durable)["node"] == owner
        after = [b"after-%d" % i for i in range(20)]
        produce(on_a, durable, after, dispatch="reliable")
        assert receive_all(consumer, 20) == after
    cluster.start("b")
    for node in ("a", "b", "c"):
        cluster.wait_live(node, ["a", "b", "c"])
    with cluster.client("b") as on_b:
        assert on_b.lookup(durable)["node"] == owner
        assert [t["node"] for t in on_b.topics() if t["name"] == durable] == [owner]
        produce(on_b, durable, [b"from-b"], dispatch="reliable")
    with cluster.client("c") as on_c:
        consumer = on_c.subscribe(durable, "d", "exclusive", "c1", dispatch="reliable")
        assert receive_all(consumer, 1) == [b"from-b"]


def test_a_stopped_nodes_clients_keep_their_consumers_of_other_nodes_topics(cluster):
    """B is stopped long enough for A and C to declare it lost: they drop what B's connections had
    on their topics (a stopped node's lanes stay open: no EOF tells them). When B runs again and
    learns it was declared lost, its own ConnectionActors must learn it too: its client's
    consumer of A's topic is attached again (it stayed registered on B alone, and got nothing
    more), its consumer of C's reliable topic is closed with `node_lost` (its unacked messages went
    to others)."""
    on_a_topic = cluster.topic_on("a")
    reliable = cluster.topic_on("c", "reliable")
    with cluster.client("a") as on_a, cluster.client("b") as on_b:
        consumer = on_b.subscribe(on_a_topic, "s", "shared", "b1")
        held = on_b.subscribe(reliable, "r", "exclusive", "b2", dispatch="reliable")
        producer = produce(on_a, on_a_topic, [b"before"])
        assert receive_all(consumer, 1) == [b"before"]
        with stopped_until_lost(cluster, "b"):
            pass
        for node in ("a", "b", "c"):
            cluster.wait_live(node, ["a", "b", "c"])
        wait_for(lambda: held.closed_reason == "node_lost", 10, "the reliable consumer closed")
        with cluster.client("c") as on_c:   # and its exclusive place is free
            on_c.subscribe(reliable, "r", "exclusive", "c2", dispatch="reliable").close()
        wait_for(lambda: attached(on_a, on_a_topic)[1] == ["s"], 10, "B's consumer attached again")
        producer.send_sync(b"after")
        assert receive_all(consumer, 1) == [b"after"]


def test_shared_data_a_stopped_owner_is_fenced(shared_cluster):
    """B holds a reliable topic and is stopped (its sockets stay open): a survivor takes the topic
    over. When B runs again, a send that B's own producer makes is refused, never receipted, and
    nothing B writes reaches the log: the log has one writer."""
    cluster = shared_cluster
    durable = cluster.topic_on("b", "reliable")
    with cluster.client("b") as on_b, cluster.client("a") as on_a, cluster.client("c") as on_c:
        stale = on_b.producer(durable, dispatch="reliable")
        for i in range(10):
            stale.send_sync(b"b%d" % i)
        b_pids = cluster.nodes["b"].processes()
        stopped = time.monotonic()
        for pid in b_pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            lost_within(cluster, ["a", "c"], "b", stopped, "SIGSTOP")
            consumer = on_c.subscribe(durable, "d", "exclusive", "c1", dispatch="reliable", start="earliest")
            produce(on_a, durable, [b"a%d" % i for i in range(10)], dispatch="reliable")
            expected = [b"b%d" % i for i in range(10)] + [b"a%d" % i for i in range(10)]
            assert receive_all(consumer, 20) == expected
            owner = on_a.lookup(durable)["node"]
            assert owner in ("a", "c")
        finally:
            for pid in b_pids:
                os.kill(pid, signal.SIGCONT)
        with pytest.raises((TopicUnavailable, ProducerClosed)):   # not INTERNAL: no bug, the topic moved
            stale.send_sync(b"stale", timeout=10)
        cluster.wait_live("a", ["a", "b", "c"])
        cluster.wait_live("b", ["a", "b", "c"])
        produce(on_a, durable, [b"marker"], dispatch="reliable")
        assert receive_all(consumer, 1) == [b"marker"]   # "stale" never reached the log
        for node in ("a", "b", "c"):
            with cluster.client(node) as c:
                assert [t["node"] for t in c.topics() if t["name"] == durable] == [owner]


def producer_on(client, topic, timeout=10):
    """A reliable producer, asked again while the answer is TOPIC_UNAVAILABLE (a view a heartbeat
    old); the deadline only bounds a failure."""
    def attempt():
        try:
            return client.producer(topic, dispatch="reliable")
        except TopicUnavailable:
            return None
    return wait_for(attempt, timeout, f"a producer of {topic}", every=0.2)


def test_shared_data_a_node_cut_off_and_healed_leaves_the_taken_over_topic_served(shared_cluster):
    """B holds a reliable topic and is cut off from A and C; a client of C takes the topic over
    (its next use, docs/cluster.md) and is receipted. When the links are back, B fences itself,
    the survivor that took the topic over keeps it (B declared it lost, but B saw no majority),
    and every node serves it: every receipted message is there. (Once, A and C fenced too, and
    the topic answered TOPIC_UNAVAILABLE on every node for minutes.)"""
    cluster = shared_cluster
    durable = cluster.topic_on("b", "reliable")
    sent = [b"r%d" % i for i in range(100)]
    with cluster.client("a") as on_a:
        produce(on_a, durable, sent, dispatch="reliable")   # all receipted
    cut = time.monotonic()
    cut_off(cluster, "b")
    try:
        lost_both_ways(cluster, "b", cut)
        with cluster.client("c") as on_c:
            on_c.producer(durable, dispatch="reliable").send_sync(b"during")   # taken over
            owner = on_c.lookup(durable)["node"]
            assert owner in ("a", "c")
    finally:
        mend_all(cluster, "b")
    for node in ("a", "b", "c"):
        cluster.wait_live(node, ["a", "b", "c"])
    after = []
    for node in ("a", "b", "c"):
        with cluster.client(node) as c:
            assert c.lookup(durable)["node"] == owner
            producer_on(c, durable).send_sync(b"after-" + node.encode())
            after.append(b"after-" + node.encode())
    with cluster.client("b") as on_b:
        consumer = on_b.subscribe(durable, "all", "exclusive", "b1", dispatch="reliable", start="earliest")
        assert receive_all(consumer, 104) == sent + [b"during"] + after


def test_shared_data_the_log_holder_is_asked_again_after_it_fenced_itself(shared_cluster):
    """The node holding a reliable topic's latest epoch is not the one placement picks (it took
    the topic over from B, which returned), and it fences itself (its link to B was cut: each
    declared the other lost, each with a majority in view): its topic ends, its log stays. Every
    node then sends the topic to the holder, which reopens it: the folder says who holds the
    log. (Once, B was picked by placement and refused the log, and the holder was never asked:
    TOPIC_UNAVAILABLE on every node, for good.)"""
    cluster = shared_cluster
    durable = cluster.topic_on("b", "reliable")
    sent = [b"r%d" % i for i in range(50)]
    with cluster.client("a") as on_a:
        produce(on_a, durable, sent, dispatch="reliable")
        killed = time.monotonic()
        cluster.kill("b")
        lost_within(cluster, ["a", "c"], "b", killed, "kill -9")
        on_a.producer(durable, dispatch="reliable").send_sync(b"taken")   # taken over
        holder = on_a.lookup(durable)["node"]
        assert holder in ("a", "c")
    cluster.start("b")
    for node in ("a", "b", "c"):
        cluster.wait_live(node, ["a", "b", "c"])
    with cluster.client("c") as on_c:
        assert on_c.lookup(durable)["node"] == holder   # B did not reopen it
    cut = time.monotonic()
    cluster.hosts.cut(holder, "b")
    try:
        lost_within(cluster, [holder], "b", cut, "link cut")
        lost_within(cluster, ["b"], holder, cut, "link cut")
    finally:
        cluster.hosts.mend(holder, "b")
    for node in ("a", "b", "c"):   # both came back as new incarnations: both fenced
        cluster.wait_live(node, ["a", "b", "c"])
    after = []
    # the holder's own client first: placement sends it to B, which is refused the log
    for node in [holder] + [n for n in ("a", "c", "b") if n != holder]:
        with cluster.client(node) as c:
            producer_on(c, durable).send_sync(b"after-" + node.encode())
            after.append(b"after-" + node.encode())
            assert c.lookup(durable)["node"] == holder
    with cluster.client("c") as on_c:
        consumer = on_c.subscribe(durable, "all", "exclusive", "c1", dispatch="reliable", start="earliest")
        assert receive_all(consumer, 54) == sent + [b"taken"] + after


def test_a_request_to_a_node_that_stops_is_answered_when_it_is_lost(cluster):
    """A request A forwards to B just as B stops is not left without an answer: when A declares
    B lost, the client gets TOPIC_UNAVAILABLE, and may send it again."""
    topic = cluster.topic_on("b")
    with cluster.client("a") as on_a:
        on_a.producer(topic).close()   # the topic lives on B
        b_pids = cluster.nodes["b"].processes()
        stopped = time.monotonic()
        for pid in b_pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(TopicUnavailable) as refused:
                on_a.producer(topic)   # forwarded to B, which cannot answer
            assert "was lost before it answered" in str(refused.value)
            assert time.monotonic() - stopped < TIMEOUT_MS / 1000 + 5
            lost_within(cluster, ["a", "c"], "b", stopped, "SIGSTOP")   # (until C sees it too: unavailable)
            on_a.producer(topic).send_sync(b"again")   # re-homed on a survivor
        finally:
            for pid in b_pids:
                os.kill(pid, signal.SIGCONT)
