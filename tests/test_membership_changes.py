"""What consumers see when another consumer of their subscription comes, goes or takes its place
(PROTOCOL.md, "Consuming" and "Delivery semantics"), against a real broker over raw frames."""
import signal
import time

import pytest

from actorbroker.transport.client import Client
from tests.util import ClientProcess, consumers_of, wait_for
from tests.wire import RawConnection


def raw(broker):
    conn = RawConnection(*broker.address)
    conn.hello()
    return conn


def subscribe(conn, topic, sub, sub_type, name, credits=0, **extra):
    reply = conn.request(dict({"op": "subscribe", "topic": topic, "subscription": sub, "type": sub_type,
                               "consumer": name}, **extra))
    assert reply["op"] == "subscribed", reply
    if credits:
        conn.send_frame({"op": "flow", "consumer": reply["consumer"], "credits": credits})
    return reply["consumer"]


def pushes(conn, until, timeout=10.0):
    """(op, consumer, ...) of the pushes read until `until(list so far)` holds."""
    got, deadline = [], time.monotonic() + timeout
    while not until(got):
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {got}")
        frame = conn.recv_frame(max(0.01, deadline - time.monotonic()))
        assert frame is not None, f"closed after {got}"
        if frame["op"] == "ping":
            conn.send_frame({"op": "pong", "rid": frame["rid"]})
        elif frame["op"] == "message":
            got += [("message", frame["consumer"], m["id"], m.get("key"), m["redeliveries"]) for m in frame["msgs"]]
        elif frame["op"] == "active":
            got.append(("active", frame["consumer"], frame["active"]))
        elif frame["op"] == "closed":
            got.append(("closed", frame["consumer"], frame["reason"]))
    return got


def messages(got):
    return [g for g in got if g[0] == "message"]


def publish_and_hold(client, topic, conn, count):
    """`count` messages published; the ids of those `conn`'s consumer (with that many credits) got."""
    producer = client.producer(topic)
    for _ in range(count):
        producer.send(b"m")
    producer.flush()
    return [m[2] for m in messages(pushes(conn, lambda g: len(messages(g)) >= count))]


def sub_stats(client, topic, name="s"):
    return next(s for s in client.stats(topic)["subscriptions"] if s["name"] == name)


@pytest.mark.parametrize("how", ["close_consumer", "socket", "replaced"])
def test_key_shared_messages_waiting_for_a_leavers_credits_go_to_the_next_owners(broker, topic, how):
    """non_reliable key_shared: c has no credits, so its keys' messages wait in the backlog (none
    was sent to it). When c goes (or a new c takes its place) they are delivered, not dropped."""
    a, c = raw(broker), raw(broker)
    subscribe(a, topic, "s", "key_shared", "a", credits=1000)
    c_id = subscribe(c, topic, "s", "key_shared", "c")
    with Client(*broker.address) as client:
        producer = client.producer(topic)
        for i in range(40):
            producer.send(b"m", key=f"k{i}")
        producer.flush()
        waiting = wait_for(lambda: sub_stats(client, topic), lambda s: s["backlog"] + s["msgs_out"] == 40)
        backlog = waiting["backlog"]
        assert 0 < backlog < 40 and waiting["dropped"] == 0, waiting
        got = messages(pushes(a, lambda g: len(messages(g)) >= 40 - backlog))
        if how == "close_consumer":
            c.request({"op": "close_consumer", "consumer": c_id})
        elif how == "socket":
            c.close()
        else:   # the same name on another connection (c's stays open): c's keys are its keys
            taker = raw(broker)
            subscribe(taker, topic, "s", "key_shared", "c", credits=1000)
            assert pushes(c, lambda g: g) == [("closed", c_id, "replaced")]
        got += messages(pushes(a if how != "replaced" else taker, lambda g: len(messages(g)) >= backlog))
        assert sorted(m[2] for m in got) == list(range(40))   # every one, once
        final = wait_for(lambda: sub_stats(client, topic), lambda s: s["msgs_out"] == 40)
        assert final["backlog"] == 0 and final["dropped"] == 0, final


