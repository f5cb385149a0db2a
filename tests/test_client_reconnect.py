"""The Python clients' automatic reconnect: seed addresses, backoff, producers reopened and
consumers subscribed again under their names, against real brokers killed and restarted."""
import asyncio
import socket
import threading

import pytest

from actorbroker.transport.client import AsyncClient, Client
from actorbroker.transport.client.core import Reconnect
from actorbroker.transport.errors import ConnectionLost
from tests.util import wait_for


def restart(start_broker, broker, data_dir):
    """kill -9 of every broker process, then a broker on the same data and port."""
    broker.kill_all()
    broker.stderr.close()
    broker.proc.stdout.close()
    return start_broker("--default-dispatch", "reliable", "--port", str(broker.port), data_dir=data_dir)


# --- the schedule (sans-IO) --------------------------------------------------------------------

def test_reconnect_tries_the_seeds_in_turn_with_doubling_waits_then_gives_up():
    plan = Reconnect([("a", 1), ("b", 2)], initial=0.1, maximum=0.3, give_up_after=10)
    plan.start(100.0)
    steps = [plan.next_attempt(100.0) for _ in range(7)]
    assert [address for address, _ in steps] == [("a", 1), ("b", 2)] * 3 + [("a", 1)]
    assert [delay for _, delay in steps] == [0.0, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3]
    assert plan.next_attempt(109.9)[1] == pytest.approx(0.1)   # never waits past the give-up time
    assert plan.next_attempt(110.0) is None
    plan.start(200.0)                                          # a new loss starts afresh
    assert plan.next_attempt(200.0) == (("a", 1), 0.0)


# --- the threaded client -----------------------------------------------------------------------

def test_sync_client_reconnects_across_a_broker_restart_and_loses_nothing_reliable(start_broker, topic, tmp_path):
    data = tmp_path / "data"
    broker = start_broker("--default-dispatch", "reliable", data_dir=data)
    reconnected = threading.Event()
    client = Client(broker.host, broker.port, reconnect=Reconnect([broker.address], give_up_after=30),
                    on_reconnect=lambda c: reconnected.set())
    with client:
        consumer = client.subscribe(topic, "durable", "shared", "worker")
        producer = client.producer(topic)
        for i in range(6):
            producer.send(f"m{i}")
        producer.flush()
        got = [consumer.receive(10) for _ in range(6)]
        consumer.ack(got[:3], sync=True)
        broker = restart(start_broker, broker, data)
        assert reconnected.wait(30)
        again = [consumer.receive(10) for _ in range(3)]
        assert [m.payload for m in again] == [b"m3", b"m4", b"m5"]     # the unacknowledged only
        producer.send("after")
        producer.flush(10)
        assert consumer.receive(10).payload == b"after"                # the same producer and consumer
        assert client.connected
        stats = client.stats(topic)
        assert [c["name"] for c in stats["subscriptions"][0]["consumers"]] == ["worker"]


def test_sync_client_reconnects_to_the_next_seed_address(start_broker, topic):
    first, second = start_broker(), start_broker()
    reconnected = threading.Event()
    seeds = Reconnect([first.address, second.address], initial=0.05, give_up_after=30)
    with Client(first.host, first.port, reconnect=seeds, on_reconnect=lambda c: reconnected.set()) as client:
        consumer = client.subscribe(topic, "s", "failover", "only")
        producer = client.producer(topic)
        first.stop()
        assert reconnected.wait(30)
        producer.send("on the second broker")
        producer.flush(10)
        assert consumer.receive(10).payload == b"on the second broker"
    with Client(*second.address) as admin:
        assert admin.topics()[0]["name"] == topic


