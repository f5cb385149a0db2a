"""Synchronous Python client of actorbroker (protocol v1, see PROTOCOL.md), thread-based.

One socket per Client; the protocol itself is core.ClientCore's. A reader thread feeds it what
the socket receives and carries out the events it returns: replies to the waiting caller,
messages to their consumer's receiver queue, pongs to broker pings. A ticker thread sends the
producers' batches when their linger time is up and runs the heartbeat. Writes go through one
lock; no lock is held while a thread waits for the socket, except that write lock.

    with Client("127.0.0.1", 6650) as client:
        producer = client.producer("/demo/orders")
        producer.send(b"hello", key="customer-42")     # batched, pipelined; returns a SendFuture
        consumer = client.subscribe("/demo/orders", "billing", "shared")
        for msg in consumer:
            consumer.ack(msg)
"""
import select
import socket
import struct
import threading
import time
from collections import deque

from actorbroker.transport.client.core import (
    ADMIN, DEFAULT_HOST, DEFAULT_PORT, READ_SIZE, Batch, BatchFuture, ClientCore, ConsumerCore, Message,
    ProducerCore, Reconnect, call_back, dispatch, end_unopened, first_addresses, hello_frame, next_seed_may_help,
    open_consumer, open_producer, parse_address, read_failure)
from actorbroker.transport.client.tls import TlsSocket, client_context, server_name
from actorbroker.transport.codec import PROTOCOL_VERSION
from actorbroker.transport.errors import ConnectionLost, ConsumerClosed, ProducerClosed

__all__ = ["Client", "connect", "Producer", "Consumer", "Message", "SendFuture"]

READER_VERDICT_S = 0.5   # a failed write waits this long for the reader to say why the peer closed


def connect(url=f"{DEFAULT_HOST}:{DEFAULT_PORT}", **options):
    """A Client connected to "host:port" or "tls://host:port" (options: as Client's; `tls` is
    then a TlsOptions, or the system's CAs by default)."""
    host, port, tls = parse_address(url)
    if tls and not options.get("tls"):
        options["tls"] = True
    return Client(host, port, **options)



class _NoReplyYet(Exception):
    """Reply.result timed out (the reply may still come; the caller forgets the request)."""


class Reply:
    """The outcome of one request, settled once by the reader thread and awaited by the caller.
    (concurrent.futures.Future would do, but imports logging and traceback: 2.7 MB more in every
    client process, which a process killed with -9 pays for in its exit before its sockets close.)"""
    __slots__ = ("_event", "_value", "_error")

    def __init__(self):
        self._event = threading.Event()
        self._value = self._error = None

    def done(self):
        return self._event.is_set()

    def set_result(self, value):
        self._value = value
        self._event.set()

    def set_exception(self, error):
        self._error = error
        self._event.set()

    def result(self, timeout=None):
        if not self._event.wait(timeout):
            raise _NoReplyYet()
        if self._error is not None:
            raise self._error
        return self._value

