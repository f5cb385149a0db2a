"""Supervision: kill -9 of one broker process of each kind while a producer produces and consumers
consume, and what the broker promises afterwards, seen only as a client sees it (frames, the
Python client's state, `stats`, `topics`).

For every kind: once the broker has recovered (defined per test), a fresh connection's hello and
a ping are answered within 1 s, and every message of a reliable topic that got a receipt is
delivered to some consumer of the subscription (possibly again, possibly to a consumer that
subscribed again).

Processes are found by the name each one gives itself (/proc/PID/comm: ab-shard, ab-conn,
ab-listener, ab-topic, ab-sub, ab-disp, ab-log) among the broker's own process tree; a test that
kills a topic's or a subscription's process has one topic (or tells its subscriptions' processes
apart by when they appeared).
"""
import os
import signal
import threading
import time

import pytest

from actorbroker.scripts import proctree
from actorbroker.transport.client import Client
from actorbroker.transport.errors import (
    BrokerError, ConnectionLost, ConsumerBusy, ConsumerClosed, Internal, ProducerClosed, TopicNotFound)
from tests.util import (
    consumers_of, own_ports_to, parent_of, peer_ports_held_by, process_kind, processes_of_kind, wait_for)

HELLO_LIMIT_S = 1.0      # a fresh connection's hello + ping, once the broker has recovered
CLEANUP_LIMIT_S = 3.0    # connection shard lost: EOF is seen at once, no heartbeat timer involved
FEW_S = 5.0              # "within a few seconds"
EVENTUALLY_S = 15.0      # every receipted reliable message delivered
SLOW_HEARTBEAT = 60000   # broker and clients: nothing here may wait for a heartbeat timer


# --- helpers ------------------------------------------------------------------------------------

@pytest.fixture
def closing(start_broker):
    """Register what the test opens (clients, traffic, collectors); closed in reverse order at
    the end, before the test's brokers are stopped (this fixture depends on start_broker)."""
    things = []

    def add(thing):
        things.append(thing)
        return thing

    yield add
    for thing in reversed(things):
        try:
            thing.close()
        except Exception:
            pass


def kill(pid):
    """kill -9 of one broker process; returns the monotonic time of the kill once it is dead."""
    at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: proctree.alive(pid), lambda alive: not alive, timeout=5)
    return at


def only_process(broker, kind):
    """The broker's single process of this kind (the test is built to have exactly one)."""
    return wait_for(lambda: processes_of_kind(broker, kind), lambda pids: len(pids) == 1)[0]


def ancestor_of_kind(pid, kind):
    while pid and pid > 1:
        pid = parent_of(pid)
        if pid and process_kind(pid) == kind:
            return pid
    return None


def names(stats, subscription):
    """Names of the consumers `stats` lists on `subscription` ([] if it has no such subscription)."""
    return sorted(c["name"] for c in consumers_of(stats, subscription))


def subscription_names(stats):
    return {s["name"] for s in stats["subscriptions"]}


def assert_hello_answered_fast(broker, connections=1):
    """A fresh connection's hello (Client construction) and a ping take less than HELLO_LIMIT_S."""
    for _ in range(connections):
        start = time.monotonic()
        client = Client(*broker.address, connect_timeout=5, name="hello-check")
        try:
            client.ping(timeout=5)
            took = time.monotonic() - start
        finally:
            client.close()
        assert took < HELLO_LIMIT_S, f"hello + ping took {took:.2f}s after recovery"