def test_failover_the_next_consumer_is_told_it_is_active_before_it_gets_messages(broker, topic):
    """close_consumer of the active one (its connection stays open): the standby's `active`
    push comes ahead of the messages that then go to it, non_reliable and reliable alike."""
    for dispatch in ("non_reliable", "reliable"):
        name = f"{topic}-{dispatch}"
        a, b = raw(broker), raw(broker)
        a_id = subscribe(a, name, "s", "failover", "a", dispatch=dispatch)     # active, no credits
        b_id = subscribe(b, name, "s", "failover", "b", credits=100, dispatch=dispatch)
        assert pushes(b, lambda g: g) == [("active", b_id, False)]
        with Client(*broker.address) as client:
            producer = client.producer(name)
            for i in range(5):
                producer.send(b"m")
            producer.flush()
            wait_for(lambda: sub_stats(client, name), lambda s: s["backlog"] == 5)
            a.request({"op": "close_consumer", "consumer": a_id})
            got = pushes(b, lambda g: len(messages(g)) >= 5)
            assert got[0] == ("active", b_id, True), (dispatch, got)
            # a message sent after the takeover as well
            producer.send_sync(b"after")
            assert [g[0] for g in pushes(b, lambda g: messages(g))] == ["message"]
        a.close()
        b.close()


def test_failover_after_kill_9_of_the_active_consumer_active_comes_before_messages(broker, topic):
    with Client(*broker.address) as client:
        held = ClientProcess(broker, topic, "s", "failover", "a", hold=True)   # active
        try:
            b = raw(broker)
            b_id = subscribe(b, topic, "s", "failover", "b", credits=100)
            assert pushes(b, lambda g: g) == [("active", b_id, False)]
            producer = client.producer(topic)
            for i in range(3):
                producer.send(b"m")
            producer.flush()
            wait_for(lambda: consumers_of(client.stats(topic), "s"), lambda cs: sum(c["msgs_out"] for c in cs) == 3)
            held.proc.send_signal(signal.SIGKILL)
            producer.send_sync(b"after")
            got = pushes(b, lambda g: messages(g))
            assert got[0] == ("active", b_id, True), got
        finally:
            held.stop()


def test_a_replaced_shared_consumers_unacked_messages_go_to_the_one_that_takes_its_place(broker, topic):
    """reliable shared: `a` holds three unacked; `c` has plenty of credits; a subscribe named `a`
    on another connection takes a's place: the three go to it, not to c."""
    a, c = raw(broker), raw(broker)
    a_id = subscribe(a, topic, "s", "shared", "a", credits=3, dispatch="reliable")
    with Client(*broker.address) as client:
        held = publish_and_hold(client, topic, a, 3)
        c_id = subscribe(c, topic, "s", "shared", "c", credits=100)
        a2 = raw(broker)
        a2_id = subscribe(a2, topic, "s", "shared", "a", credits=10)
        assert pushes(a, lambda g: g) == [("closed", a_id, "replaced")]
        got = messages(pushes(a2, lambda g: len(messages(g)) >= 3))
        assert [(m[1], m[2], m[4]) for m in got] == [(a2_id, i, 1) for i in held]
        # (only those three exist: c, with its 100 credits, had none of them)
        assert [x["msgs_out"] for x in consumers_of(client.stats(topic), "s") if x["consumer"] == c_id] == [0]


def test_stats_redelivered_counts_messages_sent_again(broker, topic):
    """a holds three and closes; one of them is acked (by another consumer: acks are for the
    subscription) while they wait; the two sent again are what `redelivered` counts."""
    a, b = raw(broker), raw(broker)
    a_id = subscribe(a, topic, "s", "shared", "a", credits=3, dispatch="reliable")
    b_id = subscribe(b, topic, "s", "shared", "b", dispatch="reliable")   # no credits yet
    with Client(*broker.address) as client:
        held = publish_and_hold(client, topic, a, 3)
        a.request({"op": "close_consumer", "consumer": a_id})
        b.request({"op": "ack", "consumer": b_id, "ids": [held[0]]})
        b.send_frame({"op": "flow", "consumer": b_id, "credits": 10})
        got = messages(pushes(b, lambda g: len(messages(g)) >= 2))
        assert [(m[2], m[4]) for m in got] == [(held[1], 1), (held[2], 1)]
        assert wait_for(lambda: sub_stats(client, topic), lambda s: s["msgs_out"] == 5)["redelivered"] == 2
