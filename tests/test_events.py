"""The lifecycle event stream (`watch`, docs/protocol.md "Events") over real TCP against a real
broker: which events come, in which order, to whom, and what a watcher that does not read costs."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from actorbroker.transport.client import Client
from tests.test_limits import PingFlood, read_to_the_end
from tests.test_protocol import assert_error
from tests.util import ROOT, failover_holding, own_ports_to, peer_ports_held_by, processes_of_kind, wait_for
from tests.wire import RawConnection


def events_until(client, done, first_seq=1, timeout=20):
    """Events of `client`'s watch until done(events) holds; checks that seq has no gap."""
    got = []
    while not done(got):
        try:
            event = client.next_event(timeout=timeout)
        except TimeoutError:
            raise AssertionError(f"no more events within {timeout} s; got {got}") from None
        assert event["seq"] == first_seq + len(got), (event, got[-3:])
        got.append(event)
    return got


def about(events, **fields):
    """The events whose fields include `fields`."""
    return [e for e in events if all(e.get(k) == v for k, v in fields.items())]


def kinds(events):
    return [e["kind"] for e in events]


def test_attach_kill_promotion_redelivery_and_delete_come_in_the_order_decided(start_broker, topic):
    b = start_broker()
    watcher = Client(*b.address, name="watcher")
    watcher.watch(topic)
    with Client(*b.address) as client:
        a, standby = failover_holding(b, client, topic, 5)
        events = events_until(watcher, lambda got: about(got, kind="consumer_attached", consumer_name="b"))
        attached_a = about(events, kind="consumer_attached", consumer_name="a")[0]
        assert attached_a == dict(attached_a, topic=topic, subscription="s", consumer=a.consumer_id)
        connection_a = attached_a["connection"]
        opened = about(events, kind="connection_opened", connection=connection_a)
        assert opened and opened[0]["address"].startswith("127.0.0.1:")
        assert kinds(about(events, topic=topic)) == ["topic_created", "consumer_attached", "consumer_attached"]
        assert events.index(opened[0]) < events.index(attached_a)

        a.proc.send_signal(signal.SIGKILL)   # kill -9 of the active consumer's client
        a.stop()
        events += events_until(watcher, lambda got: about(got, kind="promoted"), len(events) + 1)
        after_kill = events[events.index(about(events, kind="consumer_attached", consumer_name="b")[0]) + 1:]
        lost = [e for e in after_kill if e.get("connection") == connection_a or e.get("topic") == topic]
        assert kinds(lost) == ["connection_closed", "consumer_detached", "redelivered", "promoted"], lost
        assert lost[0]["cause"] == "eof"
        assert lost[1] == dict(lost[1], consumer=a.consumer_id, consumer_name="a", cause="connection_closed")
        assert lost[2] == dict(lost[2], subscription="s", count=5)
        assert lost[3] == dict(lost[3], consumer=standby.id, consumer_name="b", subscription="s")
        assert [e["time_ms"] for e in lost] == sorted(e["time_ms"] for e in lost)

        client.delete_topic(topic)
        events += events_until(watcher, lambda got: about(got, kind="topic_deleted"), len(events) + 1)
        deleted = about(events[events.index(lost[-1]) + 1:], topic=topic)
        # b held the 5 messages unacked: they end with the subscription, not put back (no
        # `redelivered`: they went nowhere), then the topic goes
        assert kinds(deleted) == ["consumer_detached", "topic_deleted"]
        assert deleted[0] == dict(deleted[0], consumer=standby.id, cause="topic_deleted")
    watcher.close()


@pytest.mark.parametrize("kind,cause", [("ab-sub", "subscription_lost"), ("ab-disp", "subscription_lost"),
                                        ("ab-topic", "topic_lost")])
def test_consumers_ended_by_a_killed_process_are_detached_events_too(start_broker, topic, kind, cause):
    """kill -9 of a subscription's (or its dispatcher's, or its topic's) process: its consumers got
    `closed` (subscription_lost / topic_lost) and no consumer_detached was ever sent (the process
    that sends it had died), so a watcher kept them attached. The broker says so now."""
    b = start_broker()
    watcher = Client(*b.address, name="watcher")
    watcher.watch(topic)
    with Client(*b.address) as client:
        consumers = [client.subscribe(topic, "s", "shared", name, dispatch="reliable") for name in ("x", "y")]
        events = events_until(watcher, lambda got: len(about(got, kind="consumer_attached")) == 2)
        pid = wait_for(lambda: processes_of_kind(b, kind), lambda pids: len(pids) == 1)[0]
        os.kill(pid, signal.SIGKILL)
        events += events_until(watcher, lambda got: len(about(got, kind="consumer_detached")) == 2, len(events) + 1)
        detached = about(events, kind="consumer_detached")
        assert sorted((e["consumer"], e["consumer_name"], e["subscription"], e["topic"], e["cause"])
                      for e in detached) == [(c.id, c.name, "s", topic, cause) for c in consumers], detached
        assert [c.closed_reason for c in consumers] == [cause, cause]
    watcher.close()