def subscribe_again(client, *args, timeout=FEW_S, **options):
    """Subscribe; an error answer (the broker may still be restoring the subscription) is retried
    until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.subscribe(*args, timeout=timeout, **options)
        except BrokerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Admin:
    """stats and topics over a connection of its own, reopened when it was closed; a probe
    answers None while the broker cannot answer it, so that wait_for keeps polling."""

    def __init__(self, broker):
        self.broker = broker
        self.client = None

    def _call(self, fn):
        try:
            if self.client is None or not self.client.connected:
                self.close()
                self.client = Client(*self.broker.address, connect_timeout=2, name="admin",
                                     heartbeat_ms=SLOW_HEARTBEAT)
            return fn(self.client)
        except (ConnectionLost, OSError):   # OSError includes TimeoutError and refused connects
            self.close()
            return None

    def stats(self, topic):
        try:
            return self._call(lambda c: c.stats(topic, timeout=3))
        except TopicNotFound:
            return None

    def topics(self):
        """{name: entry} of `topics`, or None."""
        found = self._call(lambda c: c.topics(timeout=3))
        return None if found is None else {t["name"]: t for t in found}

    def close(self):
        if self.client is not None:
            client, self.client = self.client, None
            try:
                client.close(timeout=1)
            except Exception:
                pass


class Traffic:
    """A producer that keeps producing from a thread, one message at a time: reconnects when its
    connection is lost, opens a new producer when the broker closed its producer (unless
    reopen=False: then it stops there), and records every offset that got a receipt."""

    def __init__(self, broker, topic, dispatch=None, reopen=True, interval=0.02):
        self.broker, self.topic, self.dispatch, self.reopen = broker, topic, dispatch, reopen
        self.interval = interval
        self.receipted = {}     # offset -> payload
        self.receipts = []      # (monotonic time the send started, offset)
        self.errors = []        # (monotonic time, exception): sends and opens that failed
        self.producers = []     # every producer opened; closed_reason tells how each ended
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._thread.start()

    def _run(self):
        client = producer = None
        seq = 0
        try:
            while not self._stop.is_set():
                try:
                    if client is None or not client.connected:
                        if client is not None:
                            client.close(timeout=1)
                        client = producer = None
                        client = Client(*self.broker.address, connect_timeout=2, name="traffic")
                    if producer is None:
                        producer = client.producer(self.topic, dispatch=self.dispatch, linger_ms=0,
                                                   timeout=5)
                        self.producers.append(producer)
                    payload = f"m{seq}".encode()
                    seq += 1
                    started = time.monotonic()
                    offset = producer.send_sync(payload, timeout=5)
                    self.receipted[offset] = payload
                    self.receipts.append((started, offset))
                except ProducerClosed:
                    if not self.reopen:
                        return
                    producer = None
                except (ConnectionLost, OSError, BrokerError) as exc:
                    self.errors.append((time.monotonic(), exc))
                self._stop.wait(self.interval)
        finally:
            if client is not None:
                client.close(timeout=1)

    def since(self, at):
        """Offsets receipted for sends started after `at`."""
        return [offset for started, offset in list(self.receipts) if started > at]

    def stop(self):
        self._stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive(), "the producing thread did not stop"

    close = stop


class Collector:
    """Takes a consumer's messages from a thread and records them (id -> payload).

    ack: None holds every message (never acknowledged), "all" acknowledges each (without waiting),
    "even" acknowledges even ids and waits for the broker's ok; those are recorded in `acked`
    (and so are those whose ok never came: an ack whose answer was lost may have taken effect).
    resubscribe: called to get a new consumer when the broker closed this one."""

    def __init__(self, consumer, ack=None, resubscribe=None):
        self.consumer = consumer
        self.ack, self.resubscribe = ack, resubscribe
        self.received = {}        # id -> payload
        self.conflicts = []       # (id, payload before, payload now): one offset, two payloads
        self.acked = set()
        self.ended = []           # closed reasons of the consumers it had
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"collect-{consumer.name}", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                msg = self.consumer.receive(timeout=0.1)
            except TimeoutError:
                continue
            except (ConsumerClosed, ConnectionLost):
                self.ended.append(self.consumer.closed_reason)
                if self.resubscribe is None:
                    return
                while not self._stop.is_set():
                    try:
                        self.consumer = self.resubscribe()
                        break
                    except (BrokerError, ConnectionLost, OSError):
                        self._stop.wait(0.1)
                continue
            before = self.received.setdefault(msg.id, msg.payload)
            if before != msg.payload:
                self.conflicts.append((msg.id, before, msg.payload))
            try:
                if self.ack == "all":
                    self.consumer.ack(msg)
                elif self.ack == "even" and msg.id % 2 == 0:
                    try:
                        self.consumer.ack(msg, sync=True, timeout=5)
                    except Exception:
                        # sent, but its `ok` never came (the process holding it died): it may or
                        # may not have been made durable first, so either outcome is right
                        self.acked.add(msg.id)
                        raise
                    self.acked.add(msg.id)
            except Exception:
                pass    # not acknowledged: the broker must deliver it again

    def close(self):
        self._stop.set()
        self._thread.join(10)


def undelivered(receipted, collectors, acked=()):
    """Receipted offsets that none of `collectors` received (and that are not in `acked`), and
    offsets received with another payload than the one that got the receipt."""
    got = {}
    for collector in collectors:
        got.update(collector.received)
    wrong = sorted(o for o, p in list(receipted.items()) if o in got and got[o] != p)
    lost = sorted(o for o in list(receipted) if o not in got and o not in acked)
    conflicts = [c for collector in collectors for c in collector.conflicts]
    return {"lost": lost, "wrong_payload": wrong, "conflicts": conflicts}


def all_delivered(report):
    return not (report["lost"] or report["wrong_payload"] or report["conflicts"])


# --- connection shard and its supervisor --------------------------------------------------------

@pytest.mark.parametrize("kind", ["ab-shard", "ab-conn"])
def test_kill_of_a_connection_shard_closes_its_connections_and_cleans_them_up_at_once(
        start_broker, closing, topic, kind):
    """kill -9 of a connection shard (or of the ab-conn that supervises it): the connections it
    owned are closed by the broker and their consumers removed at once (no heartbeat: 60 s);
    the other connections keep working; exclusive subscriptions are free again, failover
    standbys promoted, unacknowledged reliable messages redelivered to the survivors."""
    b = start_broker("--io-shards", "2", "--heartbeat-ms", str(SLOW_HEARTBEAT))
    admin = closing(Admin(b))
    shards = wait_for(lambda: processes_of_kind(b, "ab-shard"), lambda pids: len(pids) == 2)
    pairs_before = (len(processes_of_kind(b, "ab-conn")), len(shards))

    # Connections, each with the local port it got, so that the shard holding its socket can be
    # told; more are opened (up to 16) until both shards hold some.
    clients, ports = [], []

    def owners():
        held = {pid: peer_ports_held_by(pid, b.port) for pid in shards}
        return [[pid for pid in shards if port in held[pid]] for port in ports]

    while True:
        before = own_ports_to(b.port)
        clients.append(closing(Client(*b.address, heartbeat_ms=SLOW_HEARTBEAT, name=f"c{len(clients)}")))
        new = own_ports_to(b.port) - before
        ports.append(new.pop() if len(new) == 1 else None)
        if len(clients) >= 6:
            used = {o[0] for o in owners() if len(o) == 1}
            if len(used) == 2 or not used or len(clients) >= 16:
                break
    n = len(clients)
    owned = owners()
    counts = {pid: sum(1 for o in owned if o == [pid]) for pid in shards}
    shard = max(shards, key=lambda pid: counts[pid])
    known = all(len(o) == 1 for o in owned)
    expected_closed = {i for i in range(n) if owned[i] == [shard]} if known else None
    if kind == "ab-shard":
        victim = shard
    else:
        victim = ancestor_of_kind(shard, "ab-conn")
        assert victim is not None, "the ab-conn supervising the shard is not an ancestor of it"

    # On a reliable topic: one shared subscription, a consumer on every connection, holding what
    # it gets. On another topic: per connection i, an exclusive subscription held by it, and a
    # failover subscription where it is the active consumer and connection i+1 the standby.
    topic2 = topic + "-x"
    held = [closing(Collector(clients[i].subscribe(
        topic, "rs", "shared", f"r{i}", dispatch="reliable", receiver_queue=5000, max_unacked=5000)))
        for i in range(n)]
    for i in range(n):
        clients[i].subscribe(topic2, f"ex-{i}", "exclusive", f"holder-{i}", dispatch="non_reliable")
    primary = [clients[i].subscribe(topic2, f"fo-{i}", "failover", f"a-{i}") for i in range(n)]
    standby = [clients[(i + 1) % n].subscribe(topic2, f"fo-{i}", "failover", f"b-{i}") for i in range(n)]
    wait_for(lambda: [(p.active, s.active) for p, s in zip(primary, standby)],
             lambda states: all(state == (True, False) for state in states))

    traffic = closing(Traffic(b, topic, "reliable"))
    wait_for(lambda: (len(traffic.receipted), [len(h.received) for h in held]),
             lambda s: s[0] >= 4 * n and all(s[1]))       # every consumer holds unacked messages

    at = kill(victim)

    def observe():
        """(closed connections, consumers listed per subscription, failover states), or None."""
        closed = {i for i, c in enumerate(clients) if not c.connected}
        s1, s2 = admin.stats(topic), admin.stats(topic2)
        if s1 is None or s2 is None:
            return None
        listed = {"rs": names(s1, "rs")}
        for i in range(n):
            listed[f"ex-{i}"] = names(s2, f"ex-{i}")
            listed[f"fo-{i}"] = names(s2, f"fo-{i}")
        return closed, listed, [(p.active, s.active) for p, s in zip(primary, standby)]

    def cleaned_up(seen):
        if seen is None:
            return False
        closed, listed, states = seen
        alive = set(range(n)) - closed
        if not closed or (expected_closed is not None and closed != expected_closed):
            return False
        want = {"rs": sorted(f"r{i}" for i in alive)}
        for i in range(n):
            a, s = i in alive, (i + 1) % n in alive
            want[f"ex-{i}"] = [f"holder-{i}"] if i in alive else []
            want[f"fo-{i}"] = sorted(([f"a-{i}"] if a else []) + ([f"b-{i}"] if s else []))
            if (a and states[i][0] is not True) or (not a and s and states[i][1] is not True):
                return False    # the primary stays active, or the standby was promoted
        return listed == want

    try:
        closed, _, _ = wait_for(observe, cleaned_up, interval=0.05,
                                timeout=max(0.1, at + CLEANUP_LIMIT_S - time.monotonic()))
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{n} connections; the killed shard held "
                             f"{sorted(expected_closed) if expected_closed is not None else 'unknown'}") from None
    survivors = sorted(set(range(n)) - closed)
    assert closed and survivors, f"closed {sorted(closed)} of {n}: want some closed, some not"
    for i in closed:
        assert held[i].consumer.closed_reason == "connection_lost"
    for i in survivors:
        clients[i].ping(timeout=5)
        assert clients[i].connected and held[i].consumer.closed_reason is None

    if kind == "ab-conn":   # a restarted pair takes new connections
        wait_for(lambda: (len(processes_of_kind(b, "ab-conn")), len(processes_of_kind(b, "ab-shard"))),
                 lambda pairs: pairs == pairs_before)
    assert_hello_answered_fast(b, connections=4)

    # New connections: an exclusive subscription whose holder died takes another name; one whose
    # holder lives is still busy. Promoted standbys and the newcomers receive what comes next.
    newcomers = []
    for i in range(n):
        fresh = closing(Client(*b.address, heartbeat_ms=SLOW_HEARTBEAT, name=f"new{i}"))
        if i in closed:
            newcomers.append(fresh.subscribe(topic2, f"ex-{i}", "exclusive", f"newcomer-{i}"))
        else:
            with pytest.raises(ConsumerBusy):
                fresh.subscribe(topic2, f"ex-{i}", "exclusive", f"newcomer-{i}")
    promoted = [standby[i] for i in closed if (i + 1) % n not in closed]
    sender = closing(Client(*b.address, heartbeat_ms=SLOW_HEARTBEAT, name="sender"))
    offset = sender.producer(topic2).send_sync(b"after the kill")
    for consumer in newcomers + promoted:
        msg = consumer.receive(timeout=FEW_S)
        assert (msg.id, msg.payload) == (offset, b"after the kill"), consumer.name

    # Every receipted message reached a surviving consumer of "rs": what the dead ones held was
    # redelivered.
    wait_for(lambda: len(traffic.since(at)), lambda count: count >= 10, timeout=FEW_S)
    traffic.stop()
    wait_for(lambda: undelivered(traffic.receipted, [held[i] for i in survivors]), all_delivered,
             timeout=EVENTUALLY_S)


# --- listener -----------------------------------------------------------------------------------

def _hello_works(broker):
    try:
        client = Client(*broker.address, connect_timeout=1, name="probe")
    except (OSError, ConnectionLost, BrokerError):
        return False
    try:
        client.ping(timeout=1)
        return True
    except (OSError, ConnectionLost, BrokerError):
        return False
    finally:
        client.close(timeout=1)


def test_a_shard_killed_again_as_it_starts_is_replaced(start_broker):
    """kill -9 of a shard, then of its replacement as soon as its process appears: Thespian does
    not report a child killed within milliseconds of its start, and that shard slot served nobody
    for good (with one shard: no hello answered, minutes later). Its supervisor now replaces a
    shard that has not said it runs within SHARD_START_DEADLINE."""
    from actorbroker.actors.connection import SHARD_START_DEADLINE
    b = start_broker("--io-shards", "1")
    (first,) = wait_for(lambda: processes_of_kind(b, "ab-shard"), lambda pids: len(pids) == 1)
    assert_hello_answered_fast(b)   # it runs
    kill(first)
    (second,) = wait_for(lambda: set(processes_of_kind(b, "ab-shard")) - {first}, lambda new: len(new) == 1,
                         interval=0.002)
    os.kill(second, signal.SIGKILL)
    limit = SHARD_START_DEADLINE.total_seconds() + EVENTUALLY_S
    wait_for(lambda: set(processes_of_kind(b, "ab-shard")) - {first, second}, lambda new: len(new) == 1,
             timeout=limit)
    wait_for(lambda: _hello_works(b), bool, timeout=limit)
    assert_hello_answered_fast(b)


def test_kill_of_the_listener_keeps_accepting_on_the_same_port(start_broker, closing, topic):
    b = start_broker()
    admin = closing(Admin(b))
    existing = closing(Client(*b.address, name="existing"))
    old = closing(Collector(existing.subscribe(topic, "s", "shared", "e1", dispatch="reliable"), ack="all"))
    traffic = closing(Traffic(b, topic, "reliable"))
    wait_for(lambda: (len(traffic.receipted), len(old.received)), lambda s: s[0] >= 20 and s[1] >= 1)

    at = kill(only_process(b, "ab-listener"))
    wait_for(lambda: _hello_works(b), bool, timeout=FEW_S, interval=0.05)   # same address
    assert_hello_answered_fast(b)

    fresh = closing(Client(*b.address, name="fresh"))
    new = closing(Collector(fresh.subscribe(topic, "s", "shared", "n1", dispatch="reliable"), ack="all"))

    def settled():
        """(existing connection still open, consumers listed), or None while not known."""
        stats = admin.stats(topic)
        if stats is None:
            return None
        if existing.connected:
            try:
                existing.ping(timeout=2)
            except (ConnectionLost, TimeoutError):
                return None
        return existing.connected, names(stats, "s")

    # kept: it still works; closed by the restart: its consumer is removed
    kept, _ = wait_for(settled, lambda s: s is not None and s[1] == (["e1", "n1"] if s[0] else ["n1"]),
                       timeout=FEW_S, interval=0.05)
    assert old.consumer.closed_reason == (None if kept else "connection_lost")
    wait_for(lambda: (len(traffic.since(at)), len(new.received)), lambda s: s[0] >= 10 and s[1] >= 1,
             timeout=FEW_S)
    traffic.stop()
    wait_for(lambda: undelivered(traffic.receipted, [old, new]), all_delivered, timeout=EVENTUALLY_S)


@pytest.mark.parametrize("kind", ["ab-conn", "ab-listener"])
def test_an_exclusive_subscribe_and_producer_in_flight_when_their_connection_actor_dies_hold_nothing(
        start_broker, closing, topic, kind):
    """kill -9 of the client's ConnectionActor (or of the listener, which takes every one along)
    a few milliseconds after its exclusive subscribe and exclusive producer went out. Once the
    answer had reached the ConnectionActor just before its death, the consumer and the producer
    stayed registered for good (a chaos probe: CONSUMER_BUSY and PRODUCER_BUSY to everyone else
    minutes later; nothing routed them, so no connection close or lane EOF removed them). The
    subscription and the topic must be free again within a few seconds, whatever the moment."""
    from tests.wire import RawConnection
    b = start_broker()
    for i, delay in enumerate((0.002, 0.008, 0.015)):
        name = f"{topic}-{i}"
        admin = Client(*b.address, name="admin")   # (a listener's death ends its connection too)
        admin.producer(name, dispatch="reliable").close()   # the topic exists, with its log
        admin.close()
        conn = RawConnection(*b.address)
        conn.hello()
        if kind == "ab-conn":   # the ConnectionActor of the shard that holds this connection
            ports = own_ports_to(b.address[1])
            shard = next(p for p in processes_of_kind(b, "ab-shard") if peer_ports_held_by(p, b.address[1]) & ports)
            victim = parent_of(shard)
        else:
            victim = only_process(b, "ab-listener")
        conn.send_frame({"op": "subscribe", "rid": 2, "topic": name, "subscription": "s", "type": "exclusive",
                         "consumer": "gone"})
        conn.send_frame({"op": "producer", "rid": 3, "topic": name, "access": "exclusive"})
        time.sleep(delay)   # the moment of the kill is what varies (not a wait for anything)
        kill(victim)
        conn.close()
        wait_for(lambda: _hello_works(b), bool, timeout=FEW_S, interval=0.05)
        other = closing(Client(*b.address, name=f"other-{i}"))

        def free():
            opened = []
            try:
                opened.append(other.subscribe(name, "s", "exclusive", "other", timeout=5))
                opened.append(other.producer(name, access="exclusive", timeout=5))
                return True
            except (ConsumerBusy, BrokerError):
                return False
            finally:
                for thing in opened:
                    thing.close()
        wait_for(free, bool, timeout=3 * FEW_S, interval=0.2)


# --- topic --------------------------------------------------------------------------------------

def test_kill_of_a_reliable_topic_reopens_it_from_its_log(start_broker, closing, topic):
    b = start_broker()
    admin = closing(Admin(b))
    client = closing(Client(*b.address))
    first = [closing(Collector(client.subscribe(topic, "durable", "shared", name, dispatch="reliable"),
                               ack="even")) for name in ("d1", "d2")]
    traffic = closing(Traffic(b, topic, "reliable"))
    wait_for(lambda: (len(traffic.receipted), [len(c.received) for c in first]),
             lambda s: s[0] >= 20 and all(s[1]))

    at = kill(only_process(b, "ab-topic"))
    wait_for(lambda: [c.consumer.closed_reason for c in first], lambda r: r == ["topic_lost"] * 2,
             timeout=FEW_S)
    wait_for(lambda: traffic.producers[0].closed_reason, lambda r: r == "topic_lost", timeout=FEW_S)
    # reopened at once, from its log, with its durable subscription
    stats = wait_for(lambda: admin.stats(topic), lambda s: s is not None and "durable" in subscription_names(s),
                     timeout=FEW_S)
    assert stats["dispatch"] == "reliable"
    assert_hello_answered_fast(b)

    again = closing(Collector(subscribe_again(client, topic, "durable", "shared", "d1", dispatch="reliable"),
                              ack="all"))
    wait_for(lambda: len(traffic.since(at)), lambda count: count >= 10, timeout=FEW_S)   # producing again
    traffic.stop()
    acked = first[0].acked | first[1].acked
    # every receipted message not acknowledged before the kill comes to the new consumer
    wait_for(lambda: undelivered(traffic.receipted, [again], acked), all_delivered, timeout=EVENTUALLY_S)


@pytest.mark.parametrize("dispatch", ["reliable", "non_reliable"])
def test_subscribes_sent_at_once_after_the_topic_is_killed_are_answered(start_broker, closing, topic, dispatch):
    """Subscribes from several connections right after kill -9 of their topic's process: the
    root passed some on to the dead topic's address (before, or as, it heard of the death);
    they came back undeliverable and were dropped, and waited for the request deadline (30 s,
    INTERNAL). Each goes to the reopened topic (a non_reliable one: created again) instead."""
    b = start_broker()
    clients = [closing(Client(*b.address, name=f"c{i}", heartbeat_ms=SLOW_HEARTBEAT)) for i in range(3)]
    for rep in range(4):
        name = f"{topic}-{rep}"
        before = set(processes_of_kind(b, "ab-topic"))
        clients[0].subscribe(name, "holder", "exclusive", "h", dispatch=dispatch)
        clients[1].producer(name, dispatch=dispatch).send_sync(b"x")
        (victim,) = wait_for(lambda: set(processes_of_kind(b, "ab-topic")) - before, lambda new: len(new) == 1)
        results = {}

        def subscribe(i):
            try:   # well below the request deadline: an answer, not the broker's give-up
                clients[i].subscribe(name, f"s{i}", "exclusive", f"n{i}", dispatch=dispatch,
                                     timeout=EVENTUALLY_S)
                results[i] = "ok"
            except Exception as exc:   # noqa: BLE001
                results[i] = repr(exc)

        os.kill(victim, signal.SIGKILL)
        threads = [threading.Thread(target=subscribe, args=(i,), daemon=True) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(EVENTUALLY_S + 5)
        assert results == {0: "ok", 1: "ok", 2: "ok"}, f"rep {rep}: {results}"
        assert {"s0", "s1", "s2"} <= subscription_names(clients[2].stats(name))   # on the live topic


@pytest.mark.parametrize("fsync", ["always", "group"])
def test_every_send_in_flight_when_the_topic_dies_is_answered(start_broker, topic, fsync):
    """Sends pipelined to a reliable topic that is killed: each rid gets exactly one answer (a
    receipt, or an error saying to send again). With --fsync always the topic answers each send
    of a shard's PUBLISH on its own; the shard lost track of which were still in flight and
    never answered those when the topic died."""
    from actorbroker.transport.codec import encode_frame
    from tests.test_hostile import answers
    from tests.wire import RawConnection
    b = start_broker("--fsync", fsync)
    conn = RawConnection(*b.address)
    conn.hello()
    producer = conn.request({"op": "producer", "topic": topic, "dispatch": "reliable"})["producer"]
    victim = only_process(b, "ab-topic")
    rids = list(range(1000, 3000))
    conn.send_raw(b"".join(encode_frame({"op": "send", "rid": rid, "producer": producer, "msgs": [{"payload": b"m"}]})
                           for rid in rids))
    first = conn.recv_frame(timeout=EVENTUALLY_S)   # the first receipt: the rest are on their way
    kill(victim)
    got = answers(conn, rids[1:], timeout=EVENTUALLY_S)
    got[first["rid"]] = first
    assert {f["op"] for f in got.values()} <= {"receipt", "error"}
    conn.close()


def unread_by_broker(broker_port, client_port):
    """Bytes the broker's end of a loopback TCP connection holds unread (/proc/net/tcp rx_queue)."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) == broker_port and int(remote.split(":")[1], 16) == client_port:
                return int(fields[4].split(":")[1], 16)
    return 0


