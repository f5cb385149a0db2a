"""The heart of the broker: consumers that go away, by any means, are cleaned up at once, and the
next message goes to a live consumer (no "two-packet" delay, no race on reconnect)."""
import signal
import socket
import struct

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


def test_closing_a_consumer_returns_to_a_clean_subscription(broker, client, topic):
    consumer = client.subscribe(topic, "s", "shared", "c1")
    consumer.close()
    # non_reliable: a subscription without consumers is removed with its backlog
    wait_for(lambda: client.stats(topic), lambda s: s["subscriptions"] == [])
