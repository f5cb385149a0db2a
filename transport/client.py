"""Synchronous Python client of actorbroker (protocol v1, see PROTOCOL.md), thread-based.

One socket per Client. A reader thread decodes frames and dispatches them: replies to the
waiting caller by rid, pushes to their consumer or producer, broker pings answered at once. A
ticker thread sends the producers' batches when their linger time is up and pings the broker
when the connection has been quiet for heartbeat_ms. Every write goes through one lock.

    with Client("127.0.0.1", 6650) as client:
        producer = client.producer("/demo/orders")
        producer.send(b"hello", key="customer-42")     # batched, pipelined; returns a SendFuture
        consumer = client.subscribe("/demo/orders", "billing", "shared")
        for msg in consumer:
            consumer.ack(msg)
"""
import concurrent.futures
import itertools
import queue
import socket
import threading
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

__all__ = ["Client", "connect", "Producer", "Consumer", "Message", "SendFuture"]

READ_SIZE = 256 * 1024
DEAD_AFTER_HEARTBEATS = 3   # nothing at all received for this many heartbeats: the broker is gone


def connect(url=f"{DEFAULT_HOST}:{DEFAULT_PORT}", **options):
    """A Client connected to "host:port"."""
    host, port = parse_url(url)
    return Client(host, port, **options)