def test_a_send_the_shard_passes_to_a_topic_that_just_died_is_answered(start_broker, topic):
    """The shard reads a send before it has seen the topic's lane end: writing it to the dead
    lane failed, and the lane's end was handled right inside that write, before the send was
    recorded as in flight, so that it was never answered. The shard is stopped while the send
    arrives and the topic is killed, so that it reads the send first."""
    from tests.wire import RawConnection
    b = start_broker()
    conn = RawConnection(*b.address)
    conn.hello()
    producer = conn.request({"op": "producer", "topic": topic, "dispatch": "reliable"})["producer"]
    assert conn.request({"op": "send", "producer": producer, "msgs": [{"payload": b"before"}]})["op"] == "receipt"
    shards = processes_of_kind(b, "ab-shard")
    victim = only_process(b, "ab-topic")
    for pid in shards:
        os.kill(pid, signal.SIGSTOP)
    try:
        conn.send_frame({"op": "send", "rid": 77, "producer": producer, "msgs": [{"payload": b"in flight"}]})
        wait_for(lambda: unread_by_broker(b.port, conn.sock.getsockname()[1]), bool)
        kill(victim)
    finally:
        for pid in shards:
            os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + FEW_S
    answer = conn.recv_frame(timeout=FEW_S)
    while answer.get("op") in ("closed", "ping") and time.monotonic() < deadline:   # (the producer's end)
        answer = conn.recv_frame(timeout=max(0.01, deadline - time.monotonic()))
    assert answer.get("rid") == 77 and answer["op"] in ("receipt", "error"), answer
    conn.close()


