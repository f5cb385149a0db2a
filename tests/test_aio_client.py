"""The asyncio client against a real broker (and, for fixes in the core that both clients
share, the threaded client beside it)."""
import asyncio

import pytest

from actorbroker.transport.client import AsyncClient, Client
from actorbroker.transport.errors import BadRequest, ConsumerBusy, UnknownConsumer
from tests.wire import RawConnection


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_produce_consume_ack_and_typed_errors(broker, topic):
    async def scenario():
        async with await AsyncClient.connect(*broker.address) as client:
            consumer = await client.subscribe(topic, "s", "exclusive", "c", dispatch="reliable")
            producer = await client.producer(topic)
            futures = [await producer.send(f"m{i}".encode(), key="k") for i in range(50)]
            await producer.flush()
            offsets = [await f for f in futures]
            got = []
            async for msg in consumer:
                got.append(msg)
                if len(got) == 50:
                    break
            await consumer.ack(got, sync=True)   # answered once the cursor is on disk
            assert [m.id for m in got] == offsets
            assert got[0].payload == b"m0" and got[0].key == "k"
            with pytest.raises(ConsumerBusy):
                await client.subscribe(topic, "s", "exclusive", "someone-else")
            stats = await client.stats(topic)
            assert stats["subscriptions"][0]["consumers"][0]["unacked"] == 0
    run(scenario())


def test_an_empty_consumer_name_is_refused_as_the_broker_says_not_replaced(broker, topic):
    # None: the client picks a name; "" is the caller's value, which the broker refuses (the Node
    # client does the same): not silently a random name
    with Client(*broker.address) as client:
        with pytest.raises(BadRequest):
            client.subscribe(topic, "s", "shared", "")
        assert client.subscribe(topic, "s", "shared").name

    async def scenario():
        async with await AsyncClient.connect(*broker.address) as client:
            with pytest.raises(BadRequest):
                await client.subscribe(topic, "s", "shared", "")
    run(scenario())


def test_failover_active_push_reaches_the_async_consumer(broker, topic):
    async def scenario():
        async with await AsyncClient.connect(*broker.address) as first_client, \
                await AsyncClient.connect(*broker.address) as second_client:
            first = await first_client.subscribe(topic, "fo", "failover", "a")
            second = await second_client.subscribe(topic, "fo", "failover", "b")
            await first_client.close()
            for _ in range(500):          # the push arrives by itself; poll the flag it sets
                if second.active:
                    break
                await asyncio.sleep(0.01)
            assert second.active is True and first is not None
    run(scenario())


def test_an_async_watcher_hears_the_loss_of_its_connection(start_broker, topic):
    """next_event raises ConnectionLost once the connection is gone (it waited forever)."""
    from actorbroker.transport.errors import ConnectionLost
    b = start_broker()

    async def scenario():
        client = await AsyncClient.connect(*b.address)
        await client.watch(topic)
        await client.subscribe(topic, "s", "exclusive", "c")
        while (await client.next_event())["kind"] != "consumer_attached":
            pass
        waiting = asyncio.ensure_future(client.next_event())   # waits while the broker goes
        await asyncio.to_thread(b.stop)
        with pytest.raises(ConnectionLost):
            while True:          # the events decided before the stop, then the loss
                await waiting
                waiting = asyncio.ensure_future(client.next_event())
        with pytest.raises(ConnectionLost):   # and every later call
            await client.next_event(1)
        await client.close()
    run(scenario())


# --- acks of more ids than one frame holds --------------------------------------------------------

def test_sync_acks_and_nacks_larger_than_max_frame_keep_the_connection(start_broker, topic):
    """One ack frame over max_frame made the broker close the connection (FRAME_TOO_LARGE)."""
    b = start_broker("--max-frame", "8192")
    with Client(*b.address) as client:
        assert client.max_frame == 8192
        consumer = client.subscribe(topic, "s", "shared", "c", dispatch="reliable")
        consumer.ack(range(5000))                      # never delivered: the broker ignores them
        consumer.nack(range(5000), delay_ms=10)
        consumer.ack(range(5000), sync=True)           # answered part by part, all waited for
        assert client.ping() >= 0 and client.connected
        consumer.close()
        with pytest.raises(UnknownConsumer):           # a part that fails fails the call
            consumer.ack(range(5000), sync=True)
        assert client.connected


def test_async_acks_and_nacks_larger_than_max_frame_keep_the_connection(start_broker, topic):
    b = start_broker("--max-frame", "8192")

    async def scenario():
        async with await AsyncClient.connect(*b.address) as client:
            consumer = await client.subscribe(topic, "s", "shared", "c", dispatch="reliable")
            await consumer.nack(range(5000))
            await consumer.ack(range(5000))
            await consumer.nack(range(5000), sync=True)
            assert await client.ping() >= 0 and client.connected
            await consumer.close()
            with pytest.raises(UnknownConsumer):
                await consumer.ack(range(5000), sync=True)
            assert client.connected
    run(scenario())


# --- a producer() / subscribe() given up before its reply ------------------------------------------

def is_detached(event, name):
    return event["kind"] == "consumer_detached" and event["consumer_name"] == name


def detached_by_close(watcher, name):
    """Reads a watcher's events up to the detachment of consumer `name`; returns that event."""
    while not is_detached(event := watcher.next_event(10), name):
        pass
    return event


async def async_detached_by_close(watcher, name):
    while not is_detached(event := await watcher.next_event(10), name):
        pass
    return event


