"""asyncio client of actorbroker, with the shape of the threaded one (client.py).

    async with await AsyncClient.connect("127.0.0.1", 6650) as client:
        producer = await client.producer("/demo/orders")
        future = await producer.send(b"hello")    # batched like Producer.send; await it for the offset
        consumer = await client.subscribe("/demo/orders", "billing", "shared")
        async for msg in consumer:
            await consumer.ack(msg)

One reader task dispatches replies by rid and pushes to their consumer; a heartbeat task pings
the broker when the connection has been quiet for heartbeat_ms.
"""
import asyncio
import itertools
import time

from actorbroker.transport.client_common import (
    DEFAULT_HOST, DEFAULT_PORT, PUSH_OPS, Attachments, Batch, Batcher, CreditWindow, Message,
    default_consumer_name, hello_frame, ids_of, max_message_size, message_from_record,
    note_unanswered_error, parse_url, producer_frame, record_for, reply_fields, subscribe_frame,
    too_large)
from actorbroker.transport.codec import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame
from actorbroker.transport.errors import (
    BrokerError, ConnectionLost, ConsumerClosed, ProducerClosed, UnknownConsumer, UnknownProducer,
    error_from_frame)

__all__ = ["AsyncClient", "connect", "AsyncProducer", "AsyncConsumer", "Message"]

READ_SIZE = 256 * 1024
DEAD_AFTER_HEARTBEATS = 3


async def connect(url=f"{DEFAULT_HOST}:{DEFAULT_PORT}", **options):
    """An AsyncClient connected to "host:port"."""
    host, port = parse_url(url)
    return await AsyncClient.connect(host, port, **options)