@pytest.mark.parametrize("kind", ["ab-disp", "ab-sub", "ab-topic"])
def test_every_request_of_a_subscribe_storm_is_answered_when_its_actors_die(start_broker, topic, kind):
    """Six connections cycle subscribe -> close_consumer or unsubscribe, each on a subscription
    of its own, while every process of one kind is killed: each rid still gets exactly one
    answer. Requests the dead held were never answered; the broker now answers what its actors
    leave unanswered past --request-deadline-ms (an error saying to send it again)."""
    from tests.wire import RawConnection
    b = start_broker("--request-deadline-ms", "3000")
    stop = threading.Event()
    sent, answered, failures = {}, {}, []

    def storm(i):
        conn = RawConnection(*b.address)
        conn.hello(heartbeat_ms=SLOW_HEARTBEAT)

        def take_answers(done, within):
            """Read answers (each rid at most once) until done() or `within` seconds; False if
            the broker closed the connection."""
            deadline = time.monotonic() + within
            while not done() and time.monotonic() < deadline:
                try:
                    reply = conn.recv_frame(timeout=0.2)
                except TimeoutError:
                    continue
                if reply is None:
                    return False
                if "rid" in reply and reply["op"] not in ("ping", "closed"):
                    key = (i, reply["rid"])
                    assert key not in answered, f"rid {reply['rid']} ({sent.get(key)}) answered twice: " \
                                                f"{answered[key]}, then {reply}"
                    answered[key] = reply
            return True

        held, k, rid = None, 0, 10
        try:
            while not stop.is_set():
                rid += 1
                if held is None:
                    frame = {"op": "subscribe", "topic": topic, "subscription": f"s{i}", "type": "shared",
                             "consumer": f"c{i}", "dispatch": "reliable"}
                else:
                    frame = {"op": "close_consumer" if k % 3 else "unsubscribe", "consumer": held}
                k += 1
                conn.send_frame(dict(frame, rid=rid))
                sent[(i, rid)] = frame["op"]
                if not take_answers(lambda: (i, rid) in answered, 1.0):
                    return
                reply = answered.get((i, rid))
                if reply is not None and reply["op"] == "subscribed":
                    held = reply["consumer"]
                elif reply is not None and frame["op"] != "subscribe":
                    held = None
            take_answers(lambda: all(key in answered for key in list(sent) if key[0] == i), EVENTUALLY_S)
        except Exception as exc:   # noqa: BLE001
            failures.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=storm, args=(i,), daemon=True) for i in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)   # the storm runs: requests in flight at every moment
    for pid in processes_of_kind(b, kind):
        os.kill(pid, signal.SIGKILL)
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(EVENTUALLY_S + 10)
    assert not failures, "\n".join(failures)
    unanswered = sorted((op, key) for key, op in sent.items() if key not in answered)
    assert unanswered == [] and len(sent) > 12