def _refused_address():
    """A loopback address where nothing listens (a port just bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()


def test_the_first_connect_tries_the_other_seed_addresses_too(start_broker, topic):
    # As NATS's clients: the seed list serves the first connect, not only reconnects.
    broker = start_broker()
    down = _refused_address()
    with Client(*down, reconnect=Reconnect([down, broker.address])) as client:
        assert client.ping(timeout=5) is not None
        assert client.topics() == []

    async def main():
        client = await AsyncClient.connect(*down, reconnect=Reconnect([down, broker.address]))
        try:
            await client.producer(topic)
            return [t["name"] for t in await client.topics()]
        finally:
            await client.close()
    assert asyncio.run(main()) == [topic]
    with pytest.raises(ConnectionRefusedError):   # none answers: the first address's error
        Client(*down, reconnect=Reconnect([down, _refused_address()]))


class _FakeSeed:
    """A listening socket that takes every connection and, to each hello, does `answer`: "silent"
    (nothing), "overloaded" (the OVERLOADED error of a broker at max_connections, then closes),
    "http" (an HTTP server's answer: no broker) or "auth" (AUTH_FAILED for the hello, then closes)."""

    def __init__(self, answer):
        from actorbroker.transport.codec import FrameDecoder, encode_frame
        self.answer, self._encode, self._decoder = answer, encode_frame, FrameDecoder
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.accepted = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        decoder = self._decoder()
        frame = None
        while frame is None:
            data = conn.recv(65536)
            if not data:
                return
            decoder.feed(data)
            frame = decoder.next_frame()
        if self.answer == "overloaded":
            conn.sendall(self._encode({"op": "error", "code": "OVERLOADED", "message": "too many connections"}))
            conn.close()
        elif self.answer == "http":   # no broker at all
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            conn.close()
        elif self.answer == "auth":
            conn.sendall(self._encode({"op": "error", "code": "AUTH_FAILED", "message": "bad token",
                                       "rid": frame["rid"]}))
            conn.close()

    def close(self):
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.mark.parametrize("answer", ["silent", "overloaded", "http"])
def test_the_first_connect_passes_over_a_seed_that_does_not_answer_hello(start_broker, topic, answer):
    """A first seed that took the TCP connection but hung up, timed out or was OVERLOADED during
    hello ended the first connect, with another seed up: it moves on to the next now."""
    broker = start_broker()
    fake = _FakeSeed(answer)
    try:
        seeds = Reconnect([fake.address, broker.address])
        with Client(*fake.address, reconnect=seeds, connect_timeout=1) as client:
            assert client.topics() == []
        assert fake.accepted, "the first seed was not tried"

        async def main():
            client = await AsyncClient.connect(*fake.address, reconnect=seeds, connect_timeout=1)
            try:
                await client.producer(topic)
                return [t["name"] for t in await client.topics()]
            finally:
                await client.close()
        assert asyncio.run(main()) == [topic]
    finally:
        fake.close()


def test_the_first_connect_stops_at_a_refusal_every_broker_would_repeat(start_broker):
    from actorbroker.transport.errors import BrokerError
    broker = start_broker()
    fake = _FakeSeed("auth")
    try:
        with pytest.raises(BrokerError) as raised:
            Client(*fake.address, reconnect=Reconnect([fake.address, broker.address]), connect_timeout=5)
        assert raised.value.code == "AUTH_FAILED"
    finally:
        fake.close()


def test_sync_client_gives_up_and_ends_its_consumers(start_broker, topic):
    broker = start_broker()
    client = Client(broker.host, broker.port, reconnect=Reconnect([broker.address], give_up_after=0.5))
    consumer = client.subscribe(topic, "s", "shared", "c")
    broker.stop()
    assert client.wait_closed(30)
    with pytest.raises(ConnectionLost):
        consumer.receive(10)
    client.close()


def test_sends_made_while_reconnecting_fail_when_the_client_gives_up(start_broker, topic):
    """They waited for the producer to be back; it never is: they end as lost (they hung)."""
    broker = start_broker()
    client = Client(broker.host, broker.port, reconnect=Reconnect([broker.address], give_up_after=3))
    producer = client.producer(topic)
    producer.send(b"before").result(10)
    broker.stop()
    wait_for(lambda: client.connected, lambda connected: not connected)
    waiting = producer.send(b"while reconnecting")
    assert client.wait_closed(30)
    with pytest.raises(ConnectionLost):
        waiting.result(5)
    with pytest.raises(ConnectionLost):
        producer.flush(5)
    client.close()


# --- the asyncio client ------------------------------------------------------------------------

def test_async_sends_made_while_reconnecting_fail_when_the_client_gives_up(start_broker, topic):
    broker = start_broker()

    async def scenario():
        client = await AsyncClient.connect(broker.host, broker.port,
                                           reconnect=Reconnect([broker.address], give_up_after=3))
        producer = await client.producer(topic)
        await (await producer.send(b"before"))
        await asyncio.to_thread(broker.stop)
        while client.connected:
            await asyncio.sleep(0.01)   # polling a state the client offers no event for
        waiting = await producer.send(b"while reconnecting")
        await asyncio.wait_for(client.wait_closed(), 30)
        with pytest.raises(ConnectionLost):
            await waiting.result(5)
        await client.close()
    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_async_client_reconnects_across_a_broker_restart(start_broker, topic, tmp_path):
    data = tmp_path / "data"
    broker = start_broker("--default-dispatch", "reliable", data_dir=data)

    async def scenario():
        reconnected = asyncio.Event()
        client = await AsyncClient.connect(broker.host, broker.port, on_reconnect=lambda c: reconnected.set(),
                                           reconnect=Reconnect([broker.address], give_up_after=30))
        async with client:
            consumer = await client.subscribe(topic, "durable", "shared", "worker")
            producer = await client.producer(topic)
            for i in range(4):
                await producer.send(f"m{i}")
            await producer.flush()
            got = [await consumer.receive(10) for _ in range(4)]
            await consumer.ack(got[:2], sync=True)
            await asyncio.to_thread(restart, start_broker, broker, data)
            await asyncio.wait_for(reconnected.wait(), 30)
            again = [await consumer.receive(10) for _ in range(2)]
            assert [m.payload for m in again] == [b"m2", b"m3"]
            await producer.send("after")
            await producer.flush(10)
            assert (await consumer.receive(10)).payload == b"after"
    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_a_new_connection_starts_its_heartbeat_clock_afresh():
    from actorbroker.transport.client.core import ClientCore
    core = ClientCore("c")
    core.heartbeat_ms = 1000
    core.last_received = 0.0
    core.connection_lost(ConnectionLost("gone"), keep=True)
    core.restart(100.0)                       # reconnected long after the last frame of the old one
    ping, dead = core.heartbeat(100.5)
    assert dead is None and ping is None


# --- a broker that stops reading ------------------------------------------------------------------

@pytest.fixture
def frozen(start_broker):
    """A broker, and freeze() to SIGSTOP every process of it (a hung host); thawed at the end."""
    import os
    import signal
    broker = start_broker()
    stopped = []

    def freeze():
        stopped.extend(broker.processes())
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
    yield broker, freeze
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_a_sync_sender_blocked_on_a_broker_that_stopped_reading_gets_connection_lost(frozen, topic):
    """Its sendall once blocked for good, holding the lock the heartbeat's ping needed: the loss
    was never declared."""
    broker, freeze = frozen
    client = Client(broker.host, broker.port, heartbeat_ms=300)
    producer = client.producer(topic, max_batch=100)
    freeze()
    ended = []

    def flood():   # far more than the socket buffers hold
        try:
            for _ in range(20_000):
                producer.send(b"x" * 1024)
        except ConnectionLost as exc:
            ended.append(exc)
    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    sender.join(30)
    assert ended and not client.connected
    client.close(timeout=1)


def test_no_sync_send_blocks_longer_than_two_heartbeats_on_a_broker_that_stopped_reading(frozen, topic):
    """Messages large enough to fill the socket: a frozen broker's socket still takes a little now
    and then, and each bit restarted the wait of sendall (one send blocked 30 s with heartbeats of
    5 s), while the heartbeat's thread waited for the sender's lock and never declared the loss."""
    import time
    broker, freeze = frozen
    client = Client(broker.host, broker.port, heartbeat_ms=500)
    producer = client.producer(topic, max_pending=50, linger_ms=1)
    producer.send_sync(b"warm")
    consumer = client.subscribe(topic, "s", "shared", "r")
    received = []

    def receive():
        try:
            consumer.receive()
        except ConnectionLost as exc:
            received.append(time.monotonic())
    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    freeze()
    start = time.monotonic()
    longest = 0.0
    with pytest.raises(ConnectionLost):
        for _ in range(10_000):
            began = time.monotonic()
            try:
                producer.send(b"y" * 100_000)
            finally:
                longest = max(longest, time.monotonic() - began)
    ended = time.monotonic() - start
    receiver.join(10)
    # two heartbeats are 1 s; the old code took 3 s and more (each partial write waited 1 s anew)
    assert longest < 2.5 and ended < 2.5, (longest, ended)
    assert received and received[0] - start < 3.0
    client.close(timeout=1)


def test_an_async_send_waits_at_most_two_heartbeats_on_a_broker_that_stopped_reading(frozen, topic):
    """A send waiting in drain() ended only with the three-heartbeat silence rule (16 s with
    heartbeats of 5 s): the asyncio client checks its unwritten bytes as the threaded one does."""
    broker, freeze = frozen

    async def scenario():
        client = await AsyncClient.connect(broker.host, broker.port, heartbeat_ms=1000)
        producer = await client.producer(topic, max_pending=1000)
        await producer.send_sync(b"warm")
        freeze()
        with pytest.raises(ConnectionLost, match="read too little"):
            for _ in range(10_000):
                await producer.send(b"y" * 100_000)
        await client.close(timeout=1)
    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_an_async_sender_blocked_on_a_broker_that_stopped_reading_gets_connection_lost(frozen, topic):
    broker, freeze = frozen

    async def scenario():
        client = await AsyncClient.connect(broker.host, broker.port, heartbeat_ms=300)
        producer = await client.producer(topic, max_batch=100)
        freeze()
        with pytest.raises(ConnectionLost):
            for _ in range(20_000):
                await producer.send(b"x" * 1024)
        await client.close(timeout=1)
    asyncio.run(asyncio.wait_for(scenario(), 30))


# --- a network cut the broker has not seen yet ----------------------------------------------------

class CuttingProxy:
    """A TCP proxy to a broker; cut() closes the client side of every connection but leaves the
    broker side open and silent, as a network cut does: the broker finds the connection dead only
    by its heartbeat."""

    def __init__(self, target):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.pairs, self.kept = [], []     # (client side, broker side, cut event) / broker sides cut off
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return                                     # closed
            upstream = socket.create_connection(self.target)
            cut = threading.Event()
            with self.lock:
                self.pairs.append((client, upstream, cut))
            threading.Thread(target=self._pump, args=(client, upstream, cut), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, cut), daemon=True).start()

    @staticmethod
    def _pump(src, dst, cut):
        try:
            while (data := src.recv(65536)) and not cut.is_set():
                dst.sendall(data)
        except OSError:
            pass

    def cut(self):
        """The clients see their connection end; the broker sees nothing (its side stays open)."""
        with self.lock:
            pairs, self.pairs = self.pairs, []
            self.kept += [upstream for _, upstream, _ in pairs]
        for client, _, cut in pairs:
            cut.set()
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            client.close()

    def close(self):
        self.listener.close()
        with self.lock:
            for sock in [s for client, upstream, _ in self.pairs for s in (client, upstream)] + self.kept:
                sock.close()