@pytest.mark.parametrize("topics", [1, 10])
def test_the_consumers_of_a_killed_shard_are_detached_after_their_connection_closed(start_broker, topic, topics):
    """kill -9 of the shard holding a connection's consumers: their consumer_detached came before
    that connection's connection_closed (shard_lost) and named no connection, unlike any other end
    of a connection (docs/protocol.md, "Events": a detach caused by a connection's end comes after
    it). With 40 consumers over 10 reliable topics holding unacked messages, redelivered and
    promoted came before the close (regression probe, 3 of 3): the close comes first, and each
    subscription's events after its first detach."""
    b = start_broker("--io-shards", "2")
    shards = wait_for(lambda: processes_of_kind(b, "ab-shard"), lambda pids: len(pids) == 2)
    opened = []
    names = [f"{topic}-{i}" for i in range(topics)]

    def connect(name):   # a client and the shard holding its socket
        before = own_ports_to(b.port)
        client = Client(*b.address, name=name)
        opened.append(client)
        port = (own_ports_to(b.port) - before).pop()
        return client, wait_for(lambda: [pid for pid in shards if port in peer_ports_held_by(pid, b.port)],
                                lambda held: len(held) == 1)[0]
    try:
        watcher, watcher_shard = connect("watcher")
        watcher.watch(f"{topic}-*")
        for i in range(16):   # connections go to the shards in turn: one lands on the other soon
            client, victim_shard = connect(f"victim{i}")
            if victim_shard != watcher_shard:
                break
        assert victim_shard != watcher_shard
        victims, standbys = {}, {}
        for name in names:   # each holds 5 messages unacked
            standbys[name] = watcher.subscribe(name, "fo", "failover", "b", dispatch="reliable")
            victims[name] = [client.subscribe(name, sub, kind, consumer, dispatch="reliable")
                             for sub, kind, consumer in (("sh", "shared", "s1"), ("sh", "shared", "s2"),
                                                         ("fo", "failover", "a"), ("ex", "exclusive", "e"))]
            producer = watcher.producer(name, dispatch="reliable")
            for i in range(5):
                producer.send_sync(b"m%d" % i)
        attached = events_until(watcher, lambda got: len(about(got, kind="consumer_attached")) == 5 * topics)
        connection = about(attached, kind="consumer_attached", consumer_name="a")[0]["connection"]
        for name in names:
            for consumer in victims[name][2:]:
                assert [consumer.receive(timeout=10).payload for _ in range(5)] == [b"m%d" % i for i in range(5)]
        os.kill(victim_shard, signal.SIGKILL)
        after = events_until(watcher, lambda got: len(about(got, kind="promoted", consumer_name="b")) == topics
                             and len(about(got, kind="consumer_detached")) == 4 * topics, len(attached) + 1)
        closed = about(after, kind="connection_closed", connection=connection)
        assert len(closed) == 1 and closed[0]["cause"] == "shard_lost"
        lost = [e for e in after if e.get("topic") in names or e is closed[0]]
        assert lost[0] is closed[0], lost[:5]
        for name in names:
            for sub in ("sh", "fo", "ex"):
                its = [e["kind"] for e in lost if e.get("topic") == name and e.get("subscription") == sub]
                assert its and its[0] == "consumer_detached", (name, sub, its)
        detached = about(lost, kind="consumer_detached")
        assert {(e["consumer"], e["cause"], e["connection"]) for e in detached} == \
            {(c.id, "connection_closed", connection) for name in names for c in victims[name]}
    finally:
        for client in opened:
            client.close(timeout=2)


def test_a_pattern_selects_topics_connection_events_always_pass(start_broker, topic):
    b = start_broker()
    watcher = Client(*b.address, name="watcher")
    watcher.watch("/other/*")
    with Client(*b.address) as client:
        client.subscribe(topic, "s", "shared", "c").close()
        client.producer("/other/x").close()
    events = events_until(watcher, lambda got: about(got, kind="topic_created"))
    assert about(events, kind="topic_created") == [dict(events[-1], topic="/other/x", dispatch="non_reliable")]
    assert not about(events, topic=topic)
    assert about(events, kind="connection_opened")   # the client's connection: no topic, passes
    watcher.watch(topic)                              # a second watch replaces the pattern
    with Client(*b.address) as client:
        client.subscribe(topic, "s", "shared", "c2").close()
        client.producer("/other/y").close()
    more = events_until(watcher, lambda got: about(got, kind="consumer_detached"), len(events) + 1)
    assert kinds(about(more, topic=topic)) == ["consumer_attached", "consumer_detached"], more   # it existed
    assert about(more, cause="closed")
    assert not about(more, topic="/other/y")
    watcher.unwatch()
    with Client(*b.address) as client:
        client.producer(topic + "z").close()
    watcher.watch("/nothing/*")   # answered in order after anything the unwatch let through
    with Client(*b.address):
        pass
    seen = len(events) + len(more)
    last = events_until(watcher, lambda got: about(got, kind="connection_closed"), seen + 1)   # seq goes on
    assert not about(last, topic=topic + "z")
    watcher.close()