def test_a_deleted_topic_whose_child_never_exits_still_ends(start_broker, topic):
    """Thespian ends an exiting actor only once every child has reported its exit, without a
    limit: a child whose end it never saw kept a deleted topic's process alive for good, and then
    serve's stop. A stopped dispatcher stands for such a child: the topic's process ends all the
    same, a few seconds after its exit began."""
    b = start_broker()
    with Client(*b.address) as client:
        client.subscribe(topic, "s", "shared", "c", dispatch="reliable")
        owner = only_process(b, "ab-topic")
        stuck = only_process(b, "ab-disp")
        os.kill(stuck, signal.SIGSTOP)
        try:
            client.delete_topic(topic)
            wait_for(lambda: proctree.alive(owner), lambda alive: not alive, timeout=EVENTUALLY_S)
        finally:
            if proctree.alive(stuck):
                os.kill(stuck, signal.SIGCONT)   # its parent's end (SIGTERM, pending) then ends it
        wait_for(lambda: proctree.alive(stuck), lambda alive: not alive, timeout=FEW_S)
        assert client.topics() == []


def test_kill_of_a_non_reliable_topic_drops_it_until_created_again(start_broker, closing, topic):
    b = start_broker()
    admin = closing(Admin(b))
    client = closing(Client(*b.address))
    first = closing(Collector(client.subscribe(topic, "s", "shared", "c1", dispatch="non_reliable")))
    traffic = closing(Traffic(b, topic, "non_reliable", reopen=False))
    wait_for(lambda: (len(traffic.receipted), len(first.received)), lambda s: s[0] >= 20 and s[1] >= 1)

    kill(only_process(b, "ab-topic"))
    wait_for(lambda: first.consumer.closed_reason, lambda r: r == "topic_lost", timeout=FEW_S)
    wait_for(lambda: traffic.producers[0].closed_reason, lambda r: r == "topic_lost", timeout=FEW_S)
    wait_for(lambda: admin.topics(), lambda t: t is not None and topic not in t, timeout=FEW_S)
    assert_hello_answered_fast(b)
    assert topic not in admin.topics()          # gone until something creates it again

    consumer = client.subscribe(topic, "s", "shared", "c2")      # creates it again
    stats = admin.stats(topic)
    assert stats["dispatch"] == "non_reliable"
    assert [(s["name"], names(stats, s["name"])) for s in stats["subscriptions"]] == [("s", ["c2"])]
    producer = client.producer(topic)
    offset = producer.send_sync(b"again")
    msg = consumer.receive(timeout=FEW_S)
    assert (msg.id, msg.payload) == (offset, b"again")
    assert admin.topics()[topic]["dispatch"] == "non_reliable"


# --- subscription and dispatcher ----------------------------------------------------------------

