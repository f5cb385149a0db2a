"""The heart of the broker: consumers that go away, by any means, are cleaned up at once, and the
next message goes to a live consumer (no "two-packet" delay, no race on reconnect)."""
import signal
import socket
import struct
import time

import pytest

from actorbroker.transport.client import Client
from actorbroker.transport.errors import ConsumerBusy
from tests.util import ClientProcess, consumers_of, wait_for
from tests.wire import RawConnection


@pytest.fixture
def client(broker):
    c = Client(*broker.address)
    yield c
    c.close()


def wait_active(consumer, timeout=10):
    wait_for(lambda: consumer.active, lambda a: a is True, timeout=timeout)


def test_reconnect_with_same_name_takes_over_while_old_connection_is_open(broker, client, topic):
    old_client = Client(*broker.address)
    old = old_client.subscribe(topic, "sub", "exclusive", "worker")
    new = client.subscribe(topic, "sub", "exclusive", "worker")      # the old one is still connected
    wait_for(lambda: old.closed_reason, lambda r: r == "replaced")
    producer = client.producer(topic)
    offset = producer.send_sync(b"after takeover")
    msg = new.receive(timeout=10)
    assert (msg.id, msg.payload) == (offset, b"after takeover")
    old_client.close()
    assert [c["name"] for c in consumers_of(client.stats(topic), "sub")] == ["worker"]


def test_first_message_after_a_disconnect_goes_to_a_live_consumer_shared(broker, client, topic):
    gone_client = Client(*broker.address)
    gone_client.subscribe(topic, "sub", "shared", "gone")
    live = client.subscribe(topic, "sub", "shared", "live")
    gone_client.close()
    wait_for(lambda: client.stats(topic), lambda s: len(consumers_of(s, "sub")) == 1)
    producer = client.producer(topic)
    offsets = [producer.send(f"m{i}".encode()) for i in range(3)]
    producer.flush()
    got = [live.receive(timeout=10).id for _ in range(3)]
    assert got == [f.result(5) for f in offsets]   # every one, the first included, reached `live`


def test_failover_standby_takes_over_when_active_closes(broker, client, topic):
    active_client = Client(*broker.address)
    first = active_client.subscribe(topic, "fo", "failover", "a-first")
    second = client.subscribe(topic, "fo", "failover", "b-second")
    wait_for(lambda: (first.active, second.active), lambda s: s == (True, False))
    producer = client.producer(topic)
    producer.send_sync(b"to first")
    assert first.receive(timeout=10).payload == b"to first"
    active_client.close()
    wait_active(second)                               # pushed by the broker, no poll of stats
    producer.send_sync(b"to second")
    assert second.receive(timeout=10).payload == b"to second"


def test_failover_old_active_returns_and_is_active_again(broker, client, topic):
    second = client.subscribe(topic, "fo", "failover", "b")
    wait_active(second)
    returning = Client(*broker.address)
    first = returning.subscribe(topic, "fo", "failover", "a")   # first by name: takes over
    wait_for(lambda: (first.active, second.active), lambda s: s == (True, False))
    producer = client.producer(topic)
    producer.send_sync(b"x")
    assert first.receive(timeout=10).payload == b"x"
    returning.close()


def test_kill_9_of_a_consumer_process_promotes_the_standby(broker, client, topic):
    proc = ClientProcess(broker, topic, "fo", "failover", "a-proc")
    try:
        standby = client.subscribe(topic, "fo", "failover", "b-standby")
        wait_for(lambda: standby.active, lambda a: a is False)
        proc.proc.send_signal(signal.SIGKILL)
        wait_active(standby)
        producer = client.producer(topic)
        offset = producer.send_sync(b"next")
        assert standby.receive(timeout=10).id == offset
    finally:
        proc.stop()


def test_frozen_client_is_closed_after_two_heartbeats_and_standby_promoted(broker, client, topic):
    proc = ClientProcess(broker, topic, "fo", "failover", "a-frozen", heartbeat_ms=300)
    try:
        standby = client.subscribe(topic, "fo", "failover", "b-standby")
        wait_for(lambda: standby.active, lambda a: a is False)
        proc.proc.send_signal(signal.SIGSTOP)      # socket open, nobody answers: half-open
        wait_active(standby, timeout=10)
        producer = client.producer(topic)
        offset = producer.send_sync(b"next")
        assert standby.receive(timeout=10).id == offset
    finally:
        proc.proc.send_signal(signal.SIGCONT)
        proc.stop()


def test_exclusive_handover_to_a_new_name_after_the_holder_dies(broker, client, topic):
    proc = ClientProcess(broker, topic, "ex", "exclusive", "holder")
    try:
        with pytest.raises(ConsumerBusy):
            client.subscribe(topic, "ex", "exclusive", "newcomer")
        proc.proc.send_signal(signal.SIGKILL)
        wait_for(lambda: client.stats(topic), lambda s: not consumers_of(s, "ex"))
        newcomer = client.subscribe(topic, "ex", "exclusive", "newcomer")
        producer = client.producer(topic)
        offset = producer.send_sync(b"for the newcomer")
        assert newcomer.receive(timeout=10).id == offset
    finally:
        proc.stop()


