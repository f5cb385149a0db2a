"""asyncio client of actorbroker, with the shape of the threaded one (sync.py).

    async with await AsyncClient.connect("127.0.0.1", 6650) as client:
        producer = await client.producer("/demo/orders")
        future = await producer.send(b"hello")    # batched like Producer.send; await it for the offset
        consumer = await client.subscribe("/demo/orders", "billing", "shared")
        async for msg in consumer:
            await consumer.ack(msg)

The protocol is core.ClientCore's: one reader task feeds it what the stream receives and carries
out the events it returns; a heartbeat task ticks its heartbeat clock.
"""
import asyncio
import time
from collections import deque

from actorbroker.transport.client.core import (
    ADMIN, DEFAULT_HEARTBEAT_MS, DEFAULT_HOST, DEFAULT_PORT, READ_SIZE, Batch, BatchFuture, ClientCore,
    ConsumerCore, Message, ProducerCore, Reconnect, call_back, dispatch, end_unopened, first_addresses, hello_frame,
    next_seed_may_help, open_consumer, open_producer, parse_address, read_failure)
from actorbroker.transport.client.tls import client_context, server_name
from actorbroker.transport.codec import DEFAULT_MAX_FRAME, PROTOCOL_VERSION
from actorbroker.transport.errors import ConnectionLost, ConsumerClosed, ProducerClosed

__all__ = ["AsyncClient", "connect", "AsyncProducer", "AsyncConsumer", "AsyncSendFuture", "Message"]


async def connect(url=f"{DEFAULT_HOST}:{DEFAULT_PORT}", **options):
    """An AsyncClient connected to "host:port" or "tls://host:port" (see sync.connect)."""
    host, port, tls = parse_address(url)
    if tls and not options.get("tls"):
        options["tls"] = True
    return await AsyncClient.connect(host, port, **options)


_LOST = object()   # in the event queue: the connection was lost (next_event raises)