class AsyncClient:
    def __init__(self, reader, writer, name):
        """Use `await AsyncClient.connect(...)`."""
        self.name = name
        self._reader, self._writer = reader, writer
        self._pending = {}                  # rid -> handler(reply frame or exception)
        self._attachments = Attachments()
        self._rids = itertools.count(1)
        self._lost = None
        self._closing = False
        self._last_error = None             # a fatal error without rid: why the broker closes
        self._decoder = FrameDecoder(max_frame=DEFAULT_MAX_FRAME)
        self._last_received = time.monotonic()
        self._tasks = []
        self.welcome, self.max_frame, self.heartbeat_ms = None, DEFAULT_MAX_FRAME, 5000

    @classmethod
    async def connect(cls, host=DEFAULT_HOST, port=DEFAULT_PORT, *, token=None, heartbeat_ms=None,
                      name="actorbroker-py-async", connect_timeout=5.0):
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), connect_timeout)
        self = cls(reader, writer, name)
        self._tasks.append(asyncio.create_task(self._read_loop()))
        try:
            self.welcome = await self.request(hello_frame(name, token, heartbeat_ms), connect_timeout)
        except ConnectionLost:
            await self.close()
            raise self._last_error or ConnectionLost("closed by the broker during hello") from None
        except BaseException:
            await self.close()
            raise
        self.max_frame = self.welcome.get("max_frame", DEFAULT_MAX_FRAME)
        self.heartbeat_ms = self.welcome.get("heartbeat_ms", 5000)
        self._decoder.max_frame = max(self.max_frame, DEFAULT_MAX_FRAME)
        self._tasks.append(asyncio.create_task(self._heartbeat_loop()))
        return self

    # --- requests ------------------------------------------------------------------------------

    async def request(self, frame, timeout=10):
        """Send `frame` with a new rid and return the reply; an `error` reply raises its typed error."""
        rid, waiter = self._call(frame)
        return await self._wait(rid, waiter, timeout)

    def _call(self, frame, on_reply=None, opens=False):
        """Send a request now; returns (rid, future). on_reply(frame) gives the future's result."""
        if self._lost:
            raise ConnectionLost(str(self._lost))
        rid = next(self._rids)
        waiter = asyncio.get_running_loop().create_future()

        def handle(result):
            try:
                if waiter.done():
                    return
                if isinstance(result, BaseException):
                    waiter.set_exception(result)
                else:
                    waiter.set_result(on_reply(result) if on_reply else result)
            except BaseException as exc:
                waiter.set_exception(exc)
            finally:
                if opens:   # after on_reply attached the new id, which takes the pushes held for it
                    self._attachments.end_open(rid)

        self._pending[rid] = handle
        if opens:
            self._attachments.begin_open(rid)
        self._send(dict(frame, rid=rid))
        return rid, waiter

    async def _wait(self, rid, waiter, timeout):
        try:
            return await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            self._pending.pop(rid, None)
            self._attachments.end_open(rid)
            raise TimeoutError(f"no reply within {timeout}s") from None

    def _send(self, frame):
        if self._lost:
            raise ConnectionLost(str(self._lost))
        self._writer.write(encode_frame(frame))

    async def _drain(self):
        try:
            await self._writer.drain()
        except OSError as exc:
            self._connection_lost(ConnectionLost(f"write failed: {exc}"))
            raise ConnectionLost(str(exc)) from exc

    # --- producers and consumers ---------------------------------------------------------------

    async def producer(self, topic, *, name=None, dispatch=None, access=None, linger_ms=2,
                       max_batch=500, max_pending=10000, timeout=10):
        def opened(reply):
            p = AsyncProducer(self, reply, name, linger_ms, max_batch, max_pending)
            self._attach("producer", p.id, p)
            return p

        rid, waiter = self._call(producer_frame(topic, name, dispatch, access), opened, opens=True)
        return await self._wait(rid, waiter, timeout)

    async def subscribe(self, topic, subscription, type="exclusive", consumer=None, *, start=None,
                        dispatch=None, receiver_queue=1000, max_unacked=None, ack_timeout_ms=None,
                        max_redeliveries=None, dead_letter_topic=None, auto_credit=True,
                        on_active=None, timeout=10):
        """As Client.subscribe; on_active(consumer, active) is called in the reader task."""
        name = consumer or default_consumer_name(self.name)
        frame = subscribe_frame(topic, subscription, type, name, start=start, dispatch=dispatch,
                                max_unacked=max_unacked, ack_timeout_ms=ack_timeout_ms,
                                max_redeliveries=max_redeliveries, dead_letter_topic=dead_letter_topic)

        def subscribed(reply):
            c = AsyncConsumer(self, reply, topic, subscription, type, name,
                              receiver_queue if auto_credit else None, on_active)
            self._attach("consumer", c.id, c)
            return c

        rid, waiter = self._call(frame, subscribed, opens=True)
        c = await self._wait(rid, waiter, timeout)
        if auto_credit:
            c.flow(receiver_queue)
        return c

    def _attach(self, kind, ident, obj):
        for push in self._attachments.attach(kind, ident, obj):
            obj._on_push(push)

    # --- admin ---------------------------------------------------------------------------------

    async def topics(self, timeout=10):
        return (await self.request({"op": "topics"}, timeout))["topics"]

    async def stats(self, topic, timeout=10):
        return reply_fields(await self.request({"op": "stats", "topic": topic}, timeout))

    async def delete_topic(self, topic, timeout=10):
        await self.request({"op": "delete_topic", "topic": topic}, timeout)

    async def ping(self, timeout=10):
        """Round trip time in seconds."""
        start = time.monotonic()
        await self.request({"op": "ping"}, timeout)
        return time.monotonic() - start

    # --- reading and heartbeat -----------------------------------------------------------------

    async def _read_loop(self):
        reason = "connection closed by the broker"
        try:
            while True:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    break
                self._last_received = time.monotonic()
                self._decoder.feed(data)
                for frame in self._decoder:
                    self._dispatch(frame)
        except asyncio.CancelledError:
            reason = "client closed"
        except OSError as exc:
            reason = f"connection failed: {exc}"
        except Exception as exc:   # a bad frame, or a bug in a handler: the connection is unusable
            reason = f"connection abandoned: {type(exc).__name__}: {exc}"
        if self._last_error is not None:
            reason += f" (after {self._last_error})"
        self._connection_lost(ConnectionLost(reason))

    def _dispatch(self, frame):
        op = frame["op"]
        if op == "ping":
            self._writer.write(encode_frame({"op": "pong", "rid": frame.get("rid", 0)}))
        elif op in PUSH_OPS:
            target = self._attachments.route(frame)
            if target is not None:
                target._on_push(frame)
        elif "rid" in frame:
            handler = self._pending.pop(frame["rid"], None)
            if handler is not None:
                handler(error_from_frame(frame) if op == "error" else frame)
        elif op == "error":
            note_unanswered_error(self, error_from_frame(frame))

    async def _heartbeat_loop(self):
        beat = self.heartbeat_ms / 1000
        last_ping = 0.0
        while self._lost is None:
            await asyncio.sleep(beat / 4)
            now = time.monotonic()
            quiet = now - self._last_received
            if quiet > DEAD_AFTER_HEARTBEATS * beat:
                self._connection_lost(ConnectionLost(f"nothing received from the broker for {quiet:.1f}s"))
            elif quiet >= beat and now - last_ping >= beat and self._lost is None:
                last_ping = now
                rid = next(self._rids)
                self._pending[rid] = lambda result: None   # the pong only proves the broker alive
                self._send({"op": "ping", "rid": rid})

    # --- the end -------------------------------------------------------------------------------

    def _connection_lost(self, error):
        if self._lost is not None:
            return
        self._lost = error
        pending, self._pending = self._pending, {}
        self._writer.close()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        for handler in pending.values():
            handler(ConnectionLost(str(error)))
        for obj in self._attachments.take_all():
            obj._on_lost(error, self._closing)

    @property
    def connected(self):
        return self._lost is None

    async def close(self, timeout=5.0):
        """Send what producers still buffer (waiting up to `timeout`), then close the connection."""
        if self._lost is None and not self._closing:
            producers = [o for o in self._attachments.by_id.values() if isinstance(o, AsyncProducer)]
            try:
                await asyncio.wait_for(asyncio.gather(*(p.flush(None) for p in producers),
                                                      return_exceptions=True), timeout)
            except asyncio.TimeoutError:
                pass   # closing anyway; the futures tell what became of each send
        self._closing = True
        self._connection_lost(ConnectionLost("client closed"))
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self._writer.wait_closed()
        except OSError:
            pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


