"""Deliveries and --max-pending-bytes (docs/protocol.md, "SLOW_CONSUMER"): a consumer that granted
large credits and stops reading holds up its deliveries only; it is never closed with
SLOW_CONSUMER for what its credits allowed, however large the messages, and once it reads again
it gets all of them, in order. Against a real broker over TCP with a 2 MiB bound."""
import socket

import pytest

from actorbroker.transport.client import Client
from tests.util import wait_for
from tests.wire import RawConnection

MAX_PENDING = 2 * 1024 * 1024
SIZE = 64 * 1024


def payload(i):
    return i.to_bytes(4, "big") + b"x" * (SIZE - 4)


def subscription_of(client, topic, name):
    return next((s for s in client.stats(topic)["subscriptions"] if s["name"] == name), None)


def read_messages(conn, wanted):
    """{consumer id: [payload, ...]} until `wanted` (consumer id -> count) have come; fails on an
    error frame or a close."""
    got = {consumer: [] for consumer in wanted}
    while any(len(got[c]) < n for c, n in wanted.items()):
        frame = conn.recv_frame(timeout=30)
        assert frame is not None, "closed by the broker"
        assert frame["op"] != "error", frame
        if frame["op"] == "message":
            got[frame["consumer"]] += [m["payload"] for m in frame["msgs"]]
        elif frame["op"] == "ping":
            conn.send_frame({"op": "pong", "rid": frame["rid"]})
    return got


def produce_waiting(client, topic, count, dispatch, names=("s",)):
    """`count` messages sent and waiting in each subscription of `names` (its backlog)."""
    producer = client.producer(topic, dispatch=dispatch)
    for i in range(count):
        producer.send(payload(i))
    producer.flush()
    for name in names:
        wait_for(lambda: subscription_of(client, topic, name), lambda sub: sub["backlog"] == count)


def not_reading_consumer(broker):
    conn = RawConnection(*broker.address, timeout=30)
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    conn.hello(heartbeat_ms=60000)
    return conn


@pytest.mark.parametrize("dispatch", ["non_reliable", "reliable"])
def test_large_credits_and_large_messages_do_not_cut_off_a_consumer_that_stops_reading(
        start_broker, topic, dispatch):
    """300 messages of 64 KiB (19 MiB) wait for a consumer that then grants 50,000 credits without
    reading: it is delivered to no faster than it reads, and gets all 300 in order."""
    b = start_broker("--max-pending-bytes", str(MAX_PENDING))
    conn = not_reading_consumer(b)
    consumer = conn.request({"op": "subscribe", "topic": topic, "subscription": "s", "type": "exclusive",
                             "consumer": "c", "dispatch": dispatch})["consumer"]
    count = 300
    with Client(*b.address) as client:
        produce_waiting(client, topic, count, dispatch)
        conn.send_frame({"op": "flow", "consumer": consumer, "credits": 50_000})
        # the dispatcher has handed deliveries to the connection's shard (before: all 300 at once,
        # which closed the connection)
        wait_for(lambda: subscription_of(client, topic, "s"),
                 lambda sub: sub is None or not sub["consumers"] or sub["consumers"][0]["msgs_out"] > 0)
        got = read_messages(conn, {consumer: count})[consumer]
        assert got == [payload(i) for i in range(count)]
        assert subscription_of(client, topic, "s")["consumers"][0]["msgs_out"] == count
    conn.close()


def test_several_consumers_of_one_connection_that_stops_reading_are_not_cut_off(start_broker, topic):
    """Eight consumers on one connection, each granting large credits for 100 messages of 64 KiB
    waiting for it (50 MiB in all), the connection not reading: deliveries wait in the broker, and
    each consumer gets its 100 in order once it reads."""
    b = start_broker("--max-pending-bytes", str(MAX_PENDING))
    conn = not_reading_consumer(b)
    names = [f"s{i}" for i in range(8)]
    consumers = {name: conn.request({"op": "subscribe", "topic": topic, "subscription": name,
                                     "type": "exclusive", "consumer": name, "dispatch": "reliable"})["consumer"]
                 for name in names}
    count = 100
    with Client(*b.address) as client:
        produce_waiting(client, topic, count, "reliable", names)
        for consumer in consumers.values():
            conn.send_frame({"op": "flow", "consumer": consumer, "credits": 50_000})
        wait_for(lambda: client.stats(topic)["subscriptions"],
                 lambda subs: all(not s["consumers"] or s["consumers"][0]["msgs_out"] > 0 for s in subs))
        got = read_messages(conn, {consumer: count for consumer in consumers.values()})
        for consumer in consumers.values():
            assert got[consumer] == [payload(i) for i in range(count)]
    conn.close()


@pytest.mark.parametrize("sub_type", ["shared", "key_shared"])
def test_a_reliable_shared_consumer_that_stops_reading_counts_only_what_was_sent_as_unacked(
        start_broker, topic, sub_type):
    """What a shared or key_shared subscription has given a consumer's credit but not yet sent
    (held back: the connection does not read) is backlog in `stats`, not unacked (docs/protocol.md:
    `unacked` counts the messages out with that consumer); they used to be counted as both."""
    b = start_broker("--max-pending-bytes", str(MAX_PENDING))
    conn = not_reading_consumer(b)
    consumer = conn.request({"op": "subscribe", "topic": topic, "subscription": "s", "type": sub_type,
                             "consumer": "c", "dispatch": "reliable"})["consumer"]
    count = 200
    with Client(*b.address) as client:
        produce_waiting(client, topic, count, "reliable")
        conn.send_frame({"op": "flow", "consumer": consumer, "credits": 50_000})
        settled = wait_for(lambda: subscription_of(client, topic, "s"),
                           lambda sub: sub["consumers"] and 0 < sub["consumers"][0]["msgs_out"] < count)
        sent = settled["consumers"][0]
        assert sent["unacked"] == sent["msgs_out"], sent
        assert settled["backlog"] + sent["unacked"] == count, settled
        got = read_messages(conn, {consumer: count})[consumer]
        assert got == [payload(i) for i in range(count)]
    conn.close()