class Client:
    def __init__(self, host=DEFAULT_HOST, port=DEFAULT_PORT, *, token=None, heartbeat_ms=None,
                 name="actorbroker-py", connect_timeout=5.0):
        self.name = name
        self._sock = socket.create_connection((host, port), timeout=connect_timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.settimeout(None)
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()          # guards _pending, _attachments, _lost
        self._pending = {}                     # rid -> handler(reply frame or exception)
        self._attachments = Attachments()
        self._rids = itertools.count(1)
        self._lost = None                      # the ConnectionLost once the connection is gone
        self._closing = False
        self._last_error = None                # a fatal error without rid: why the broker closes
        self._decoder = FrameDecoder(max_frame=DEFAULT_MAX_FRAME)
        self._last_received = time.monotonic()
        self._timer = threading.Condition()    # guards _linger; wakes the ticker
        self._linger = {}                      # producer -> monotonic time its batch is due
        self._reader = threading.Thread(target=self._read_loop, name=f"{name}-reader", daemon=True)
        self._reader.start()
        try:
            self.welcome = self.request(hello_frame(name, token, heartbeat_ms), timeout=connect_timeout)
        except ConnectionLost:
            self.close()
            raise self._last_error or ConnectionLost("closed by the broker during hello") from None
        except BaseException:
            self.close()
            raise
        self.max_frame = self.welcome.get("max_frame", DEFAULT_MAX_FRAME)
        self.heartbeat_ms = self.welcome.get("heartbeat_ms", 5000)
        self._decoder.max_frame = max(self.max_frame, DEFAULT_MAX_FRAME)
        self._ticker = threading.Thread(target=self._tick_loop, name=f"{name}-ticker", daemon=True)
        self._ticker.start()

    # --- requests ------------------------------------------------------------------------------

    def request(self, frame, timeout=10):
        """Send `frame` with a new rid and return the reply; an `error` reply raises its typed error."""
        rid, waiter = self._call(frame)
        return self._wait(rid, waiter, timeout)

    def _call(self, frame, on_reply=None, opens=False):
        """Send a request; returns (rid, future). on_reply(frame) runs in the reader thread and
        gives the future's result. opens: a producer/subscribe, whose pushes may overtake it."""
        rid = next(self._rids)
        waiter = concurrent.futures.Future()

        def handle(result):
            try:
                if isinstance(result, BaseException):
                    waiter.set_exception(result)
                else:
                    waiter.set_result(on_reply(result) if on_reply else result)
            except BaseException as exc:
                waiter.set_exception(exc)
            finally:
                if opens:   # after on_reply attached the new id, which takes the pushes held for it
                    with self._lock:
                        self._attachments.end_open(rid)

        with self._lock:
            if self._lost:
                raise ConnectionLost(str(self._lost))
            self._pending[rid] = handle
            if opens:
                self._attachments.begin_open(rid)
        self._send(dict(frame, rid=rid))
        return rid, waiter

    def _wait(self, rid, waiter, timeout):
        try:
            return waiter.result(timeout)
        except concurrent.futures.TimeoutError:
            with self._lock:
                self._pending.pop(rid, None)
                self._attachments.end_open(rid)
            raise TimeoutError(f"no reply within {timeout}s") from None

    def _send(self, frame):
        if self._lost is not None:
            raise ConnectionLost(str(self._lost))
        data = encode_frame(frame)
        try:
            with self._write_lock:
                self._sock.sendall(data)
        except OSError as exc:
            self._connection_lost(ConnectionLost(f"write failed: {exc}"))
            raise ConnectionLost(str(exc)) from exc

    def _send_and_forget(self, frame):
        """A request whose answer nobody waits for (our pings): its reply is just dropped."""
        rid = next(self._rids)
        with self._lock:
            self._pending[rid] = lambda result: None
        self._send(dict(frame, rid=rid))

    # --- producers and consumers ---------------------------------------------------------------

    def producer(self, topic, *, name=None, dispatch=None, access=None, linger_ms=2, max_batch=500,
                 max_pending=10000, timeout=10):
        """Open a producer on `topic` (created if missing, with `dispatch`)."""
        def opened(reply):
            p = Producer(self, reply, name, linger_ms, max_batch, max_pending)
            self._attach("producer", p.id, p)
            return p

        rid, waiter = self._call(producer_frame(topic, name, dispatch, access), opened, opens=True)
        return self._wait(rid, waiter, timeout)

    def subscribe(self, topic, subscription, type="exclusive", consumer=None, *, start=None,
                  dispatch=None, receiver_queue=1000, max_unacked=None, ack_timeout_ms=None,
                  max_redeliveries=None, dead_letter_topic=None, auto_credit=True, on_active=None,
                  timeout=10):
        """Attach a consumer to `subscription` of `topic` (both created if missing).

        auto_credit: grant `receiver_queue` credits now and more as messages are taken (receive or
        iteration); False leaves credits to `consumer.flow(n)`. on_active(consumer, active) is
        called from the reader thread when a failover subscription tells this consumer its state."""
        name = consumer or default_consumer_name(self.name)
        frame = subscribe_frame(topic, subscription, type, name, start=start, dispatch=dispatch,
                                max_unacked=max_unacked, ack_timeout_ms=ack_timeout_ms,
                                max_redeliveries=max_redeliveries, dead_letter_topic=dead_letter_topic)

        def subscribed(reply):
            c = Consumer(self, reply, topic, subscription, type, name,
                         receiver_queue if auto_credit else None, on_active)
            self._attach("consumer", c.id, c)
            return c

        rid, waiter = self._call(frame, subscribed, opens=True)
        c = self._wait(rid, waiter, timeout)
        if auto_credit:
            c.flow(receiver_queue)
        return c

    def _attach(self, kind, ident, obj):
        # Runs in the reader thread, before any later frame is read: nothing can slip past.
        with self._lock:
            held = self._attachments.attach(kind, ident, obj)
        for push in held:
            obj._on_push(push)

    def _detach(self, kind, ident):
        with self._lock:
            self._attachments.detach(kind, ident)

    # --- admin ---------------------------------------------------------------------------------

    def topics(self, timeout=10):
        """[{name, dispatch, subscriptions, producers}, ...]"""
        return self.request({"op": "topics"}, timeout)["topics"]

    def stats(self, topic, timeout=10):
        return reply_fields(self.request({"op": "stats", "topic": topic}, timeout))

    def delete_topic(self, topic, timeout=10):
        self.request({"op": "delete_topic", "topic": topic}, timeout)

    def ping(self, timeout=10):
        """Round trip time in seconds."""
        start = time.monotonic()
        self.request({"op": "ping"}, timeout)
        return time.monotonic() - start

    # --- reading -------------------------------------------------------------------------------

    def _read_loop(self):
        reason = "connection closed by the broker"
        try:
            while True:
                data = self._sock.recv(READ_SIZE)
                if not data:
                    break
                self._last_received = time.monotonic()
                self._decoder.feed(data)
                for frame in self._decoder:
                    self._dispatch(frame)
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
            try:
                self._send({"op": "pong", "rid": frame.get("rid", 0)})
            except ConnectionLost:
                pass
        elif op in PUSH_OPS:
            with self._lock:
                target = self._attachments.route(frame)
            if target is not None:
                target._on_push(frame)
        elif "rid" in frame:
            with self._lock:
                handler = self._pending.pop(frame["rid"], None)
            if handler is not None:
                handler(error_from_frame(frame) if op == "error" else frame)
        elif op == "error":
            note_unanswered_error(self, error_from_frame(frame))

    # --- heartbeat and linger ------------------------------------------------------------------

    def _schedule_linger(self, producer, delay_s):
        with self._timer:
            if producer not in self._linger:
                self._linger[producer] = time.monotonic() + delay_s
                self._timer.notify()

    def _tick_loop(self):
        beat = self.heartbeat_ms / 1000
        last_ping = 0.0
        while self._lost is None:
            with self._timer:
                now = time.monotonic()
                due = [p for p, at in self._linger.items() if at <= now]
                for p in due:
                    del self._linger[p]
                if not due:
                    wake = min([now + beat / 4, *self._linger.values()])
                    self._timer.wait(wake - now)
            for p in due:
                p._send_current()
            now = time.monotonic()
            quiet = now - self._last_received
            try:
                if quiet > DEAD_AFTER_HEARTBEATS * beat:
                    silence = ConnectionLost(f"nothing received from the broker for {quiet:.1f}s")
                    self._connection_lost(silence)
                elif quiet >= beat and now - last_ping >= beat:
                    last_ping = now
                    self._send_and_forget({"op": "ping"})
            except ConnectionLost:
                return

    # --- the end -------------------------------------------------------------------------------

    def _connection_lost(self, error):
        with self._lock:
            if self._lost is not None:
                return
            self._lost = error
            pending, self._pending = self._pending, {}
            attached = self._attachments.take_all()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)   # wakes the reader if it is not the caller
        except OSError:
            pass
        with self._timer:
            self._timer.notify()
        for handler in pending.values():
            handler(ConnectionLost(str(error)))
        for obj in attached:
            obj._on_lost(error, self._closing)

    @property
    def connected(self):
        return self._lost is None

    def close(self, timeout=5.0):
        """Send what producers still buffer (waiting up to `timeout` for it), then close the socket."""
        if self._lost is None and not self._closing:
            with self._lock:
                producers = [o for o in self._attachments.by_id.values() if isinstance(o, Producer)]
            deadline = time.monotonic() + timeout
            for p in producers:
                try:
                    p.flush(max(0.0, deadline - time.monotonic()))
                except Exception:   # closing anyway; the futures tell what became of each send
                    pass
        self._closing = True
        self._connection_lost(ConnectionLost("client closed"))
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout)
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- producing --------------------------------------------------------------------------------