@pytest.mark.parametrize("dispatch", ["reliable", "non_reliable"])
@pytest.mark.parametrize("kind", ["ab-sub", "ab-disp"])
def test_kill_of_a_subscription_process_closes_its_consumers_only(start_broker, closing, topic, kind, dispatch):
    b = start_broker()
    admin = closing(Admin(b))
    c1 = closing(Client(*b.address, name="c1"))
    c2 = closing(Client(*b.address, name="c2"))
    reliable = dispatch == "reliable"
    ack = "even" if reliable else None
    victims = [closing(Collector(c.subscribe(topic, "victim", "shared", name, dispatch=dispatch), ack=ack))
               for c, name in ((c1, "v1"), (c2, "v2"))]
    victim = only_process(b, kind)               # the "victim" subscription's, the only one yet
    other = closing(Collector(c2.subscribe(topic, "other", "shared", "o1", dispatch=dispatch), ack="all"))
    wait_for(lambda: processes_of_kind(b, kind), lambda pids: len(pids) == 2)
    traffic = closing(Traffic(b, topic, dispatch))
    wait_for(lambda: (len(traffic.receipted), [len(v.received) for v in victims], len(other.received)),
             lambda s: s[0] >= 20 and all(s[1]) and s[2] >= 1)

    at = kill(victim)
    wait_for(lambda: [v.consumer.closed_reason for v in victims], lambda r: r == ["subscription_lost"] * 2,
             timeout=FEW_S)
    assert other.consumer.closed_reason is None and traffic.producers[0].closed_reason is None

    if reliable:
        assert_hello_answered_fast(b)
        again = closing(Collector(subscribe_again(c1, topic, "victim", "shared", "v1", dispatch=dispatch),
                                  ack="all"))
        wait_for(lambda: len(traffic.since(at)), lambda count: count >= 10, timeout=FEW_S)
        traffic.stop()
        # the other subscription got everything; the victim's every message not acknowledged
        wait_for(lambda: undelivered(traffic.receipted, [other]), all_delivered, timeout=EVENTUALLY_S)
        acked = victims[0].acked | victims[1].acked
        wait_for(lambda: undelivered(traffic.receipted, [again], acked), all_delivered, timeout=EVENTUALLY_S)
    else:
        wait_for(lambda: admin.stats(topic), lambda s: s is not None and subscription_names(s) == {"other"},
                 timeout=FEW_S)
        assert_hello_answered_fast(b)
        # the other subscription keeps receiving
        mark = time.monotonic()
        sent = wait_for(lambda: traffic.since(mark), lambda offsets: len(offsets) >= 10, timeout=FEW_S)
        wait_for(lambda: [o for o in sent if o not in other.received], lambda missing: not missing,
                 timeout=FEW_S)
        # a subscribe creates the lost one again, and it receives what is sent from then on
        again = closing(Collector(c1.subscribe(topic, "victim", "shared", "v3", dispatch=dispatch)))
        assert names(admin.stats(topic), "victim") == ["v3"]
        mark = time.monotonic()
        sent = wait_for(lambda: traffic.since(mark), lambda offsets: len(offsets) >= 5, timeout=FEW_S)
        wait_for(lambda: [o for o in sent if o not in again.received], lambda missing: not missing,
                 timeout=FEW_S)
        traffic.stop()


@pytest.mark.parametrize("kind", ["ab-sub", "ab-disp"])
def test_kill_of_several_subscription_processes_at_once_restarts_every_one(start_broker, closing, topic, kind):
    # Children killed together send their parent one SIGCHLD; each must still be handled.
    b = start_broker()
    client = closing(Client(*b.address, heartbeat_ms=SLOW_HEARTBEAT))
    holders = [client.subscribe(topic, f"s{i}", "exclusive", f"h{i}", dispatch="reliable") for i in range(3)]
    pids = wait_for(lambda: processes_of_kind(b, kind), lambda found: len(found) == 3)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: [h.closed_reason for h in holders], lambda r: r == ["subscription_lost"] * 3, timeout=FEW_S)
    for i in range(3):   # each restored from its cursor, and taking a new consumer
        consumer = subscribe_again(client, topic, f"s{i}", "exclusive", f"n{i}", dispatch="reliable")
        assert consumer.id is not None


@pytest.mark.parametrize("kind", ["ab-sub", "ab-disp"])
def test_a_subscription_whose_process_is_killed_as_it_starts_is_not_wedged(start_broker, closing, topic, kind):
    """A subscription process (or its dispatcher) killed within milliseconds of its start is not
    reported by Thespian: every later subscribe to that subscription got INTERNAL at the request
    deadline, for good (supervision probe, 3 of 5). A pair not both running PAIR_START_DEADLINE
    after its start is now handled as lost: restarted, and subscribed to again."""
    from actorbroker.actors import broker  # noqa: F401 (topic is imported through it, not first)
    from actorbroker.actors.topic import PAIR_START_DEADLINE
    b = start_broker()
    client = closing(Client(*b.address, heartbeat_ms=SLOW_HEARTBEAT))
    producer = client.producer(topic, dispatch="reliable")
    before = set(processes_of_kind(b, kind))
    answered = []

    def first():
        try:
            answered.append(client.subscribe(topic, "s", "shared", "first", dispatch="reliable", timeout=60))
        except BrokerError as exc:   # INTERNAL: the subscription was lost before it answered
            answered.append(exc)
    thread = threading.Thread(target=first, daemon=True)
    thread.start()
    (pid,) = wait_for(lambda: set(processes_of_kind(b, kind)) - before, lambda new: len(new) == 1, interval=0.002)
    os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert answered, "the subscribe in flight got no answer"
    limit = PAIR_START_DEADLINE.total_seconds() + EVENTUALLY_S
    consumer = subscribe_again(client, topic, "s", "shared", "again", dispatch="reliable", timeout=limit)
    producer.send_sync(b"after")   # to one of the subscription's live consumers
    consumers = [consumer] + [c for c in answered if not isinstance(c, BrokerError) and c.closed_reason is None]

    def taken():
        for c in consumers:
            try:
                return c.receive(timeout=0.05).payload
            except TimeoutError:
                pass
    assert wait_for(taken, lambda payload: payload is not None, timeout=FEW_S) == b"after"


def test_a_subscribe_that_meets_a_just_killed_subscription_process_is_answered(start_broker, closing, topic):
    # The subscribe reaches the topic before the death does: passed on to a process that is gone,
    # it must still get its one answer (PROTOCOL.md), from the restored subscription.
    b = start_broker()
    client = closing(Client(*b.address, heartbeat_ms=SLOW_HEARTBEAT))
    for i in range(8):
        before = set(processes_of_kind(b, "ab-sub"))
        holder = client.subscribe(topic, f"s{i}", "shared", "h", dispatch="reliable")
        (pid,) = wait_for(lambda: set(processes_of_kind(b, "ab-sub")) - before, lambda new: len(new) == 1)
        os.kill(pid, signal.SIGKILL)
        newcomer = client.subscribe(topic, f"s{i}", "shared", "n", dispatch="reliable", timeout=FEW_S * 2)
        wait_for(lambda: holder.closed_reason, lambda reason: reason == "subscription_lost", timeout=FEW_S)
        assert newcomer.closed_reason is None


# --- a client that reconnects recovers by itself ----------------------------------------------

class Sender:
    """One producer's sends from a thread, one at a time, never reopened by the test: a send that
    fails (INTERNAL while the topic restarts) is recorded and the next goes on; the thread ends
    if the producer is closed for good."""

    def __init__(self, producer):
        self.producer = producer
        self.receipts = []     # (monotonic time the send started, offset, payload)
        self.errors = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
        self._thread.start()

    def _run(self):
        seq = 0
        while not self._stop.is_set():
            payload = f"s{seq}".encode()
            seq += 1
            started = time.monotonic()
            try:
                self.receipts.append((started, self.producer.send_sync(payload, timeout=EVENTUALLY_S), payload))
            except ProducerClosed as exc:
                self.errors.append(exc)
                return
            except (BrokerError, ConnectionLost) as exc:
                self.errors.append(exc)
            self._stop.wait(0.02)

    def payloads_since(self, at):
        return [payload for started, _, payload in list(self.receipts) if started > at]

    def close(self):
        self._stop.set()
        self._thread.join(15)