@pytest.fixture
def cut_broker(start_broker):
    broker = start_broker()
    proxy = CuttingProxy(broker.address)
    yield broker, proxy
    proxy.close()


def test_sync_exclusive_producer_and_consumer_come_back_after_an_unseen_cut(cut_broker, topic):
    """The broker still held the old connection's exclusive producer: its reopen got PRODUCER_BUSY
    and the producer ended with ConnectionLost for good, though the broker dropped the old
    connection two heartbeats later. It is now retried until then."""
    broker, proxy = cut_broker
    reconnected = threading.Event()
    seeds = Reconnect([("127.0.0.1", proxy.port)], initial=0.05, maximum=0.2, give_up_after=30)
    with Client("127.0.0.1", proxy.port, heartbeat_ms=300, reconnect=seeds,
                on_reconnect=lambda c: reconnected.set()) as client:
        producer = client.producer(topic, name="solo", access="exclusive", dispatch="reliable")
        consumer = client.subscribe(topic, "ex", "exclusive", "only")
        producer.send_sync(b"before")
        consumer.ack(consumer.receive(10), sync=True)
        proxy.cut()
        assert reconnected.wait(30)
        producer.send_sync(b"after", timeout=10)           # the same producer, open again
        assert consumer.receive(10).payload == b"after"
        assert client.stats(topic)["producers"] == 1


def test_async_exclusive_producer_comes_back_after_a_cut_the_broker_has_not_seen(cut_broker, topic):
    broker, proxy = cut_broker

    async def scenario():
        reconnected = asyncio.Event()
        seeds = Reconnect([("127.0.0.1", proxy.port)], initial=0.05, maximum=0.2, give_up_after=30)
        client = await AsyncClient.connect("127.0.0.1", proxy.port, heartbeat_ms=300, reconnect=seeds,
                                           on_reconnect=lambda c: reconnected.set())
        async with client:
            producer = await client.producer(topic, name="solo", access="exclusive", dispatch="reliable")
            consumer = await client.subscribe(topic, "ex", "exclusive", "only")
            await producer.send_sync(b"before")
            await consumer.ack(await consumer.receive(10), sync=True)
            proxy.cut()
            await asyncio.wait_for(reconnected.wait(), 30)
            await producer.send_sync(b"after", timeout=10)
            assert (await consumer.receive(10)).payload == b"after"
            assert (await client.stats(topic))["producers"] == 1
    asyncio.run(asyncio.wait_for(scenario(), 60))