def test_a_sync_subscribe_that_timed_out_is_closed_when_its_reply_comes(broker, topic):
    """It stayed attached on the broker with no handle: an exclusive subscription then refused
    everyone else (CONSUMER_BUSY) for as long as the connection lived."""
    with Client(*broker.address) as client, Client(*broker.address) as watcher:
        watcher.watch(topic)
        with pytest.raises(TimeoutError):
            client.subscribe(topic, "ex", "exclusive", "first", timeout=0)
        assert detached_by_close(watcher, "first")["cause"] == "closed"
        second = client.subscribe(topic, "ex", "exclusive", "second")
        assert second.name == "second"


def test_an_async_subscribe_that_timed_out_or_was_cancelled_is_closed_when_its_reply_comes(broker, topic):
    async def scenario():
        async with await AsyncClient.connect(*broker.address) as client, \
                await AsyncClient.connect(*broker.address) as watcher:
            await watcher.watch(topic)
            with pytest.raises(TimeoutError):
                await client.subscribe(topic, "ex", "exclusive", "first", timeout=0)
            assert (await async_detached_by_close(watcher, "first"))["cause"] == "closed"
            opening = asyncio.ensure_future(client.subscribe(topic, "ex", "exclusive", "second"))
            await asyncio.sleep(0)       # one turn of the loop: the subscribe is sent, then waits
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
            assert (await async_detached_by_close(watcher, "second"))["cause"] == "closed"
            third = await client.subscribe(topic, "ex", "exclusive", "third")
            assert third.name == "third"
    run(scenario())


def test_an_on_active_callback_that_raises_leaves_the_connection_and_its_consumers_alone(broker, topic, caplog):
    """A bug in the user's on_active (here a ValueError) was taken for a failure of the
    connection: subscribe raised ConnectionLost and every producer and consumer of the client
    ended (with reconnect: a reconnect on each call, without end). It is logged instead."""
    def bad(consumer, active):
        raise ValueError("bug in my on_active")

    with Client(*broker.address) as client:
        other = client.subscribe(topic, "other", "shared", "w")
        failover = client.subscribe(topic, "fo", "failover", "a", on_active=bad)
        producer = client.producer(topic)
        producer.send_sync(b"still here")
        assert other.receive(timeout=10).payload == b"still here"
        assert failover.receive(timeout=10).payload == b"still here"
        assert client.connected
    assert any("bug in my on_active" in r.getMessage() or (r.exc_info and "bug in my on_active" in str(r.exc_info[1]))
               for r in caplog.records)

    async def scenario():
        async with await AsyncClient.connect(*broker.address) as client:
            other = await client.subscribe(topic, "other2", "shared", "w")
            failover = await client.subscribe(topic, "fo2", "failover", "a", on_active=bad)
            producer = await client.producer(topic)
            await producer.send_sync(b"here too")
            assert (await other.receive(timeout=10)).payload == b"here too"
            assert (await failover.receive(timeout=10)).payload == b"here too"
            assert client.connected
    run(scenario())


def test_a_payload_that_is_not_bytes_str_or_a_buffer_is_a_type_error(broker, topic):
    """send(12345) published 12,345 zero bytes (bytes(int)), send([1, 2]) b'\\x01\\x02'."""
    import array
    with Client(*broker.address) as client:
        consumer = client.subscribe(topic, "s", "exclusive", "c")
        producer = client.producer(topic)
        for wrong in (12345, [1, 2], None, 1.5, {"a": 1}):
            with pytest.raises(TypeError):
                producer.send(wrong)
            with pytest.raises(TypeError):
                producer.send(wrong, key="k")
        for right in (b"b", "s", bytearray(b"ba"), memoryview(b"mv"), array.array("B", [1, 2])):
            producer.send(right)
        producer.flush()
        got = [consumer.receive(timeout=10).payload for _ in range(5)]
        assert got == [b"b", b"s", b"ba", b"mv", b"\x01\x02"]

    async def scenario():
        async with await AsyncClient.connect(*broker.address) as client:
            producer = await client.producer(topic)
            with pytest.raises(TypeError):
                await producer.send(12345)
    run(scenario())


def test_the_client_refuses_exactly_what_the_broker_would(start_broker, topic):
    """The client's size check had a margin of its own: at --max-frame 65536 it refused payloads
    of 65,385 to 65,418 bytes that the broker takes and delivers."""
    from actorbroker.transport.client.core import max_message_size
    b = start_broker("--max-frame", "65536")
    with Client(*b.address) as client:
        consumer = client.subscribe(topic, "s", "exclusive", "c")
        producer = client.producer(topic)
        limit = max_message_size(65536, producer.name)
        producer.send_sync(b"x" * limit)
        producer.send_sync(b"y" * (limit - 17), key="k" * 5, attrs={"a": "b"})   # 5 + 1 + 1 + 10 more
        with pytest.raises(BadRequest):
            producer.send(b"x" * (limit + 1))
        with pytest.raises(BadRequest):
            producer.send(b"y" * (limit - 17), key="k" * 5, attrs={"a": "bb"})
        assert len(consumer.receive(timeout=10).payload) == limit
        assert consumer.receive(timeout=10).key == "kkkkk"
        raw = RawConnection(*b.address)   # and the broker itself refuses one byte more
        raw.hello()
        pid = raw.request({"op": "producer", "topic": topic, "name": producer.name + "2"})["producer"]
        ok = raw.request({"op": "send", "producer": pid, "msgs": [{"payload": b"z" * (limit - 1)}]})
        assert ok["op"] == "receipt"