class _SyncBatch(Batch):
    """A batch whose senders wait on an Event for the receipt."""

    def __init__(self):
        super().__init__()
        self.done = threading.Event()
        self.first = None
        self.error = None


class SendFuture:
    """The offset one message will get; `result(timeout)` waits for the receipt of its batch."""
    __slots__ = ("_batch", "_index")

    def __init__(self, batch, index):
        self._batch, self._index = batch, index

    def done(self):
        return self._batch.done.is_set()

    def exception(self, timeout=None):
        if not self._batch.done.wait(timeout):
            raise TimeoutError(f"no receipt within {timeout}s")
        return self._batch.error

    def result(self, timeout=None):
        error = self.exception(timeout)
        if error is not None:
            raise error
        return self._batch.first + self._index


class Producer:
    """Sends messages to one topic, batched (max_batch messages or linger_ms, whichever comes
    first, never over max_frame) and pipelined (up to max_pending messages buffered or in flight;
    `send` blocks beyond that)."""

    def __init__(self, client, reply, name, linger_ms, max_batch, max_pending):
        self.id = reply["producer"]
        self.topic = reply.get("topic")
        self.dispatch = reply.get("dispatch")
        self.name = name or f"producer-{self.id}"    # the broker's default name
        self.closed_reason = None
        self._client = client
        self._linger_s = max(0.0, linger_ms / 1000)
        self._max_pending = max(1, max_pending)
        self._max_message = max_message_size(client.max_frame, self.name)
        self._batcher = Batcher(client.max_frame, max_batch, _SyncBatch)
        self._send_lock = threading.Lock()     # held while a batch is built and written: keeps order
        self._flow = threading.Condition()     # guards _outstanding; never held during I/O
        self._outstanding = 0                  # messages buffered or waiting for their receipt
        self._end = None                       # (exception class, argument) sends fail with once closed

    def send(self, payload, key=None, attrs=None):
        """Queue one message (bytes, or str sent as UTF-8); returns its SendFuture."""
        record, size = record_for(payload, key, attrs)
        if size > self._max_message:
            raise too_large(size, self._max_message)
        with self._flow:
            while self._outstanding >= self._max_pending and self._end is None:
                self._flow.wait()
            if self._end is not None:
                raise self._end_error()
            self._outstanding += 1
        with self._send_lock:
            if self._end is not None:
                self._release(1)
                raise self._end_error()
            batch, index, ready = self._batcher.add(record, size)
            for full in ready:
                self._write(full)
            lingering = batch is self._batcher.current and index == 0
        if lingering:
            self._client._schedule_linger(self, self._linger_s)
        return SendFuture(batch, index)

    def send_sync(self, payload, key=None, attrs=None, timeout=10):
        """Send one message now and return its offset."""
        future = self.send(payload, key, attrs)
        self._send_current()
        return future.result(timeout)

    def flush(self, timeout=10):
        """Send what is buffered and wait until every message sent so far has its receipt."""
        self._send_current()
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        with self._flow:
            while self._outstanding:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self._outstanding} messages without receipt after {timeout}s")
                self._flow.wait(min(left, 1.0))
        if self._end is not None and self._end[0] is ConnectionLost:
            raise self._end_error()

    def close(self, timeout=10):
        """Flush, then close the producer on the broker."""
        if self._end is not None:
            return
        try:
            self.flush(timeout)
        finally:
            self._ended(ProducerClosed, "closed")
            self._client._detach("producer", self.id)
            try:
                self._client.request({"op": "close_producer", "producer": self.id}, timeout)
            except (UnknownProducer, ConnectionLost):
                pass   # already gone: nothing left to close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _send_current(self):
        """Send the batch being filled (linger time up, flush), or fail it if closed meanwhile."""
        with self._send_lock:
            batch = self._batcher.take()
            if batch is None:
                return
            if self._end is not None:
                self._settle(batch, error=self._end_error())
            else:
                self._write(batch)

    def _write(self, batch):
        client = self._client
        try:
            _, waiter = client._call({"op": "send", "producer": self.id, "msgs": batch.records},
                                     on_reply=lambda reply: self._settle(batch, reply=reply))
        except ConnectionLost as exc:
            self._settle(batch, error=exc)
            return

        def on_error(future):   # error answer or lost connection; a receipt settled it already
            if future.exception() is not None:
                self._settle(batch, error=future.exception())
        waiter.add_done_callback(on_error)

    def _settle(self, batch, reply=None, error=None):
        """Resolve a batch's futures once, with its receipt or an error."""
        if reply is not None and reply.get("count") != len(batch.records):
            error = BrokerError("INTERNAL", f"receipt counts {reply.get('count')} messages, "
                                            f"the send had {len(batch.records)}")
        with self._flow:
            if batch.done.is_set():
                return
            batch.error = error
            batch.first = None if error else reply["first"]
            batch.done.set()
        self._release(len(batch.records))

    def _release(self, count):
        with self._flow:
            self._outstanding -= count
            self._flow.notify_all()

    def _ended(self, cls, arg):
        with self._flow:
            if self._end is None:
                self._end = (cls, arg)
            self._flow.notify_all()

    def _end_error(self):
        cls, arg = self._end
        return cls(arg)

    def _on_push(self, frame):
        if frame["op"] == "closed":
            self.closed_reason = frame.get("reason", "closed")
            self._ended(ProducerClosed, self.closed_reason)
            self._client._detach("producer", self.id)
            self._fail_unsent()

    def _on_lost(self, error, client_closing):
        if self.closed_reason is None:
            self.closed_reason = "client_closed" if client_closing else "connection_lost"
        self._ended(ConnectionLost, str(error))
        self._fail_unsent()

    def _fail_unsent(self):
        # Called from the reader thread, which must not wait for _send_lock (its holder may be
        # blocked writing): a short-lived thread fails the batch that will never be sent.
        threading.Thread(target=self._send_current, daemon=True).start()