@pytest.mark.parametrize("client_kind", ["sync", "async"])
def test_a_producer_held_back_while_its_topic_stalls_keeps_its_connection(start_broker, topic, client_kind):
    """kill -STOP of a reliable topic's process for 1.5 s (a stalled disk or process) under a
    producer writing 32 KB messages as fast as it may, heartbeats of 200 ms: the shard stopped
    reading the connection (backpressure: 32 MB waiting for the topic), then closed it for
    "heartbeat timeout (0.4s silent)", and the clients declared the broker lost ("read too
    little for 400 ms"): neither side was silent, the broker was busy. The broker now pings a
    connection it holds back, and a client whose bytes wait goes on while the broker talks."""
    import asyncio
    import os
    import signal
    import threading
    from actorbroker.transport.client import AsyncClient
    from tests.util import processes_of_kind
    b = start_broker()
    data = b"x" * 32_000
    n = 2500   # 80 MB: past the 32 MB at which the shard stops reading, and the kernel buffers

    def stalled_topic():
        (pid,) = wait_for(lambda: processes_of_kind(b, "ab-topic"), lambda pids: len(pids) == 1)
        os.kill(pid, signal.SIGSTOP)
        timer = threading.Timer(1.5, os.kill, (pid, signal.SIGCONT))
        timer.start()
        return timer

    if client_kind == "sync":
        with Client(*b.address, heartbeat_ms=200) as client:
            producer = client.producer(topic, dispatch="reliable", max_pending=n)
            producer.send_sync(b"first")
            timer = stalled_topic()
            sent = [producer.send(data) for _ in range(n)]
            producer.flush(60)
            timer.join()
            assert [f.result(0) for f in sent] == list(range(1, n + 1))
            assert client.connected
        return

    async def scenario():
        client = await AsyncClient.connect(*b.address, heartbeat_ms=200)
        try:
            producer = await client.producer(topic, dispatch="reliable", max_pending=n)
            await producer.send_sync(b"first")
            timer = stalled_topic()
            sent = [await producer.send(data) for _ in range(n)]
            await producer.flush(60)
            timer.join()
            return [await f for f in sent]
        finally:
            await client.close(timeout=5)
    assert asyncio.run(asyncio.wait_for(scenario(), 90)) == list(range(1, n + 1))


def test_a_connection_held_back_is_read_again_when_its_topic_dies(start_broker, topic):
    """A producer held back (its topic stopped, 32 KB sends flooding) whose topic is then killed
    -9: the sends it had sent were answered INTERNAL, and the connection, whose waiting sends had
    been refused, was never read again: the rest of its sends were never answered (regression
    probe, 5 of 5; before the broker pinged a held-back connection it was cut for silence). Every
    send is answered, and the connection goes on."""
    import os
    import signal
    import threading
    from tests.util import processes_of_kind
    b = start_broker()
    conn = RawConnection(*b.address)
    conn.hello(heartbeat_ms=1000)
    before = set(processes_of_kind(b, "ab-topic"))
    producer_id = conn.request({"op": "producer", "topic": topic})["producer"]
    (topic_pid,) = wait_for(lambda: set(processes_of_kind(b, "ab-topic")) - before, lambda new: len(new) == 1)
    os.kill(topic_pid, signal.SIGSTOP)
    try:
        n, payload = 3000, b"p" * 32_000   # 96 MB: far past the 32 MB at which the shard stops reading
        rids = list(range(10_000, 10_000 + n))
        flood = threading.Thread(target=lambda: [conn.send_frame(
            {"op": "send", "rid": rid, "producer": producer_id, "msgs": [{"payload": payload}]}) for rid in rids],
            daemon=True)
        flood.start()
        # held back: only then does the broker ping a client that writes all the time
        frame = conn.recv_frame(timeout=30)
        while frame is not None and frame["op"] != "ping":
            frame = conn.recv_frame(timeout=30)
        assert frame is not None   # (no pong: the flood writes on this socket; any byte is life)
        os.kill(topic_pid, signal.SIGKILL)
    finally:
        os.kill(topic_pid, signal.SIGCONT)
    answered = {}
    while len(answered) < n:
        frame = conn.recv_frame(timeout=30)
        assert frame is not None, f"connection closed; {n - len(answered)} sends unanswered"
        if frame.get("rid") in answered:
            raise AssertionError(f"answered twice: {frame}")
        elif frame["op"] != "ping" and isinstance(frame.get("rid"), int) and frame["rid"] >= 10_000:
            answered[frame["rid"]] = frame.get("code", frame["op"])
    flood.join(10)
    assert not flood.is_alive()
    assert set(answered.values()) <= {"receipt", "INTERNAL", "UNKNOWN_PRODUCER"}, set(answered.values())
    assert conn.request({"op": "ping"})["op"] == "pong"
