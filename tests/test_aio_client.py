"""The asyncio client against a real broker."""
import asyncio

import pytest

from actorbroker.transport.client import AsyncClient
from actorbroker.transport.errors import ConsumerBusy


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