def test_watch_needs_admin_when_auth_is_on_and_a_pattern_must_be_a_name(start_broker, tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"root": ["admin"], "reader": ["consume:/test/*"]}))
    b = start_broker("--auth-file", str(tokens))
    conn = RawConnection(*b.address)
    conn.hello(token="reader")
    assert_error(conn.request({"op": "watch", "topics": "/test/*"}, expect_error=True), "NOT_AUTHORIZED",
                 conn.last_rid)
    root = RawConnection(*b.address)
    root.hello(token="root")
    assert_error(root.request({"op": "watch", "topics": 7}, expect_error=True), "BAD_REQUEST", root.last_rid)
    assert root.request({"op": "watch"}) == {"op": "ok", "rid": root.last_rid}
    conn.sock.close()   # the reader's connection ends: the admin watcher sees it
    while True:
        event = root.recv_frame(timeout=10)
        if event["op"] == "event" and event["kind"] == "connection_closed":
            break
    assert event["cause"] == "eof" and event["seq"] >= 1
    assert root.request({"op": "unwatch"}) == {"op": "ok", "rid": root.last_rid}


def test_a_watcher_that_does_not_read_is_cut_off_and_slows_no_one(start_broker, topic):
    """A watcher that never reads what it is sent (events, and the pongs of the pings it keeps
    writing, which fill the kernel's buffers in seconds rather than minutes) is closed with
    SLOW_CONSUMER: another watcher sees slow_consumer then connection_closed with that cause, what
    it got ends with the error and has no gap in seq, and a producer and a consumer of the broker
    lose nothing meanwhile."""
    b = start_broker("--max-pending-bytes", str(256 * 1024))
    slow = RawConnection(*b.address)
    slow.hello(heartbeat_ms=60000)
    assert slow.request({"op": "watch"})["op"] == "ok"
    socket.create_connection(b.address).close()
    early = []   # it reads until its first event, so that what it got before the cut is not empty
    while not any(f["op"] == "event" for f in early):
        early.append(slow.recv_frame(timeout=10))
    watcher = Client(*b.address, name="watcher")
    watcher.watch(topic)
    churn_stop = threading.Event()

    def churn():   # connections opened and closed: two events each for every watcher
        while not churn_stop.is_set():
            socket.create_connection(b.address).close()

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    flood = PingFlood(slow)
    slow_id = None
    try:
        with Client(*b.address) as client:
            consumer = client.subscribe(topic, "s", "shared", "c")
            producer = client.producer(topic)
            for round_ in range(10):
                futures = [producer.send(b"%d-%d" % (round_, i)) for i in range(100)]
                producer.flush()
                assert [f.result(10) for f in futures] == list(range(round_ * 100, round_ * 100 + 100))
                assert [consumer.receive(timeout=10).payload for _ in range(100)] == \
                    [b"%d-%d" % (round_, i) for i in range(100)]
            while slow_id is None:
                event = watcher.next_event(timeout=60)
                if event["kind"] == "slow_consumer":
                    slow_id = event["connection"]
            closed = watcher.next_event(timeout=10)
            while closed.get("connection") != slow_id:   # the churn's events come in between
                closed = watcher.next_event(timeout=10)
            assert closed["kind"] == "connection_closed" and closed["cause"] == "slow_consumer"
    finally:
        churn_stop.set()
        churner.join()
        flood.join()
    frames = early + list(read_to_the_end(slow))
    assert frames[-1]["op"] == "error" and frames[-1]["code"] == "SLOW_CONSUMER", frames[-3:]
    seqs = [f["seq"] for f in frames if f["op"] == "event"]
    assert seqs and seqs == list(range(1, len(seqs) + 1))   # what it got before the cut: no gap
    watcher.close()


def test_events_command_prints_one_line_or_one_json_object_per_event(start_broker, topic):
    b = start_broker()
    url = f"{b.host}:{b.port}"
    commands = [subprocess.Popen([sys.executable, "-m", "actorbroker.scripts.cli", "events", topic, *extra,
                                  "--url", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
                for extra in (["--json"], [])]
    for command in commands:   # each says so once its watch is answered
        assert command.stderr.readline().decode().startswith(f"watching {topic} on ")
    with Client(*b.address) as client:
        client.subscribe(topic, "s", "exclusive", "c").close()
    outputs = []
    for command in commands:   # connection events pass any pattern: those of the topic are read
        lines = []
        while "consumer_detached" not in "".join(lines):
            lines.append(command.stdout.readline().decode())
        command.send_signal(signal.SIGINT)
        assert command.wait(timeout=30) == 130
        outputs.append([line for line in lines if topic in line])
    as_json = [json.loads(line) for line in outputs[0]]
    assert kinds(as_json) == ["topic_created", "consumer_attached", "consumer_detached"]
    assert as_json[1] == dict(as_json[1], op="event", topic=topic, subscription="s", consumer_name="c")
    assert as_json[2]["cause"] == "closed" and as_json[1]["seq"] < as_json[2]["seq"]
    assert [line.split()[1] for line in outputs[1]] == kinds(as_json)
    assert f"topic={topic}" in outputs[1][0] and "consumer_name=c" in outputs[1][1]