class Client:
    def __init__(self, host=DEFAULT_HOST, port=DEFAULT_PORT, *, token=None, heartbeat_ms=None,
                 name="actorbroker-py", connect_timeout=5.0, tls=None, reconnect=None, on_reconnect=None,
                 protocol_version=PROTOCOL_VERSION):
        """tls: None (plain TCP), True (TLS, the system's CAs), a TlsOptions or an ssl.SSLContext.
        reconnect: None (a lost connection ends the client), True (reconnect to host:port with
        the defaults) or a core.Reconnect (seed addresses, backoff, when to give up): the client
        then connects again by itself and reopens its producers and consumers (see Reconnect);
        on_reconnect(client) is called, from a thread of the client, once they are back.
        protocol_version: 2 (batched pushes, docs/protocol.md) or 1 (PROTOCOL.md as written)."""
        self.name = name
        self._core = core = ClientCore(name)
        if reconnect is True:
            reconnect = Reconnect([(host, port)])
        self._reconnect, self._on_reconnect = reconnect, on_reconnect
        core.reopens = reconnect is not None
        self._hello = (token, heartbeat_ms, tls, connect_timeout, protocol_version)
        self._finished = threading.Event()     # closed for good (not reconnecting)
        self._lost_seen = threading.Event()    # the connection was found lost (since the last connect)
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()          # guards the core; never held during I/O
        self._timer = threading.Condition()    # guards _linger; wakes the ticker
        self._linger = {}                      # producer -> monotonic time its batch is due
        self._events = deque()                 # event frames of a watch, oldest first
        self._events_ready = threading.Condition()
        self._sock = None
        self.welcome = self._first_connect(first_addresses((host, port), reconnect))
        self.max_frame, self.heartbeat_ms = core.max_frame, core.heartbeat_ms
        self._reader = threading.Thread(target=self._read_loop, name=f"{name}-reader", daemon=True)
        self._reader.start()
        self._ticker = threading.Thread(target=self._tick_loop, name=f"{name}-ticker", daemon=True)
        self._ticker.start()

    def _first_connect(self, addresses):
        """Connect and hello to the first address (of a Reconnect's seeds) that takes us; the
        welcome. One that cannot be reached, or hangs up, times out or is OVERLOADED during
        hello, makes way for the next (as NATS's clients); a refusal every broker would repeat
        (AUTH_FAILED, UNSUPPORTED_VERSION, ...) is raised at once. None takes us: the first error."""
        token, heartbeat_ms, tls, timeout, version = self._hello
        errors = []
        for host, port in addresses:
            try:
                self._sock = open_socket(host, port, tls, timeout)
            except OSError as exc:
                errors.append(exc)
                continue
            self._core.restart(time.monotonic())
            try:
                return self._handshake(hello_frame(self.name, token, heartbeat_ms, version), timeout)
            except Exception as exc:   # noqa: BLE001
                self._sock.close()
                if isinstance(exc, TimeoutError):
                    error = TimeoutError(f"no answer to hello from {host}:{port} within {timeout}s")
                else:
                    error = self._core.hello_error(ConnectionLost(str(exc)) if isinstance(exc, OSError) else exc)
                errors.append(error)
                if not next_seed_may_help(error):
                    raise error from None
        raise errors[0]

    # --- requests ------------------------------------------------------------------------------

    def request(self, frame, timeout=10):
        """Send `frame` with a new rid and return the reply; an `error` reply raises its typed error."""
        return self._wait(*self._call(frame), timeout)

    def _call(self, frame, make=None, kind=None):
        """Send a request; returns (rid, future). make(reply), run in the reader thread, gives the
        future's result; kind: "producer" | "consumer" when it opens one (see ClientCore.request)."""
        waiter = Reply()
        with self._lock:
            rid, data = self._core.request(frame, waiter, make, kind)
        self._write(data)
        return rid, waiter

    def _wait(self, rid, waiter, timeout):
        try:
            return waiter.result(timeout)
        except _NoReplyYet:
            with self._lock:
                pending = self._core.forget(rid)
        if not pending:   # the reply came meanwhile: the reader is settling the waiter now
            try:
                return waiter.result(READER_VERDICT_S)
            except _NoReplyYet:
                pass
        raise TimeoutError(f"no reply within {timeout}s")

    def _request_all(self, frames, timeout):
        """Send the requests at once, then wait for all their replies (within `timeout` in all);
        the first error of any of them is raised once all have answered."""
        calls = [self._call(frame) for frame in frames]
        deadline = None if timeout is None else time.monotonic() + timeout
        error = None
        for rid, waiter in calls:
            try:
                self._wait(rid, waiter, None if deadline is None else max(0.0, deadline - time.monotonic()))
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error

    @staticmethod
    def _settle(waiter, result, error):
        if error is None:
            waiter.set_result(result)
        else:
            waiter.set_exception(error)

    def _send(self, frame):
        """A frame without rid (flow, ack, nack)."""
        self._write(self._core.one_way(frame))

    def _send_batch(self, producer, batch):
        with self._lock:
            data = self._core.send_request(producer, batch)
        self._write(data)

    def _write(self, data, wait=True):
        """Write data (whole frames); wait=False: not if another thread is writing (then False)."""
        sock = self._sock
        if not self._write_lock.acquire(blocking=wait):
            return False
        try:
            try:
                limit_s = 2 * self._core.heartbeat_ms / 1000
                core = self._core   # (last_received: the reader's, a float read without the lock)
                if isinstance(sock, TlsSocket):
                    sock.sendall(data, lambda raw, out: write_within(raw, out, limit_s, lambda: core.last_received))
                else:
                    write_within(sock, data, limit_s, lambda: core.last_received)
            finally:
                self._write_lock.release()
        except BlockingIOError:   # bound_send_wait / write_within: the broker stopped reading
            error = ConnectionLost(f"the broker read too little and said nothing for {2 * self._core.heartbeat_ms} ms "
                                   "(2 heartbeats)")
            with self._lock:
                lost = self._core.lost
            if lost is None and sock is self._sock:
                self._connection_lost(error)
            raise ConnectionLost(str(lost or error)) from None
        except OSError as exc:
            # The peer closed: what it said last (a fatal error frame, a TLS alert such as
            # UNKNOWN_CA) is in the read buffer, and the reader is about to read it. Give it a
            # moment to tell why, rather than reporting the broken pipe the write saw.
            if threading.current_thread() is not self._reader:
                self._lost_seen.wait(READER_VERDICT_S)
            with self._lock:
                lost = self._core.lost
            if lost is None and sock is self._sock:
                self._connection_lost(ConnectionLost(f"write failed: {exc}"))
            raise ConnectionLost(str(lost or exc)) from exc
        return True

    def _write_quietly(self, data, wait=True):
        try:
            self._write(data, wait)
        except ConnectionLost:
            pass   # the reader will find out too

    # --- producers and consumers ---------------------------------------------------------------

    def producer(self, topic, *, name=None, dispatch=None, access=None, linger_ms=2, max_batch=500,
                 max_pending=10000, timeout=10):
        """Open a producer on `topic` (created if missing, with `dispatch`)."""
        frame, make = open_producer(self, Producer, topic, name, dispatch, access, linger_ms,
                                    max_batch, max_pending)
        return self._wait(*self._call(frame, make, "producer"), timeout)

    def subscribe(self, topic, subscription, type="exclusive", consumer=None, *, receiver_queue=1000,
                  auto_credit=True, on_active=None, timeout=10, **options):
        """Attach a consumer to `subscription` of `topic` (both created if missing).

        options: start, dispatch, max_unacked, ack_timeout_ms, max_redeliveries, dead_letter_topic
        (see PROTOCOL.md, subscribe). auto_credit: grant `receiver_queue` credits now and more as
        messages are taken (receive or iteration); False leaves credits to `consumer.flow(n)`
        (those granted and unused are granted again when the consumer is opened again).
        on_active(consumer, active) is called from the reader thread when a failover subscription
        tells this consumer its state (what it raises is logged on `actorbroker.client`)."""
        frame, make = open_consumer(self, Consumer, topic, subscription, type, consumer,
                                    receiver_queue, auto_credit, on_active, options)
        c = self._wait(*self._call(frame, make, "consumer"), timeout)
        if auto_credit:
            c.flow(receiver_queue)
        return c

    def _detach(self, obj):
        with self._lock:
            self._core.detach(obj)

    def _close_remote(self, obj, timeout):
        """Detach a producer or consumer and close it on the broker (ClientCore.close_request)."""
        waiter = Reply()
        with self._lock:
            request = self._core.close_request(obj, waiter)
        if request is not None:
            self._write_quietly(request[1])
            self._wait(request[0], waiter, timeout)

    # --- admin ---------------------------------------------------------------------------------

    def _admin(self, op, timeout, *args):
        frame_of, result_of = ADMIN[op]
        return result_of(self.request(frame_of(*args), timeout))

    def topics(self, timeout=10):
        """[{name, dispatch, subscriptions, producers}, ...]; `.truncated` is True when the broker
        cut the list to fit its max_frame (some topics are missing)."""
        return self._admin("topics", timeout)

    def stats(self, topic, timeout=10):
        return self._admin("stats", timeout, topic)

    def delete_topic(self, topic, timeout=10):
        self._admin("delete_topic", timeout, topic)

    def lookup(self, topic, timeout=10):
        """{topic, node, exists, available, address?, dispatch?}: the node that owns the topic."""
        return self._admin("lookup", timeout, topic)

    def cluster(self, timeout=10):
        """[{node, role, state, address, heartbeat_age_ms, connections, topics, self}, ...]"""
        return self._admin("cluster", timeout)

    def broker_stats(self, timeout=10):
        """{topics, connections, shards, processes, memory_bytes} (docs/protocol.md)"""
        return self._admin("broker_stats", timeout)

    def ping(self, timeout=10):
        """Round trip time in seconds."""
        start = time.monotonic()
        self._admin("ping", timeout)
        return time.monotonic() - start

    # --- the lifecycle event stream (docs/protocol.md, "Events") ---------------------------------

    def watch(self, topics="*", timeout=10):
        """Receive the broker's lifecycle events about topics matching `topics` (a shell-style
        pattern; connection events always): read them with next_event()."""
        self._admin("watch", timeout, topics)

    def unwatch(self, timeout=10):
        self._admin("unwatch", timeout)

    def next_event(self, timeout=None):
        """The next event frame ({"op": "event", "seq", "time_ms", "kind", ...}); TimeoutError if
        none comes in time, ConnectionLost once the connection is gone and all were read."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._events_ready:
            while not self._events:
                if self._core.lost is not None:
                    raise ConnectionLost(str(self._core.lost))
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no event within {timeout}s")
                self._events_ready.wait(left)
            return self._events.popleft()

    def _event(self, frame):
        with self._events_ready:
            self._events.append(frame)
            self._events_ready.notify_all()

    # --- reading, linger and heartbeat ---------------------------------------------------------

    def _read_loop(self):
        while True:
            reason = "connection closed by the broker"
            try:
                while data := self._sock.recv(READ_SIZE):
                    with self._lock:
                        events = self._core.receive_data(data, time.monotonic())
                    dispatch(events, self)
            except Exception as exc:
                reason = read_failure(exc)
            self._connection_lost(ConnectionLost(self._core.end_reason(reason)))
            if self._reconnect is None or self._core.closing or not self._connect_again():
                break
        self._give_up()

    # --- reconnecting (the reader thread's) --------------------------------------------------

    def _connect_again(self):
        """Connect to a seed address (Reconnect), hello, then reopen the kept producers and
        consumers; False once the client gives up or is closed."""
        token, heartbeat_ms, tls, timeout, version = self._hello
        for (host, port), delay in self._reconnect.attempts(time.monotonic, lambda: self._core.closing):
            if self._finished.wait(delay):
                return False
            try:
                sock = open_socket(host, port, tls, timeout)
            except OSError:
                continue
            with self._lock:
                self._core.restart(time.monotonic())
                self._sock = sock
                self._lost_seen.clear()
            try:
                self._handshake(hello_frame(self.name, token, heartbeat_ms, version), timeout)
            except Exception:
                self._connection_lost(ConnectionLost("reconnect: hello failed"))
                continue
            threading.Thread(target=self._reopen_all, name=f"{self.name}-reopen", daemon=True).start()
            return True
        return False

    def _handshake(self, frame, timeout):
        """hello on the new socket, read here (the reader thread's, or before it starts); the welcome."""
        rid, waiter = self._call(frame)
        deadline = time.monotonic() + timeout
        try:
            while not waiter.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no answer to hello within {timeout}s")
                self._sock.settimeout(left)
                data = self._sock.recv(READ_SIZE)
                if not data:
                    raise ConnectionLost("closed during hello")
                with self._lock:
                    events = self._core.receive_data(data, time.monotonic())
                dispatch(events, self)
        except BaseException:
            with self._lock:
                self._core.forget(rid)
            raise
        self._sock.settimeout(None)
        welcome = waiter.result(0)
        self._core.welcomed(welcome)
        bound_send_wait(self._sock, self._core.heartbeat_ms)
        return welcome

    def _reopen_later(self, obj):
        """The broker closed obj for a reason the client recovers from (a broker process died,
        core.REOPEN_REASONS): open it again, as after a reconnect, from a thread of its own."""
        obj._pause()
        threading.Thread(target=self._reopen_all, args=(False,), name=f"{self.name}-reopen", daemon=True).start()

    def _reopen_all(self, reconnected=True):
        """Open every kept producer and consumer again, resume them, then tell on_reconnect (after
        a reconnect). One refused as busy, or by a topic or subscription still restarting, is
        tried again a little later (ClientCore.reopen_retry)."""
        with self._lock:
            kept = self._core.take_detached()
        while kept:
            opened = []
            for obj in kept:
                try:
                    opened.append((obj, *self._call_reopen(obj)))
                except ConnectionLost as exc:
                    opened.append((obj, None, exc))
            retry, kept = [], []
            for obj, waiter, error in opened:
                try:
                    if waiter is not None:
                        self._wait_reopened(waiter)
                        with self._lock:
                            closing = self._core.reopened(obj)
                        if closing is None:
                            obj._resume()
                        else:   # closed by the application meanwhile
                            self._write_quietly(closing)
                        continue
                except _NoReplyYet:
                    error = ConnectionLost("reopening it: no answer before the connection was lost")
                except Exception as exc:
                    error = exc
                with self._lock:
                    delay = self._core.reopen_retry(obj, error, time.monotonic(), self._reconnect)
                    ends = delay is None and self._core.reopen_failed(obj, error)
                    reason = self._core.reopen_reason(obj) if ends else None
                if delay is not None:
                    retry.append((delay, obj))
                elif ends:
                    end_unopened(obj, reason, error)
            if retry:
                if self._finished.wait(min(delay for delay, _ in retry)):   # closed meanwhile
                    for _, obj in retry:
                        obj._lost(self._core.lost or ConnectionLost("client closed"), self._core.closing)
                    return
                kept = [obj for _, obj in retry]
        if reconnected and self._on_reconnect is not None and self.connected:
            call_back(self._on_reconnect, self)

    def _wait_reopened(self, waiter):
        """The broker answers every request (a topic restarting may take until its request deadline,
        30 s by default), and a lost connection settles what waits: given up after a while, a late
        reopen was never resumed nor ended, and opened on the broker for nobody."""
        while True:
            try:
                return waiter.result(self._hello[3] * 2)
            except _NoReplyYet:
                if not self.connected:
                    raise

    def _call_reopen(self, obj):
        waiter = Reply()
        with self._lock:
            rid, data = self._core.reopen_request(obj, waiter)
        self._write(data)
        return waiter, None

    def _give_up(self):
        """Closed for good: what was kept for a reconnect ends as lost."""
        with self._lock:
            kept = self._core.take_detached(final=True)
        for obj in kept:
            obj._lost(self._core.lost or ConnectionLost("client closed"), self._core.closing)
        self._finished.set()

    def wait_closed(self, timeout=None):
        """Wait until the client is closed for good (close(), or a loss it does not reconnect
        from); returns whether it is."""
        return self._finished.wait(timeout)

    def _schedule_linger(self, producer, delay_s):
        with self._timer:
            if producer not in self._linger:
                self._linger[producer] = time.monotonic() + delay_s
                self._timer.notify()

    def _tick_loop(self):
        beat = self.heartbeat_ms / 1000
        while not self._finished.is_set() and (self._core.lost is None or self._reconnect is not None):
            with self._timer:
                now = time.monotonic()
                due = [p for p, at in self._linger.items() if at <= now]
                for p in due:
                    del self._linger[p]
                if not due:
                    self._timer.wait(min([now + beat / 4, *self._linger.values()]) - now)
            for p in due:   # never waits for a sender blocked writing: the heartbeat check must run
                p._send_current(wait=False)
            with self._lock:
                ping, dead = self._core.heartbeat(time.monotonic())
            if dead is not None:
                self._connection_lost(dead)
            elif ping is not None:   # not while a sender writes: it may be stuck (then it fails)
                self._write_quietly(ping, wait=False)

    # --- the end -------------------------------------------------------------------------------

    def _connection_lost(self, error):
        self._lost_seen.set()
        keep = self._reconnect is not None and not self._core.closing
        with self._lock:
            events = self._core.connection_lost(error, keep)
            paused = list(self._core.detached) if keep else []
        if events is None:
            return
        for obj in paused:
            obj._pause()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)   # wakes the reader if it is not the caller
        except OSError:
            pass
        with self._timer:
            self._timer.notify()
        with self._events_ready:
            self._events_ready.notify_all()
        dispatch(events, self)

    @property
    def connected(self):
        return self._core.lost is None

    @property
    def _lost(self):
        return self._core.lost

    @property
    def _closing(self):
        return self._core.closing

    def close(self, timeout=5.0):
        """Send what producers still buffer (waiting up to `timeout` for it), then close the socket."""
        core = self._core
        if core.lost is None and not core.closing:
            with self._lock:
                producers = core.producers()
            deadline = time.monotonic() + timeout
            for p in producers:
                try:
                    p.flush(max(0.0, deadline - time.monotonic()))
                except Exception:   # closing anyway; the futures tell what became of each send
                    pass
        core.closing = True
        self._finished.set()      # also ends a reconnect's wait
        self._connection_lost(ConnectionLost("client closed"))
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout)
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_within(sock, data, limit_s, heard=None):
    """sendall, failing with BlockingIOError once the write has taken limit_s without the broker
    saying anything meanwhile (heard(): when we last received bytes from it). SO_SNDTIMEO
    (bound_send_wait) bounds one send call only, and a broker that stopped reading still takes a
    little now and then (its socket's window): each bit taken started sendall's wait anew (a
    100 KB send to a frozen broker blocked 30 s with heartbeats of 5 s). A broker that holds our
    bytes back while it works (backpressure: our sends wait for a slow disk) keeps talking:
    receipts, or a ping each heartbeat; then the wait goes on."""
    start = time.monotonic()
    view = memoryview(data)
    try:   # all of it, but for a broker that reads slower than we write
        view = view[sock.send(view, socket.MSG_DONTWAIT):]
    except BlockingIOError:
        pass
    if not view:
        return
    deadline = start + limit_s
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    while view:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            if heard is not None and heard() > deadline - limit_s:   # it spoke in this window
                deadline = time.monotonic() + limit_s
                continue
            raise BlockingIOError(f"{len(view)} of {len(data)} bytes unwritten after {limit_s} s")
        try:
            view = view[sock.send(view, socket.MSG_DONTWAIT):]
        except BlockingIOError:
            continue