def payloads_of(collector):
    return set(collector.received.values()) | {conflict[2] for conflict in collector.conflicts}


@pytest.mark.parametrize("dispatch", ["reliable", "non_reliable"])
def test_a_reconnecting_client_opens_its_producer_and_consumer_again_when_the_topic_process_dies(
        start_broker, closing, topic, dispatch):
    # As a Pulsar client after a topic is unloaded: the application keeps its objects and goes on.
    b = start_broker()
    client = closing(Client(*b.address, reconnect=True, heartbeat_ms=SLOW_HEARTBEAT))
    consumer = client.subscribe(topic, "s", "exclusive", "c", dispatch=dispatch)
    collector = closing(Collector(consumer, ack="all" if dispatch == "reliable" else None))
    producer = client.producer(topic, dispatch=dispatch, linger_ms=0)
    sender = closing(Sender(producer))
    wait_for(lambda: (len(sender.receipts), len(collector.received)), lambda s: s[0] >= 20 and s[1] >= 1)

    old_id = consumer.id
    at = kill(only_process(b, "ab-topic"))
    if dispatch == "non_reliable":   # created again empty: what is sent once the consumer is back arrives
        wait_for(lambda: consumer.id, lambda new_id: new_id != old_id, timeout=EVENTUALLY_S)
        at = time.monotonic()
    # (the topic's new process may take seconds to start on a loaded machine)
    sent = wait_for(lambda: sender.payloads_since(at), lambda payloads: len(payloads) >= 10, timeout=EVENTUALLY_S)
    wait_for(lambda: [p for p in sent if p not in payloads_of(collector)], lambda missing: not missing,
             timeout=FEW_S)
    assert (producer.closed_reason, consumer.closed_reason, collector.ended) == (None, None, [])
    sender.close()
    assert not [exc for exc in sender.errors if not isinstance(exc, BrokerError)], "the producer ended"
    if dispatch == "reliable":   # and nothing receipted before the kill is missing either
        receipted = {offset: payload for _, offset, payload in sender.receipts}
        wait_for(lambda: undelivered(receipted, [collector]), all_delivered, timeout=EVENTUALLY_S)


@pytest.mark.parametrize("dispatch", ["reliable", "non_reliable"])
def test_a_reconnecting_client_subscribes_again_when_the_subscription_process_dies(
        start_broker, closing, topic, dispatch):
    b = start_broker()
    client = closing(Client(*b.address, reconnect=True, heartbeat_ms=SLOW_HEARTBEAT))
    reliable = dispatch == "reliable"
    collector = closing(Collector(client.subscribe(topic, "s", "shared", "c", dispatch=dispatch),
                                  ack="even" if reliable else None))
    traffic = closing(Traffic(b, topic, dispatch))
    wait_for(lambda: (len(traffic.receipted), len(collector.received)), lambda s: s[0] >= 20 and s[1] >= 1)

    old_id = collector.consumer.id
    at = kill(only_process(b, "ab-sub"))
    if not reliable:   # its backlog went with it: what is sent once the new one is there arrives
        wait_for(lambda: collector.consumer.id, lambda new_id: new_id != old_id, timeout=EVENTUALLY_S)
        at = time.monotonic()
    sent = wait_for(lambda: traffic.since(at), lambda offsets: len(offsets) >= 10, timeout=EVENTUALLY_S)
    wait_for(lambda: [o for o in sent if o not in collector.received], lambda missing: not missing,
             timeout=FEW_S)
    assert collector.consumer.closed_reason is None and collector.ended == []
    traffic.stop()
    if reliable:   # the restarted subscription delivered again what was not acknowledged
        wait_for(lambda: undelivered(traffic.receipted, [collector], collector.acked), all_delivered,
                 timeout=EVENTUALLY_S)


def test_a_consumer_without_auto_credit_keeps_its_unused_credits_when_reopened(start_broker, closing, topic):
    """auto_credit=False: the credits the application granted were lost when the client opened the
    consumer again (its subscription's process died): the new attachment had none, and the
    consumer, resumed, got nothing more until the application, unaware, granted more."""
    b = start_broker()
    client = closing(Client(*b.address, reconnect=True, heartbeat_ms=SLOW_HEARTBEAT))
    consumer = client.subscribe(topic, "s", "shared", "c", dispatch="reliable", auto_credit=False)
    consumer.flow(10)
    producer = client.producer(topic, dispatch="reliable", linger_ms=0)
    for i in range(3):
        producer.send(b"before %d" % i)
    got = [consumer.receive(timeout=FEW_S) for _ in range(3)]
    consumer.ack(got, sync=True)

    old_id = consumer.id
    kill(only_process(b, "ab-sub"))
    wait_for(lambda: consumer.id, lambda new_id: new_id != old_id, timeout=EVENTUALLY_S)
    for i in range(7):   # the 7 credits left: no flow from the application
        producer.send(b"after %d" % i)
    got = [consumer.receive(timeout=EVENTUALLY_S).payload for _ in range(7)]
    assert got == [b"after %d" % i for i in range(7)]
    assert consumer.closed_reason is None


def test_a_reopen_answered_late_still_resumes_the_producer_and_consumer(start_broker, closing, topic):
    """The topic's new process hangs (stopped here, as one stuck in a stalled fsync would be)
    longer than the client waited for the reopen's answer (twice connect_timeout): the producer and
    consumer were then kept for a reconnect that never came, never resumed nor ended, while the
    late answer opened them on the broker (clients probe, 6 of 6)."""
    b = start_broker()
    client = closing(Client(*b.address, reconnect=True, connect_timeout=1, heartbeat_ms=SLOW_HEARTBEAT))
    consumer = client.subscribe(topic, "s", "exclusive", "c", dispatch="reliable")
    producer = client.producer(topic, dispatch="reliable", linger_ms=0)
    producer.send_sync(b"before")
    consumer.ack(consumer.receive(timeout=FEW_S), sync=True)
    old = only_process(b, "ab-topic")
    os.kill(old, signal.SIGKILL)
    (new,) = wait_for(lambda: set(processes_of_kind(b, "ab-topic")) - {old}, lambda pids: len(pids) == 1,
                      interval=0.002)
    os.kill(new, signal.SIGSTOP)
    try:
        time.sleep(4)   # the hang itself: longer than the 2 s the client waited for an answer
    finally:
        os.kill(new, signal.SIGCONT)
    deadline = time.monotonic() + EVENTUALLY_S
    while True:   # sends made before the producer was back may be refused (INTERNAL, UNKNOWN_PRODUCER)
        try:
            producer.send_sync(b"after", timeout=EVENTUALLY_S)
            break
        except BrokerError:
            assert time.monotonic() < deadline
    payloads = []
    while b"after" not in payloads:
        msg = consumer.receive(timeout=EVENTUALLY_S)
        payloads.append(msg.payload)
        consumer.ack(msg)
    assert producer.closed_reason is None and consumer.closed_reason is None