class AsyncClient:
    def __init__(self, reader, writer, name):
        """Use `await AsyncClient.connect(...)`."""
        self.name = name
        self._reader, self._writer = reader, writer
        self._queued = self._taken = 0   # bytes given to the transport; of them, taken at _taken_at
        self._taken_at = time.monotonic()
        self._core = ClientCore(name)
        self._core.last_received = time.monotonic()
        self._tasks = []
        self.welcome, self.max_frame, self.heartbeat_ms = None, DEFAULT_MAX_FRAME, DEFAULT_HEARTBEAT_MS
        self._events = asyncio.Queue()   # event frames of a watch
        self._reconnect = self._on_reconnect = self._hello = None
        self._finished = asyncio.Event()   # closed for good (not reconnecting)

    @classmethod
    async def connect(cls, host=DEFAULT_HOST, port=DEFAULT_PORT, *, token=None, heartbeat_ms=None,
                      name="actorbroker-py-async", connect_timeout=5.0, tls=None, reconnect=None,
                      on_reconnect=None, protocol_version=PROTOCOL_VERSION):
        """tls: None (plain TCP), True (TLS, the system's CAs), a TlsOptions or an ssl.SSLContext;
        asyncio's own TLS (memory BIOs under its transport) carries it. reconnect, on_reconnect,
        protocol_version: as Client's (on_reconnect is called in the reader task)."""
        errors = []
        for address in first_addresses((host, port), reconnect):   # as Client's first connect
            try:
                reader, writer = await _open(*address, tls, connect_timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                errors.append(exc)
                continue
            self = cls(reader, writer, name)
            self._reconnect = Reconnect([(host, port)]) if reconnect is True else reconnect
            self._on_reconnect = on_reconnect
            self._core.reopens = self._reconnect is not None
            self._hello = (token, heartbeat_ms, tls, connect_timeout, protocol_version)
            self._tasks.append(asyncio.create_task(self._read_loop()))
            try:
                self.welcome = await self.request(hello_frame(name, token, heartbeat_ms, protocol_version),
                                                  connect_timeout)
                break
            except BaseException as exc:
                await self.close()
                error = self._core.hello_error(exc)
                if isinstance(exc, asyncio.CancelledError) or not next_seed_may_help(error):
                    raise error from None
                errors.append(error)
        else:
            raise errors[0]
        self._core.welcomed(self.welcome)
        self.max_frame, self.heartbeat_ms = self._core.max_frame, self._core.heartbeat_ms
        self._tasks.append(asyncio.create_task(self._heartbeat_loop()))
        return self

    # --- requests ------------------------------------------------------------------------------

    async def request(self, frame, timeout=10):
        """Send `frame` with a new rid and return the reply; an `error` reply raises its typed error."""
        return await self._wait(*self._call(frame), timeout)

    def _call(self, frame, make=None, kind=None):
        """Send a request now; returns (rid, future) (see Client._call)."""
        waiter = asyncio.get_running_loop().create_future()
        rid, data = self._core.request(frame, waiter, make, kind)
        self._put(data)
        return rid, waiter

    async def _wait(self, rid, waiter, timeout):
        # asyncio.wait, not wait_for: wait_for's cancelling of the waiter yields to the loop, where
        # the reply could be taken, and an opened producer or consumer dropped with nobody to close it.
        try:
            await asyncio.wait((waiter,), timeout=timeout)
        finally:   # timed out, or the caller was cancelled: nobody waits for the reply
            if not waiter.done():
                waiter.cancel()
                self._core.forget(rid)
        if waiter.cancelled():
            raise TimeoutError(f"no reply within {timeout}s")
        return waiter.result()

    async def _request_all(self, frames, timeout):
        """Send the requests at once, then wait for all their replies (within `timeout` in all);
        the first error of any of them is raised once all have answered."""
        calls = [self._call(frame) for frame in frames]
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        error = None
        for rid, waiter in calls:
            try:
                await self._wait(rid, waiter, None if deadline is None else max(0.0, deadline - loop.time()))
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error

    @staticmethod
    def _settle(waiter, result, error):
        if waiter.done():
            return   # timed out or cancelled meanwhile
        if error is None:
            waiter.set_result(result)
        else:
            waiter.set_exception(error)

    def _send(self, frame):
        """A frame without rid (flow, ack, nack)."""
        self._put(self._core.one_way(frame))

    def _send_batch(self, producer, batch):
        self._put(self._core.send_request(producer, batch))

    def _put(self, data):
        """To the transport, counted: the heartbeat tells a broker that takes nothing from one
        that is slow (_write_stalled)."""
        self._queued += len(data)
        self._writer.write(data)

    def _write_stalled(self, now):
        """Bytes wait to be written and the broker took none of them for two heartbeats (a hung
        host): a send never waits longer than that, as the threaded client's (write_within)."""
        waiting = self._writer.transport.get_write_buffer_size()
        taken = self._queued - waiting
        if not waiting or taken > self._taken:
            self._taken, self._taken_at = taken, now
            return None
        # a broker that holds our bytes back while it works (backpressure) keeps talking
        if now - max(self._taken_at, self._core.last_received) < 2 * self._core.heartbeat_ms / 1000:
            return None
        return ConnectionLost(f"the broker read too little and said nothing for {2 * self._core.heartbeat_ms} ms "
                              "(2 heartbeats)")

    def _write_quietly(self, data, wait=True):
        """(wait: the threaded client's; a write here never waits)"""
        if self._core.lost is None:
            self._put(data)

    async def _drain(self):
        try:
            await self._writer.drain()
        except OSError as exc:
            self._connection_lost(ConnectionLost(f"write failed: {exc}"))
            raise ConnectionLost(str(exc)) from exc

    # --- producers and consumers ---------------------------------------------------------------

    async def producer(self, topic, *, name=None, dispatch=None, access=None, linger_ms=2,
                       max_batch=500, max_pending=10000, timeout=10):
        """As Client.producer."""
        request = open_producer(self, AsyncProducer, topic, name, dispatch, access, linger_ms,
                                max_batch, max_pending)
        return await self._wait(*self._call(*request, "producer"), timeout)

    async def subscribe(self, topic, subscription, type="exclusive", consumer=None, *,
                        receiver_queue=1000, auto_credit=True, on_active=None, timeout=10, **options):
        """As Client.subscribe; on_active(consumer, active) is called in the reader task."""
        request = open_consumer(self, AsyncConsumer, topic, subscription, type, consumer,
                                receiver_queue, auto_credit, on_active, options)
        consumer = await self._wait(*self._call(*request, "consumer"), timeout)
        if auto_credit:
            consumer.flow(receiver_queue)
        return consumer

    async def _close_remote(self, obj, timeout):
        """Detach a producer or consumer and close it on the broker (ClientCore.close_request)."""
        waiter = asyncio.get_running_loop().create_future()
        request = self._core.close_request(obj, waiter)
        if request is not None:
            self._write_quietly(request[1])
            await self._wait(request[0], waiter, timeout)

    # --- admin ---------------------------------------------------------------------------------

    async def _admin(self, op, timeout, *args):
        frame_of, result_of = ADMIN[op]
        return result_of(await self.request(frame_of(*args), timeout))

    async def topics(self, timeout=10):
        return await self._admin("topics", timeout)

    async def stats(self, topic, timeout=10):
        return await self._admin("stats", timeout, topic)

    async def delete_topic(self, topic, timeout=10):
        await self._admin("delete_topic", timeout, topic)

    async def lookup(self, topic, timeout=10):
        return await self._admin("lookup", timeout, topic)

    async def cluster(self, timeout=10):
        return await self._admin("cluster", timeout)

    async def broker_stats(self, timeout=10):
        return await self._admin("broker_stats", timeout)

    async def ping(self, timeout=10):
        """Round trip time in seconds."""
        start = time.monotonic()
        await self._admin("ping", timeout)
        return time.monotonic() - start

    # --- the lifecycle event stream (docs/protocol.md, "Events") ---------------------------------

    async def watch(self, topics="*", timeout=10):
        """As Client.watch; read the events with `await next_event()`."""
        await self._admin("watch", timeout, topics)

    async def unwatch(self, timeout=10):
        await self._admin("unwatch", timeout)

    async def next_event(self, timeout=None):
        """The next event frame; TimeoutError if none comes in time, ConnectionLost once the
        connection is gone and all were read (as Client.next_event)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._core.lost is not None and self._events.empty():
                raise ConnectionLost(str(self._core.lost))
            left = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                frame = await asyncio.wait_for(self._events.get(), left)
            except asyncio.TimeoutError:
                raise TimeoutError(f"no event within {timeout}s") from None
            if frame is not _LOST:
                return frame
            # the loss wakes a waiter; a stale one (reconnected since) is skipped

    def _event(self, frame):
        self._events.put_nowait(frame)

    # --- reading and heartbeat -----------------------------------------------------------------

    async def _read_loop(self):
        try:
            while True:
                reason = "connection closed by the broker"
                try:
                    while data := await self._reader.read(READ_SIZE):
                        dispatch(self._core.receive_data(data, time.monotonic()), self)
                except asyncio.CancelledError:
                    reason = "client closed"
                except Exception as exc:
                    reason = read_failure(exc)
                self._connection_lost(ConnectionLost(self._core.end_reason(reason)))
                if self._reconnect is None or self._core.closing or not await self._connect_again():
                    break
        finally:   # also when close() cancels a reconnect in progress
            self._give_up()

    async def _heartbeat_loop(self):
        while not self._finished.is_set() and (self._core.lost is None or self._reconnect is not None):
            await asyncio.sleep(self.heartbeat_ms / 4000)
            now = time.monotonic()
            ping, dead = self._core.heartbeat(now)
            if dead is None and self._core.lost is None:
                dead = self._write_stalled(now)
            if dead is not None:
                self._connection_lost(dead)
            elif ping is not None:
                self._put(ping)

    # --- reconnecting (the reader task's) -------------------------------------------------------

    async def _connect_again(self):
        """As Client._connect_again, with the event loop's primitives."""
        token, heartbeat_ms, tls, timeout, version = self._hello
        for (host, port), delay in self._reconnect.attempts(time.monotonic, lambda: self._core.closing):
            try:
                await asyncio.wait_for(self._finished.wait(), delay)
                return False
            except asyncio.TimeoutError:
                pass
            try:
                self._reader, self._writer = await _open(host, port, tls, timeout)
                self._queued = self._taken = 0
                self._taken_at = time.monotonic()
            except (OSError, asyncio.TimeoutError):
                continue
            self._core.restart(time.monotonic())
            try:
                await asyncio.wait_for(self._handshake(hello_frame(self.name, token, heartbeat_ms, version)),
                                       timeout)
            except Exception:
                self._connection_lost(ConnectionLost("reconnect: hello failed"))
                continue
            self._tasks = [task for task in self._tasks if not task.done()]   # (one per reconnect: not kept)
            self._tasks.append(asyncio.create_task(self._reopen_all()))
            return True
        return False

    async def _handshake(self, frame):
        _, waiter = self._call(frame)
        try:
            while not waiter.done():
                data = await self._reader.read(READ_SIZE)
                if not data:
                    raise ConnectionLost("closed during hello")
                dispatch(self._core.receive_data(data, time.monotonic()), self)
        finally:
            if not waiter.done():
                waiter.cancel()   # nobody will read it: the failed attempt is retried
        self._core.welcomed(waiter.result())

    def _reopen_later(self, obj):
        """As Client._reopen_later, in a task."""
        obj._pause()
        self._tasks = [task for task in self._tasks if not task.done()]   # (one per recovery: not kept)
        self._tasks.append(asyncio.create_task(self._reopen_all(False)))

    async def _reopen_all(self, reconnected=True):
        """As Client._reopen_all."""
        kept = self._core.take_detached()
        todo = set(kept)   # neither resumed nor ended nor kept for the next reconnect yet
        try:
            while kept:
                waiters = []
                for obj in kept:
                    waiter = asyncio.get_running_loop().create_future()
                    try:
                        _, data = self._core.reopen_request(obj, waiter)
                        self._put(data)
                    except ConnectionLost as exc:
                        waiter.set_exception(exc)
                    waiters.append((obj, waiter))
                retry = []
                for obj, waiter in waiters:
                    try:
                        while True:   # as Client._wait_reopened
                            try:
                                await asyncio.wait_for(asyncio.shield(waiter), self._hello[3] * 2)
                                break
                            except asyncio.TimeoutError:
                                if not self.connected:
                                    raise
                        closing = self._core.reopened(obj)
                        todo.discard(obj)
                        if closing is None:
                            obj._resume()
                        else:   # closed by the application meanwhile
                            self._put(closing)
                        continue
                    except asyncio.TimeoutError:
                        error = ConnectionLost("reopening it: no answer before the connection was lost")
                    except Exception as exc:
                        error = exc
                    delay = self._core.reopen_retry(obj, error, time.monotonic(), self._reconnect)
                    if delay is not None:
                        retry.append((delay, obj))
                        continue
                    todo.discard(obj)
                    if self._core.reopen_failed(obj, error):
                        end_unopened(obj, self._core.reopen_reason(obj), error)
                kept = [obj for _, obj in retry]
                if retry:
                    await asyncio.sleep(min(delay for delay, _ in retry))
        finally:   # cancelled (the client closes): what is not settled yet ends now
            for obj in todo:
                obj._lost(self._core.lost or ConnectionLost("client closed"), self._core.closing)
        if reconnected and self._on_reconnect is not None and self.connected:
            call_back(self._on_reconnect, self)

    def _give_up(self):
        """Closed for good: what was kept for a reconnect ends as lost."""
        for obj in self._core.take_detached(final=True):
            obj._lost(self._core.lost or ConnectionLost("client closed"), self._core.closing)
        self._finished.set()

    async def wait_closed(self):
        """Wait until the client is closed for good (see Client.wait_closed)."""
        await self._finished.wait()

    # --- the end -------------------------------------------------------------------------------

    def _connection_lost(self, error):
        keep = self._reconnect is not None and not self._core.closing
        events = self._core.connection_lost(error, keep)
        if events is None:
            return
        if self._core.closing:
            self._writer.close()
        else:   # lost: what is still buffered will never go, and a send waiting in drain() must end
            self._writer.transport.abort()
        self._events.put_nowait(_LOST)   # wakes next_event
        if keep:   # the reader task reconnects; the heartbeat goes on
            for obj in self._core.detached:
                obj._pause()
        else:
            for task in self._tasks:
                if task is not asyncio.current_task():
                    task.cancel()
        dispatch(events, self)

    @property
    def connected(self):
        return self._core.lost is None

    async def close(self, timeout=5.0):
        """Send what producers still buffer (waiting up to `timeout`), then close the connection."""
        core = self._core
        if core.lost is None and not core.closing:
            flushes = asyncio.gather(*(p.flush(None) for p in core.producers()), return_exceptions=True)
            try:
                await asyncio.wait_for(flushes, timeout)
            except asyncio.TimeoutError:
                pass   # closing anyway; the futures tell what became of each send
        core.closing = True
        self._finished.set()
        self._connection_lost(ConnectionLost("client closed"))
        for task in self._tasks:   # also a reader that was reconnecting when the loss was kept
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self._writer.wait_closed()
        except OSError:
            pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


async def _open(host, port, tls, timeout):
    """(reader, writer) of a new connection, with TLS when `tls` is set."""
    secure = dict(ssl=client_context(tls), server_hostname=server_name(tls, host)) if tls else {}
    return await asyncio.wait_for(asyncio.open_connection(host, port, **secure), timeout)


# --- producing --------------------------------------------------------------------------------

def _new_batch():
    return Batch(asyncio.Event())


class AsyncSendFuture(BatchFuture):
    """Awaitable offset of one message: `offset = await future`."""
    __slots__ = ()

    async def result(self, timeout=None):
        try:
            await asyncio.wait_for(self._batch.done.wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no receipt within {timeout}s") from None
        return self._batch.offset(self._index)

    def __await__(self):
        return self.result().__await__()


class AsyncProducer(ProducerCore):
    """As sync.Producer: batched, pipelined; `send` waits while max_pending are outstanding."""

    def __init__(self, client, reply, name, linger_ms, max_batch, max_pending):
        super().__init__(reply, name, linger_ms, max_batch, max_pending, client.max_frame, _new_batch)
        self._client = client
        self._changed = asyncio.Event()   # set whenever _outstanding drops or the producer ends
        self._held = None                 # reconnecting: the batches that wait to be sent

    async def send(self, payload, key=None, attrs=None):
        """Queue one message; returns an AsyncSendFuture of its offset."""
        record, size = self._record(payload, key, attrs)
        if self._outstanding >= self._max_pending:
            await self._wait_until(lambda: self._outstanding < self._max_pending or self._end)
        if self._end is not None:
            raise self._end_error()
        batch, index, ready, lingering = self._add(record, size)
        for full in ready:
            self._write(full)
        if self._flushing:   # a flush waits for this one too: it must not linger
            self._send_current()
        elif lingering:
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
        self._flushing += 1
        try:
            self._send_current()
            await asyncio.wait_for(self._wait_until(lambda: not self._outstanding), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{self._outstanding} messages without receipt after {timeout}s") from None
        finally:
            self._flushing -= 1
        if self._end is not None and self._end[0] is ConnectionLost:
            raise self._end_error()

    async def close(self, timeout=10):
        """Flush, then close the producer on the broker."""
        if self._end is not None:
            return
        try:
            await self.flush(timeout)
        finally:
            self._ended(ProducerClosed, "closed")
            await self._client._close_remote(self, timeout)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    def _send_current(self, only=None):
        """Send the batch being filled (or only `only`, when its linger timer fires)."""
        current = self._batcher.current
        if current is None or (only is not None and current is not only):
            return
        batch = self._batcher.take()
        if self._end is not None:
            self._receipt(batch, None, self._end_error())
        else:
            self._write(batch)

    def _write(self, batch):
        if self._held is not None:
            self._held.append(batch)
            return
        try:
            self._client._send_batch(self, batch)
        except ConnectionLost as exc:
            self._receipt(batch, None, exc)

    def _pause(self):
        """The connection is lost and the client reconnects: keep what is sent meanwhile."""
        if self._held is None:
            self._held = []

    def _resume(self):
        """Opened again (new id): send what waited."""
        held, self._held = self._held or [], None
        for batch in held:
            self._write(batch)

    async def _wait_until(self, condition):
        # Event.set wakes every waiter at once, so a waiter clearing it cannot make another miss it.
        while not condition():
            self._changed.clear()
            await self._changed.wait()

    # --- events (core.dispatch), in the reader task ----------------------------------------------

    def _receipt(self, batch, reply, error):
        if self._settle(batch, reply, error):
            batch.done.set()
            self._changed.set()

    def _ended(self, cls, arg):
        self._set_end(cls, arg)
        self._changed.set()

    def _fail_unsent(self):
        self._send_current()
        # kept for a reconnect that will not come (given up, or closed): they fail now
        held, self._held = self._held or [], None
        for batch in held:
            self._receipt(batch, None, self._end_error())


# --- consuming --------------------------------------------------------------------------------

class AsyncConsumer(ConsumerCore):
    """As sync.Consumer; `receive` and iteration are coroutines."""

    def __init__(self, client, reply, topic, subscription, sub_type, name, receiver_queue, on_active):
        super().__init__(reply, topic, subscription, sub_type, name, receiver_queue, on_active)
        self._client = client
        self._ready = deque()            # the receiver queue
        self._arrived = asyncio.Event()  # set when messages come or the consumer ends

    async def receive(self, timeout=None):
        if not self._ready:
            await self._wait_message(timeout)
        msg = self._ready.popleft()
        grant = self._grant()
        if grant and self._client.connected:
            self.flow(grant)
        return msg

    async def _wait_message(self, timeout):
        try:
            async with asyncio.timeout(timeout):
                while not self._ready:
                    if self._end is not None:
                        raise self._end_error()
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise TimeoutError(f"no message within {timeout}s") from None

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self.receive()
        except ConsumerClosed:
            raise StopAsyncIteration from None

    def flow(self, credits):
        self._client._send(self._flow_frame(credits))

    def _pause(self):
        """Lost, reconnecting: what is queued came from the old attachment (delivered again)."""
        self._ready.clear()

    def _resume(self):
        """Subscribed again: credits afresh, as at subscribe (auto_credit), or those granted and unused."""
        credits = self._credits_again()
        if credits:
            self._client._send({"op": "flow", "consumer": self.id, "credits": credits})

    async def ack(self, msg_or_ids, sync=False, timeout=10):
        await self._send_ack(self._ack_frames("ack", msg_or_ids, self._client._core.max_frame), sync, timeout)

    async def nack(self, msg_or_ids, delay_ms=None, sync=False, timeout=10):
        await self._send_ack(self._ack_frames("nack", msg_or_ids, self._client._core.max_frame, delay_ms),
                             sync, timeout)

    async def _send_ack(self, frames, sync, timeout):
        """The frames (each within max_frame); sync: wait until the broker answered every one."""
        if sync:
            await self._client._request_all(frames, timeout)
        else:
            for frame in frames:
                self._client._send(frame)

    async def close(self, timeout=10):
        if self._end is None:
            self._ended("closed")
            await self._client._close_remote(self, timeout)

    async def unsubscribe(self, timeout=10):
        await self._client.request(self._unsubscribe_frame(), timeout)
        self._ended("unsubscribed")
        self._client._core.detach(self)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # --- events (core.dispatch), in the reader task ----------------------------------------------

    def _deliver(self, messages):
        self._ready.extend(messages)
        self._arrived.set()

    def _ended(self, reason, raises=None):
        if self._set_end(reason, raises):
            self._ready.clear()
            self._arrived.set()