def bound_send_wait(sock, heartbeat_ms):
    """A write that cannot go on for two heartbeats fails (SO_SNDTIMEO) instead of blocking its
    thread for good: a broker that stopped reading is as dead as one that stopped talking, and a
    thread stuck in sendall would hold the write lock that the heartbeat's ping needs."""
    wait_ms = 2 * heartbeat_ms
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack("ll", wait_ms // 1000, wait_ms % 1000 * 1000))




def open_socket(host, port, tls, timeout):
    """A connected socket, with TLS (handshake done) when `tls` is set."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            return TlsSocket(sock, client_context(tls), server_name(tls, host), timeout)
        return sock
    except BaseException:
        sock.close()
        raise


# --- producing --------------------------------------------------------------------------------

def _new_batch():
    return Batch(threading.Event())


class SendFuture(BatchFuture):
    """The offset one message will get; `result(timeout)` waits for the receipt of its batch."""
    __slots__ = ()

    def exception(self, timeout=None):
        if not self._batch.done.wait(timeout):
            raise TimeoutError(f"no receipt within {timeout}s")
        return self._batch.error

    def result(self, timeout=None):
        self.exception(timeout)
        return self._batch.offset(self._index)


class Producer(ProducerCore):
    """Sends messages to one topic, batched (max_batch messages or linger_ms, whichever comes
    first, never over max_frame) and pipelined (up to max_pending messages buffered or in flight;
    `send` blocks beyond that)."""

    def __init__(self, client, reply, name, linger_ms, max_batch, max_pending):
        super().__init__(reply, name, linger_ms, max_batch, max_pending, client.max_frame, _new_batch)
        self._client = client
        # _lock guards the batcher, _outstanding, _end and _outbox, and is never held during I/O;
        # _room is notified when _outstanding drops or the producer ends.
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._outbox = deque()                   # complete batches to write, in order
        self._write_order = threading.Lock()     # held while the outbox is written: batches stay in order
        self._paused = False                     # reconnecting: batches wait in the outbox

    def send(self, payload, key=None, attrs=None):
        """Queue one message (bytes, or str sent as UTF-8); returns its SendFuture."""
        record, size = self._record(payload, key, attrs)
        with self._lock:
            while self._outstanding >= self._max_pending and self._end is None:
                self._room.wait()
            if self._end is not None:
                raise self._end_error()
            batch, index, ready, lingering = self._add(record, size)
            if ready:
                self._outbox.extend(ready)
        if ready:
            self._write_outbox()
        if self._flushing:   # a flush waits for this one too: it must not linger
            self._send_current()
        elif lingering:
            self._client._schedule_linger(self, self._linger_s)
        return SendFuture(batch, index)

    def send_sync(self, payload, key=None, attrs=None, timeout=10):
        """Send one message now and return its offset."""
        future = self.send(payload, key, attrs)
        self._send_current()
        return future.result(timeout)

    def flush(self, timeout=10):
        """Send what is buffered and wait until every message sent so far has its receipt."""
        with self._lock:
            self._flushing += 1
        try:
            self._send_current()
            deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
            with self._lock:
                while self._outstanding:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"{self._outstanding} messages without receipt after {timeout}s")
                    self._room.wait(min(left, 1.0))
        finally:
            with self._lock:
                self._flushing -= 1
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
            self._client._close_remote(self, timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _send_current(self, wait=True):
        """Send the batch being filled (linger time up, flush)."""
        with self._lock:
            batch = self._batcher.take()
            if batch is None:
                return
            self._outbox.append(batch)
        self._write_outbox(wait)

    def _write_outbox(self, wait=True):
        """Write the complete batches, in order, or fail them if the producer ended meanwhile.
        wait=False: if another thread is writing, leave them to it (it looks at the outbox again
        after letting go of the write, so a batch added just then is not left behind)."""
        while self._write_order.acquire(blocking=wait):
            try:
                while self._outbox and not self._paused:
                    batch = self._outbox.popleft()
                    try:
                        if self._end is not None:
                            raise self._end_error()
                        self._client._send_batch(self, batch)
                    except (ConnectionLost, ProducerClosed) as exc:
                        self._receipt(batch, None, exc)
            finally:
                self._write_order.release()
            if not self._outbox or self._paused:
                return

    # --- reconnecting ---------------------------------------------------------------------------

    def _pause(self):
        """The connection is lost and the client reconnects: keep what is sent meanwhile."""
        self._paused = True

    def _resume(self):
        """Opened again (new id): send what waited."""
        self._paused = False
        self._write_outbox()

    # --- events (core.dispatch), from the reader thread ------------------------------------------

    def _receipt(self, batch, reply, error):
        with self._lock:
            if self._settle(batch, reply, error):
                batch.done.set()
                self._room.notify_all()

    def _ended(self, cls, arg):
        with self._lock:
            self._set_end(cls, arg)
            self._room.notify_all()

    def _fail_unsent(self):
        # No waiting here for _write_order (its holder may be blocked writing): the batch being
        # filled is failed at once; the outbox is failed by the thread writing it.
        with self._lock:
            batches = [batch] if (batch := self._batcher.take()) is not None else []
            if self._paused:   # kept for a reconnect that will not come: nobody writes them now
                batches = list(self._outbox) + batches
                self._outbox.clear()
                self._paused = False
        for batch in batches:
            self._receipt(batch, None, self._end_error())


# --- consuming --------------------------------------------------------------------------------

class Consumer(ConsumerCore):
    """Messages of one subscription, in a local receiver queue filled against credits."""

    def __init__(self, client, reply, topic, subscription, sub_type, name, receiver_queue, on_active):
        super().__init__(reply, topic, subscription, sub_type, name, receiver_queue, on_active)
        self._client = client
        self._ready = deque()         # the receiver queue (append and popleft are atomic)
        self._arrived = threading.Condition(threading.Lock())   # notified when messages come or it ends

    def receive(self, timeout=None):
        """The next message; TimeoutError if none within `timeout`; ConsumerClosed once the
        consumer is closed (ConnectionLost if the connection died)."""
        try:
            msg = self._ready.popleft()
        except IndexError:
            msg = self._wait_message(timeout)
        if self._end is not None:     # closed meanwhile: what was queued goes back to the subscription
            raise self._end_error()
        grant = self._grant()
        if grant:
            try:
                self.flow(grant)
            except ConnectionLost:
                pass   # receive will tell, once the queue is drained
        return msg

    def _wait_message(self, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._arrived:
            while True:
                try:
                    return self._ready.popleft()
                except IndexError:
                    pass
                if self._end is not None:
                    raise self._end_error()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no message within {timeout}s")
                self._arrived.wait(left)

    def __iter__(self):
        while True:
            try:
                yield self.receive()
            except ConsumerClosed:
                return

    def flow(self, credits):
        """Allow the broker to send `credits` more messages."""
        self._client._send(self._flow_frame(credits))

    def ack(self, msg_or_ids, sync=False, timeout=10):
        """Acknowledge messages (a Message, an id, or an iterable of them) for the subscription,
        in as many frames as the broker's max_frame needs; sync: wait for the broker's ok to every
        one (the first error of any is raised)."""
        self._send_ack(self._ack_frames("ack", msg_or_ids, self._client._core.max_frame), sync, timeout)

    def nack(self, msg_or_ids, delay_ms=None, sync=False, timeout=10):
        """Ask for redelivery (reliable topics), after delay_ms if given."""
        self._send_ack(self._ack_frames("nack", msg_or_ids, self._client._core.max_frame, delay_ms),
                       sync, timeout)

    def _send_ack(self, frames, sync, timeout):
        """The frames (each within max_frame); sync: wait until the broker answered every one."""
        if sync:
            self._client._request_all(frames, timeout)
        else:
            for frame in frames:
                self._client._send(frame)

    def close(self, timeout=10):
        """Detach from the subscription; its unacknowledged messages go back to it."""
        if self._end is not None:
            return
        self._ended("closed")
        self._client._close_remote(self, timeout)

    def unsubscribe(self, timeout=10):
        """Detach and delete the subscription (its other consumers are closed by the broker)."""
        self._client.request(self._unsubscribe_frame(), timeout)
        self._ended("unsubscribed")
        self._client._detach(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- reconnecting ---------------------------------------------------------------------------

    def _pause(self):
        """Lost, reconnecting: what is queued came from the old attachment; the broker delivers
        it again (reliable) to the new one."""
        self._ready.clear()

    def _resume(self):
        """Subscribed again: credits afresh, as at subscribe (auto_credit), or those granted and unused."""
        credits = self._credits_again()
        if credits:
            self._client._send({"op": "flow", "consumer": self.id, "credits": credits})

    # --- events (core.dispatch), from the reader thread ------------------------------------------

    def _deliver(self, messages):
        self._ready.extend(messages)
        with self._arrived:
            self._arrived.notify(len(messages))

    def _ended(self, reason, raises=None):
        """Closed: drop what is queued (its messages go back to the subscription) and end receive."""
        if self._set_end(reason, raises):
            self._ready.clear()
            with self._arrived:
                self._arrived.notify_all()