# --- consuming --------------------------------------------------------------------------------

_END = object()   # queued after the last message a consumer will hand out


class Consumer:
    """Messages of one subscription, in a local receiver queue filled against credits."""

    def __init__(self, client, reply, topic, subscription, sub_type, name, receiver_queue, on_active):
        self.id = reply["consumer"]
        self.dispatch = reply.get("dispatch")
        self.topic, self.subscription, self.type, self.name = topic, subscription, sub_type, name
        self.active = None            # failover: set by the broker's `active` pushes
        self.closed_reason = None
        self.on_active = on_active
        self._client = client
        self._queue = queue.SimpleQueue()
        self._credits = CreditWindow(receiver_queue) if receiver_queue else None
        self._credit_lock = threading.Lock()
        self._end = None              # (exception class, argument) that receive raises once closed

    def receive(self, timeout=None):
        """The next message; TimeoutError if none within `timeout`; ConsumerClosed once the
        consumer is closed (ConnectionLost if the connection died)."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message within {timeout}s") from None
        if item is _END:
            self._queue.put(_END)     # for the next caller too
            cls, arg = self._end
            raise cls(arg)
        if self._credits is not None:
            with self._credit_lock:
                grant = self._credits.take()
            if grant and self._end is None:
                self._try(self.flow, grant)
        return item

    def __iter__(self):
        while True:
            try:
                yield self.receive()
            except ConsumerClosed:
                return

    def flow(self, credits):
        """Allow the broker to send `credits` more messages."""
        self._client._send({"op": "flow", "consumer": self.id, "credits": credits})

    def ack(self, msg_or_ids, sync=False, timeout=10):
        """Acknowledge messages (a Message, an id, or an iterable of them) for the subscription;
        sync: wait for the broker's ok."""
        self._settle_ids("ack", msg_or_ids, sync, timeout)

    def nack(self, msg_or_ids, delay_ms=None, sync=False, timeout=10):
        """Ask for redelivery (reliable topics), after delay_ms if given."""
        self._settle_ids("nack", msg_or_ids, sync, timeout, delay_ms=delay_ms)

    def _settle_ids(self, op, msg_or_ids, sync, timeout, delay_ms=None):
        ids = ids_of(msg_or_ids)
        if not ids:
            return
        frame = {"op": op, "consumer": self.id, "ids": ids}
        if delay_ms is not None:
            frame["delay_ms"] = delay_ms
        if sync:
            self._client.request(frame, timeout)
        else:
            self._client._send(frame)

    def close(self, timeout=10):
        """Detach from the subscription; its unacknowledged messages go back to it."""
        if self._end is not None:
            return
        self._ended("closed")
        self._client._detach("consumer", self.id)
        try:
            self._client.request({"op": "close_consumer", "consumer": self.id}, timeout)
        except (UnknownConsumer, ConnectionLost):
            pass   # already gone: nothing left to close

    def unsubscribe(self, timeout=10):
        """Detach and delete the subscription (its other consumers are closed by the broker)."""
        self._client.request({"op": "unsubscribe", "consumer": self.id}, timeout)
        self._ended("unsubscribed")
        self._client._detach("consumer", self.id)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _on_push(self, frame):
        op = frame["op"]
        if op == "message":
            if self._end is None:
                for record in frame["msgs"]:
                    self._queue.put(message_from_record(record, self.id))
        elif op == "active":
            self.active = bool(frame.get("active"))
            if self.on_active is not None:
                self.on_active(self, self.active)
        elif op == "closed":
            self._ended(frame.get("reason", "closed"))
            self._client._detach("consumer", self.id)

    def _on_lost(self, error, client_closing):
        if client_closing:
            self._ended("client_closed")
        else:
            self._ended("connection_lost", (ConnectionLost, str(error)))

    def _ended(self, reason, raises=None):
        """Closed: drop what is queued (its messages go back to the subscription) and end receive."""
        if self._end is not None:
            return
        self.closed_reason = reason
        self._end = raises or (ConsumerClosed, reason)
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._queue.put(_END)

    @staticmethod
    def _try(fn, *args):
        try:
            fn(*args)
        except ConnectionLost:
            pass   # receive will tell, once the queue is drained