@pytest.mark.parametrize("dispatch", ["non_reliable", "reliable"])
def test_an_exclusive_newcomer_gets_in_at_once_after_the_holder_closed_its_socket(broker, topic, dispatch):
    # The holder's socket is closed (FIN, reset, or its process killed and reaped) before the
    # newcomer subscribes: no retry may be needed, however late the holder's shard reads the EOF
    # (PROTOCOL.md: the broker cleans up a closed connection's consumers immediately).
    newcomer = RawConnection(*broker.address)
    newcomer.hello()
    frame = {"op": "subscribe", "topic": topic, "subscription": "ex", "type": "exclusive", "dispatch": dispatch}
    for i in range(60):
        how = ("fin", "reset", "kill")[i % 3]
        if how == "kill":
            holder = ClientProcess(broker, topic, "ex", "exclusive", f"holder{i}")
            holder.stop()   # SIGKILL, then reaped: its socket is closed
        else:
            conn = RawConnection(*broker.address)
            conn.hello()
            assert conn.request(dict(frame, consumer=f"holder{i}"))["op"] == "subscribed"
            if how == "reset":
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.sock.close()
        reply = newcomer.request(dict(frame, consumer=f"newcomer{i}"), expect_error=True)
        assert reply["op"] == "subscribed", (i, how, reply)
        assert newcomer.request({"op": "close_consumer", "consumer": reply["consumer"]})["op"] == "ok"
    # a holder that is there is still one
    holder = RawConnection(*broker.address)
    holder.hello()
    assert holder.request(dict(frame, consumer="holder"))["op"] == "subscribed"
    assert newcomer.request(dict(frame, consumer="other"), expect_error=True)["code"] == "CONSUMER_BUSY"


@pytest.mark.parametrize("dispatch", ["non_reliable", "reliable"])
def test_an_exclusive_newcomer_gets_in_after_a_holder_that_hung_up_before_its_answer(broker, topic, dispatch):
    # The holder sends `subscribe` and hangs up before `subscribed` comes back: the broker
    # attaches it, then detaches it when the answer finds the connection gone. A newcomer that
    # comes in between must not be refused for a client that is no longer there (its
    # ConnectionActor had not routed it in the shard yet; the shard used to answer "up").
    newcomer = RawConnection(*broker.address)
    newcomer.hello()
    frame = {"op": "subscribe", "topic": topic, "subscription": "ex", "type": "exclusive", "dispatch": dispatch}
    for i in range(40):
        conn = RawConnection(*broker.address)
        conn.hello()
        conn.send_frame(dict(frame, consumer=f"holder{i}", rid=2))
        time.sleep((0, 0.001, 0.003, 0.01)[i % 4])   # hang up at varied points of the subscribe's way
        conn.sock.close()
        reply = newcomer.request(dict(frame, consumer=f"newcomer{i}"), expect_error=True)
        assert reply["op"] == "subscribed", (i, reply)
        assert newcomer.request({"op": "close_consumer", "consumer": reply["consumer"]})["op"] == "ok"


def test_closing_a_consumer_returns_to_a_clean_subscription(broker, client, topic):
    consumer = client.subscribe(topic, "s", "shared", "c1")
    consumer.close()
    # non_reliable: a subscription without consumers is removed with its backlog
    wait_for(lambda: client.stats(topic), lambda s: s["subscriptions"] == [])


@pytest.mark.parametrize("sub_type", ["shared", "key_shared"])
def test_records_held_for_a_gone_consumer_never_reach_another_after_newer_ones(broker, topic, sub_type):
    """non_reliable: a consumer with credits that does not read gets records routed to it that the
    broker cannot write yet. When it goes, they went to the other consumer ahead of what came
    next, after it had had newer ones (ids 1207, then 1022...). docs/protocol.md: they are dropped
    and counted instead, so that no consumer sees ids go backwards."""
    import threading
    pub = RawConnection(*broker.address)
    pub.hello()
    producer_id = pub.request({"op": "producer", "topic": topic})["producer"]
    slow = RawConnection(*broker.address)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.hello(heartbeat_ms=60_000)
    slow_id = slow.request({"op": "subscribe", "topic": topic, "subscription": "s", "type": sub_type,
                            "consumer": "slow"})["consumer"]
    slow.send_frame({"op": "flow", "consumer": slow_id, "credits": 100_000})
    fast = RawConnection(*broker.address)
    fast.hello(heartbeat_ms=60_000)
    fast_id = fast.request({"op": "subscribe", "topic": topic, "subscription": "s", "type": sub_type,
                            "consumer": "fast"})["consumer"]
    fast.send_frame({"op": "flow", "consumer": fast_id, "credits": 100_000})
    ids = []

    def read():
        while True:
            try:
                frame = fast.recv_frame(timeout=60)
            except (TimeoutError, OSError):   # the test closed it, or is over
                return
            if frame is None:
                return
            if frame["op"] == "message":
                ids.extend(m["id"] for m in frame["msgs"])
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    payload = b"x" * 10_000

    receipts = 0
    for i in range(1500):   # a steady stream: records keep being routed to the slow one too
        key = f"k{i % 50}" if sub_type == "key_shared" else None
        pub.send_frame({"op": "send", "rid": 1_000_000 + i, "producer": producer_id,
                        "msgs": [dict({"payload": payload}, **({"key": key} if key else {}))]})
        time.sleep(0.001)   # pacing the producer, not waiting for anything
        if i == 1200:   # the slow consumer's process ends: reset, as a client killed with unread data
            slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            slow.sock.close()
    while receipts < 1500:
        assert pub.recv_frame(timeout=30)["op"] == "receipt"
        receipts += 1
    end = pub.request({"op": "send", "producer": producer_id, "msgs": [
        {"payload": b"end", "key": "k0"} if sub_type == "key_shared" else {"payload": b"end"}]})["first"]
    wait_for(lambda: end in ids, bool, timeout=30, interval=0.05)   # the last one sent reaches it
    backwards = [(a, b) for a, b in zip(ids, ids[1:]) if b <= a]
    fast.sock.shutdown(socket.SHUT_RDWR)   # the reader sees the end (a close alone would not wake it)
    reader.join(timeout=10)
    fast.close()
    assert not backwards, f"ids went backwards: {backwards[:3]}"