def test_an_async_client_that_reconnects_opens_its_producer_and_consumer_again_when_the_topic_dies(
        start_broker, topic):
    import asyncio
    from actorbroker.transport.client import AsyncClient
    b = start_broker()

    async def main():
        async with await AsyncClient.connect(*b.address, reconnect=True, heartbeat_ms=SLOW_HEARTBEAT) as client:
            consumer = await client.subscribe(topic, "s", "exclusive", "c", dispatch="reliable")
            producer = await client.producer(topic, dispatch="reliable", linger_ms=0)
            assert await producer.send_sync(b"before") == 0
            assert (await consumer.receive(timeout=FEW_S)).payload == b"before"
            old = (producer.id, consumer.id)
            await asyncio.get_running_loop().run_in_executor(None, kill, only_process(b, "ab-topic"))
            deadline = time.monotonic() + EVENTUALLY_S
            while producer.id == old[0] or consumer.id == old[1]:   # reopened by the client itself
                assert time.monotonic() < deadline, "not reopened"
                await asyncio.sleep(0.05)
            sent = None
            while sent is None:   # a send made before the broker had the producer again may be refused
                try:
                    sent = await producer.send_sync(b"after", timeout=EVENTUALLY_S)
                except BrokerError:
                    assert time.monotonic() < deadline
            payloads = []
            while b"after" not in payloads:   # ("before" again first, unacknowledged)
                msg = await consumer.receive(timeout=EVENTUALLY_S)
                payloads.append(msg.payload)
                await consumer.ack(msg)
            assert producer.closed_reason is None and consumer.closed_reason is None
    asyncio.run(main())


# --- log ----------------------------------------------------------------------------------------

def test_kill_of_the_log_loses_no_receipted_message(start_broker, closing, topic):
    b = start_broker()
    client = closing(Client(*b.address))

    def subscribe():
        return client.subscribe(topic, "s", "exclusive", "c", dispatch="reliable")

    collector = closing(Collector(subscribe(), ack="all", resubscribe=subscribe))
    traffic = closing(Traffic(b, topic, "reliable"))
    wait_for(lambda: (len(traffic.receipted), len(collector.received)), lambda s: s[0] >= 20 and s[1] >= 1)

    at = kill(only_process(b, "ab-log"))
    wait_for(lambda: traffic.since(at), bool, timeout=FEW_S)        # a send gets a receipt again
    assert_hello_answered_fast(b)
    wait_for(lambda: len(traffic.since(at)), lambda count: count >= 10, timeout=FEW_S)
    assert [p.closed_reason for p in traffic.producers] == [None], "the producer was closed"
    traffic.stop()
    refused = [exc for _, exc in traffic.errors if not isinstance(exc, Internal)]
    assert not refused, f"sends failed otherwise than with INTERNAL: {refused}"
    wait_for(lambda: undelivered(traffic.receipted, [collector]), all_delivered, timeout=EVENTUALLY_S)


# --- events and metrics -----------------------------------------------------------------------------

def _next_event(conn, kind, timeout=FEW_S):
    deadline = time.monotonic() + timeout
    while True:
        frame = conn.recv_frame(timeout=max(0.01, deadline - time.monotonic()))
        assert frame is not None, "the watcher's connection closed"
        if frame["op"] == "ping":
            conn.send_frame({"op": "pong", "rid": frame["rid"]})
        elif frame["op"] == "event" and frame["kind"] == kind:
            return frame


def test_the_events_command_reports_no_gap_for_a_restart_of_the_events_actor(start_broker, topic):
    """`actorbroker events` printed "(-5 events missed)" after `events_lost` (whose seq starts
    again from 1): that event tells what happened itself, and nothing was counted missed."""
    import json
    import subprocess
    import sys
    b = start_broker()
    proc = subprocess.Popen([sys.executable, "-m", "actorbroker.scripts.cli", "events", "--url",
                             f"{b.host}:{b.port}", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "watching" in proc.stderr.readline()
        for i in range(2):   # events before the restart: seq 4 by the time it dies
            Client(*b.address, name=f"c{i}").close()
        kinds = [json.loads(proc.stdout.readline())["kind"] for _ in range(4)]
        kill(only_process(b, "ab-events"))
        while kinds[-1] != "events_lost":
            kinds.append(json.loads(proc.stdout.readline())["kind"])
        Client(*b.address, name="after").close()   # events after it: seq 2, 3
        kinds.append(json.loads(proc.stdout.readline())["kind"])
        proc.terminate()
        proc.wait(timeout=FEW_S)
        assert "events missed" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_of_the_events_actor_restarts_it_and_the_watchers_go_on(start_broker, closing, topic):
    """Its watchers are told `events_lost` (seq starts again from 1 with it), then get the events
    decided after the restart; a new watch is answered."""
    from tests.wire import RawConnection
    b = start_broker()
    watcher = closing(RawConnection(*b.address))
    watcher.hello()
    watcher.request({"op": "watch"})
    closing(RawConnection(*b.address))
    before = _next_event(watcher, "connection_opened")
    client = closing(Client(*b.address, name="before"))
    client.producer(topic + "-early")    # the root decides a topic_created: its events channel is used
    _next_event(watcher, "topic_created")

    old = only_process(b, "ab-events")
    kill(old)
    lost = _next_event(watcher, "events_lost")
    assert before["seq"] >= 1 and lost["seq"] == 1            # the numbering starts again with it
    assert only_process(b, "ab-events") != old
    newcomer = closing(RawConnection(*b.address))
    newcomer.hello()
    opened = _next_event(watcher, "connection_opened")
    assert opened["seq"] > lost["seq"]
    assert newcomer.request({"op": "watch"}) == {"op": "ok", "rid": newcomer.last_rid}
    client.subscribe(topic, "s", "exclusive", "c")
    # the root's own events too (its channel to the old actor once held them 5 s, as a gap)
    assert _next_event(newcomer, "topic_created", timeout=3)["topic"] == topic
    assert _next_event(newcomer, "consumer_attached")["topic"] == topic
    assert _next_event(watcher, "consumer_attached")["topic"] == topic


def test_kill_of_the_metrics_actor_restarts_it_on_the_same_port(start_broker, closing, topic):
    import urllib.error
    import urllib.request
    b = start_broker("--metrics-port", "0")

    def scrape():
        try:
            with urllib.request.urlopen(b.metrics_url, timeout=5) as response:
                return response.read().decode()
        except (urllib.error.URLError, ConnectionError):
            return None

    client = closing(Client(*b.address, name="counted"))
    producer = client.producer(topic)
    producer.send(b"x").result(5)
    assert "actorbroker_" in scrape()
    kill(only_process(b, "ab-metrics"))
    # served again at the same address, with the totals of before (the actors report them again)
    text = wait_for(scrape, lambda t: t is not None and "actorbroker_topic_messages_in_total{" in t, timeout=FEW_S)
    assert any(line.startswith("actorbroker_topic_messages_in_total{") and float(line.split()[-1]) >= 1
               for line in text.splitlines()), text