# --- producing --------------------------------------------------------------------------------

class _AsyncBatch(Batch):
    def __init__(self):
        super().__init__()
        self.done = asyncio.Event()
        self.first = None
        self.error = None


class AsyncSendFuture:
    """Awaitable offset of one message: `offset = await future`."""
    __slots__ = ("_batch", "_index")

    def __init__(self, batch, index):
        self._batch, self._index = batch, index

    def done(self):
        return self._batch.done.is_set()

    async def result(self, timeout=None):
        try:
            await asyncio.wait_for(self._batch.done.wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no receipt within {timeout}s") from None
        if self._batch.error is not None:
            raise self._batch.error
        return self._batch.first + self._index

    def __await__(self):
        return self.result().__await__()


class AsyncProducer:
    """As client.Producer: batched, pipelined; `send` waits while max_pending are outstanding."""

    def __init__(self, client, reply, name, linger_ms, max_batch, max_pending):
        self.id = reply["producer"]
        self.topic = reply.get("topic")
        self.dispatch = reply.get("dispatch")
        self.name = name or f"producer-{self.id}"
        self.closed_reason = None
        self._client = client
        self._linger_s = max(0.0, linger_ms / 1000)
        self._max_pending = max(1, max_pending)
        self._max_message = max_message_size(client.max_frame, self.name)
        self._batcher = Batcher(client.max_frame, max_batch, _AsyncBatch)
        self._outstanding = 0             # messages buffered or waiting for their receipt
        self._changed = asyncio.Event()   # set whenever _outstanding drops or the producer ends
        self._end = None                  # (exception class, argument) sends fail with once closed

    async def send(self, payload, key=None, attrs=None):
        """Queue one message; returns an AsyncSendFuture of its offset."""
        record, size = record_for(payload, key, attrs)
        if size > self._max_message:
            raise too_large(size, self._max_message)
        await self._wait_until(lambda: self._outstanding < self._max_pending or self._end)
        if self._end is not None:
            raise self._end_error()
        self._outstanding += 1
        batch, index, ready = self._batcher.add(record, size)
        for full in ready:
            self._write(full)
        if batch is self._batcher.current and index == 0:
            asyncio.get_running_loop().call_later(self._linger_s, self._send_current, batch)
        if ready:
            await self._client._drain()
        return AsyncSendFuture(batch, index)

    async def send_sync(self, payload, key=None, attrs=None, timeout=10):
        future = await self.send(payload, key, attrs)
        self._send_current()
        return await future.result(timeout)

    async def flush(self, timeout=10):
        """Send what is buffered and wait until every message sent so far has its receipt."""
        self._send_current()
        try:
            await asyncio.wait_for(self._wait_until(lambda: not self._outstanding), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{self._outstanding} messages without receipt after {timeout}s") from None
        if self._end is not None and self._end[0] is ConnectionLost:
            raise self._end_error()

    async def close(self, timeout=10):
        if self._end is not None:
            return
        try:
            await self.flush(timeout)
        finally:
            self._ended(ProducerClosed, "closed")
            self._client._attachments.detach("producer", self.id)
            try:
                await self._client.request({"op": "close_producer", "producer": self.id}, timeout)
            except (UnknownProducer, ConnectionLost):
                pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    def _send_current(self, only=None):
        """Send the batch being filled (or only `only`, when its linger timer fires)."""
        if self._batcher.current is None or (only is not None and self._batcher.current is not only):
            return
        batch = self._batcher.take()
        if self._end is not None:
            self._settle(batch, error=self._end_error())
        else:
            self._write(batch)

    def _write(self, batch):
        try:
            _, waiter = self._client._call({"op": "send", "producer": self.id, "msgs": batch.records},
                                           on_reply=lambda reply: self._settle(batch, reply=reply))
        except ConnectionLost as exc:
            self._settle(batch, error=exc)
            return

        def on_error(future):
            if not future.cancelled() and future.exception() is not None:
                self._settle(batch, error=future.exception())
        waiter.add_done_callback(on_error)

    def _settle(self, batch, reply=None, error=None):
        if batch.done.is_set():
            return
        if reply is not None and reply.get("count") != len(batch.records):
            error = BrokerError("INTERNAL", f"receipt counts {reply.get('count')} messages, "
                                            f"the send had {len(batch.records)}")
        batch.error = error
        batch.first = None if error else reply["first"]
        batch.done.set()
        self._outstanding -= len(batch.records)
        self._changed.set()

    async def _wait_until(self, condition):
        # Event.set wakes every waiter at once, so a waiter clearing it cannot make another miss it.
        while not condition():
            self._changed.clear()
            await self._changed.wait()

    def _ended(self, cls, arg):
        if self._end is None:
            self._end = (cls, arg)
        self._changed.set()

    def _end_error(self):
        cls, arg = self._end
        return cls(arg)

    def _on_push(self, frame):
        if frame["op"] == "closed":
            self.closed_reason = frame.get("reason", "closed")
            self._ended(ProducerClosed, self.closed_reason)
            self._client._attachments.detach("producer", self.id)
            self._send_current()    # fails what is still buffered

    def _on_lost(self, error, client_closing):
        if self.closed_reason is None:
            self.closed_reason = "client_closed" if client_closing else "connection_lost"
        self._ended(ConnectionLost, str(error))
        self._send_current()


# --- consuming --------------------------------------------------------------------------------

_END = object()


class AsyncConsumer:
    """As client.Consumer; `receive` and iteration are coroutines."""

    def __init__(self, client, reply, topic, subscription, sub_type, name, receiver_queue, on_active):
        self.id = reply["consumer"]
        self.dispatch = reply.get("dispatch")
        self.topic, self.subscription, self.type, self.name = topic, subscription, sub_type, name
        self.active = None
        self.closed_reason = None
        self.on_active = on_active
        self._client = client
        self._queue = asyncio.Queue()
        self._credits = CreditWindow(receiver_queue) if receiver_queue else None
        self._end = None

    async def receive(self, timeout=None):
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no message within {timeout}s") from None
        if item is _END:
            self._queue.put_nowait(_END)
            cls, arg = self._end
            raise cls(arg)
        if self._credits is not None:
            grant = self._credits.take()
            if grant and self._end is None and self._client.connected:
                self.flow(grant)
        return item

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self.receive()
        except ConsumerClosed:
            raise StopAsyncIteration from None

    def flow(self, credits):
        self._client._send({"op": "flow", "consumer": self.id, "credits": credits})

    async def ack(self, msg_or_ids, sync=False, timeout=10):
        await self._settle_ids("ack", msg_or_ids, sync, timeout)

    async def nack(self, msg_or_ids, delay_ms=None, sync=False, timeout=10):
        await self._settle_ids("nack", msg_or_ids, sync, timeout, delay_ms=delay_ms)

    async def _settle_ids(self, op, msg_or_ids, sync, timeout, delay_ms=None):
        ids = ids_of(msg_or_ids)
        if not ids:
            return
        frame = {"op": op, "consumer": self.id, "ids": ids}
        if delay_ms is not None:
            frame["delay_ms"] = delay_ms
        if sync:
            await self._client.request(frame, timeout)
        else:
            self._client._send(frame)

    async def close(self, timeout=10):
        if self._end is not None:
            return
        self._ended("closed")
        self._client._attachments.detach("consumer", self.id)
        try:
            await self._client.request({"op": "close_consumer", "consumer": self.id}, timeout)
        except (UnknownConsumer, ConnectionLost):
            pass

    async def unsubscribe(self, timeout=10):
        await self._client.request({"op": "unsubscribe", "consumer": self.id}, timeout)
        self._ended("unsubscribed")
        self._client._attachments.detach("consumer", self.id)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    def _on_push(self, frame):
        op = frame["op"]
        if op == "message":
            if self._end is None:
                for record in frame["msgs"]:
                    self._queue.put_nowait(message_from_record(record, self.id))
        elif op == "active":
            self.active = bool(frame.get("active"))
            if self.on_active is not None:
                self.on_active(self, self.active)
        elif op == "closed":
            self._ended(frame.get("reason", "closed"))
            self._client._attachments.detach("consumer", self.id)

    def _on_lost(self, error, client_closing):
        if client_closing:
            self._ended("client_closed")
        else:
            self._ended("connection_lost", (ConnectionLost, str(error)))

    def _ended(self, reason, raises=None):
        if self._end is not None:
            return
        self.closed_reason = reason
        self._end = raises or (ConsumerClosed, reason)
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_END)
