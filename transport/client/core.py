"""Sans-IO core of the Python clients (protocol v2 by default, v1 on request: PROTOCOL.md and
docs/protocol.md), in the style of h11/wsproto.

Everything a client connection knows and decides, with no sockets, threads, clocks or event loop:
`ClientCore` is handed the bytes the broker sent (`receive_data`) and the time (`heartbeat`), and
answers with the bytes to write and a list of events, which the I/O layer (sync.py with threads,
aio.py with asyncio) carries out with its own primitives:

    (REPLY, waiter, result, error)          settle the waiter of a request (result or error)
    (RECEIPT, producer, batch, reply, error) a send's receipt (or its error) for a producer batch
    (MESSAGES, consumer, [Message, ...])     messages for a consumer's receiver queue
    (ACTIVE, consumer, bool)                 failover state of a consumer
    (CLOSED, producer_or_consumer, reason)   the broker ended it (already detached here)
    (LOST, producer_or_consumer, error, client_closing)   the connection is gone
    (REOPEN, producer_or_consumer, reason)   the broker ended it for a reason a reconnecting
                                             client recovers from (REOPEN_REASONS): open it again
    (WRITE, bytes[, wait])                   to write now: a pong (wait False: skipped if another
                                             thread is writing), or the close of an abandoned open
    (BROKEN, exception)                      the bytes received cannot be used: abandon the connection

`dispatch(events, client)` runs them by calling the I/O layer's hooks. `ProducerCore` and
`ConsumerCore` hold the pure part of a producer and a consumer (batching arithmetic, flow
control counts, receiver-queue credits, end state); the I/O classes derive from them and add
only how to wait and wake.
"""
import itertools
import os
from collections import namedtuple
from itertools import repeat

from actorbroker.transport.codec import DEFAULT_MAX_FRAME, PROTOCOL_VERSION, FrameDecoder, encode_frame, max_message_bytes
from actorbroker.transport.errors import (
    BAD_REQUEST, CONSUMER_BUSY, FATAL_CODES, INTERNAL, OVERLOADED, PRODUCER_BUSY, TOPIC_UNAVAILABLE,
    UNKNOWN_CONSUMER, UNKNOWN_PRODUCER, BrokerError, ConnectionLost, ConsumerClosed, ProducerClosed, ProtocolError,
    error_for, error_from_frame)


DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6650
DEFAULT_HEARTBEAT_MS = 5000
READ_SIZE = 256 * 1024
DEAD_AFTER_HEARTBEATS = 3   # nothing at all received for this many heartbeats: the broker is gone
# Reopening an exclusive producer or consumer after a reconnect is refused (PRODUCER_BUSY /
# CONSUMER_BUSY) while the broker still holds the old connection, which it drops after two silent
# heartbeats (PROTOCOL.md), checked at most a heartbeat late: the reopen is retried for this many
# heartbeats after the first refusal, plus BUSY_RETRY_MARGIN_S, before the refusal is final.
BUSY_RETRY_HEARTBEATS = DEAD_AFTER_HEARTBEATS
BUSY_RETRY_MARGIN_S = 1.0
# A reopen refused with one of these is tried again within the same window: the broker is busy
# with what ended the old attachment (an old connection not found dead yet, a topic or
# subscription process restarting, a topic moving to another node), and says "send it again".
REOPEN_RETRY_CODES = (PRODUCER_BUSY, CONSUMER_BUSY, TOPIC_UNAVAILABLE, INTERNAL)
# `closed` reasons after which a client that reconnects opens the producer or consumer again by
# itself, as Pulsar's clients do when a topic is unloaded: a broker process died or a node was
# lost (docs/protocol.md, "When a broker process dies"), nothing the application did.
REOPEN_REASONS = frozenset({"topic_lost", "subscription_lost", "node_lost"})

# Bytes of a `send` frame around its records: length header, op, rid, producer id, msgs array header.
SEND_OVERHEAD = 64
# Bytes of an `ack` / `nack` frame around its ids (op, consumer, rid, delay_ms, the array header),
# with room to spare; each id takes at most 9 bytes (a msgpack uint64).
ACK_OVERHEAD = 96
# A message's key and each attribute name and value: at most this many bytes of UTF-8 (PROTOCOL.md).
MAX_NAME_BYTES = 255

# Event kinds (see the module docstring).
REPLY, RECEIPT, MESSAGES, ACTIVE, CLOSED, LOST, WRITE, BROKEN, EVENT, REOPEN = (
    "reply", "receipt", "messages", "active", "closed", "lost", "write", "broken", "event", "reopen")
_IGNORED = ("ignored",)     # pending entry of a request whose reply nobody waits for (our pings)
_CLOSING = "closing"        # pending entry kind of a close_producer/close_consumer (close_request)
_ABANDONED = "abandoned"    # pending entry kind of a producer/subscribe request nobody waits for


# --- messages ---------------------------------------------------------------------------------

_MessageFields = namedtuple("_MessageFields",
                            "id payload key attrs time producer redeliveries consumer_id")


class Message(_MessageFields):
    """One delivered message (immutable); `id` is its topic offset, `time` its publish time (ms
    since epoch). A named tuple underneath, so that a consumer builds thousands of them cheaply."""
    __slots__ = ()

    def __new__(cls, id, payload, key=None, attrs=None, time=0, producer="", redeliveries=0,
                consumer_id=None):
        return tuple.__new__(cls, (id, payload, key, {} if attrs is None else attrs, time, producer,
                                   redeliveries, consumer_id))

    @property
    def text(self):
        return self.payload.decode("utf-8")


_new_tuple = tuple.__new__


def messages_of(records, consumer_id):
    """The Messages of a `message` push's `msgs` (the consumer's hot path: one tuple each).

    PROTOCOL.md gives every record all seven fields, which is the fast path; a record without
    some of them gets the defaults of Message."""
    try:
        return [_new_tuple(Message, (r["id"], r["payload"], r["key"],
                                     attrs if (attrs := r["attrs"]) is not None else {},
                                     r["time"], r["producer"], r["redeliveries"], consumer_id))
                for r in records]
    except KeyError:
        return [_new_tuple(Message, (r["id"], r["payload"], r.get("key"), r.get("attrs") or {},
                                     r.get("time", 0), r.get("producer", ""), r.get("redeliveries", 0),
                                     consumer_id))
                for r in records]


def messages_of_runs(runs, consumer_id):
    """The Messages of a v2 `message` push's `runs`: each run is [first id, time, producer,
    redeliveries, [payload, ...], keys or nil, attrs or nil]. Built with C iterators (zip, map):
    no Python code runs per message."""
    out = []
    for first, time, producer, redeliveries, payloads, keys, attrs in runs:
        n = len(payloads)
        out += map(_new_tuple, repeat(Message, n), zip(
            range(first, first + n), payloads, repeat(None, n) if keys is None else keys,
            map(dict, repeat((), n)) if attrs is None else [a or {} for a in attrs],
            repeat(time, n), repeat(producer, n), repeat(redeliveries, n), repeat(consumer_id, n)))
    return out


def messages_of_push(frame, consumer_id):
    """The Messages of a `message` push of either version."""
    runs = frame.get("runs")
    if runs is not None:
        return messages_of_runs(runs, consumer_id)
    return messages_of(frame["msgs"], consumer_id)


def message_from_record(record, consumer_id):
    return messages_of((record,), consumer_id)[0]


def _int_size(n):
    """Bytes of n as a msgpack int (at most)."""
    if 0 <= n < 128:
        return 1
    if -32 <= n < 0:
        return 1
    return 2 if -128 <= n < 256 else 3 if -32768 <= n < 65536 else 5 if -2**31 <= n < 2**32 else 9


def split_ids(ids, max_frame):
    """ids in consecutive parts whose ack/nack frame each fits max_frame (PROTOCOL.md: it bounds
    frames in both directions; a larger one makes the broker close the connection)."""
    per_frame = max(1, (max_frame - ACK_OVERHEAD) // max(map(_int_size, (min(ids), max(ids)))))
    return [ids[i:i + per_frame] for i in range(0, len(ids), per_frame)]


def ids_of(msg_or_ids):
    """Message ids from a Message, an int, or an iterable of either."""
    if isinstance(msg_or_ids, Message):
        return [msg_or_ids.id]
    if isinstance(msg_or_ids, int):
        return [msg_or_ids]
    return [m.id if isinstance(m, Message) else int(m) for m in msg_or_ids]


# --- addresses and names ----------------------------------------------------------------------

Address = namedtuple("Address", "host port tls")
SCHEMES = {"tcp://": False, "tls://": True}


def parse_address(url, default_port=DEFAULT_PORT):
    """"[tcp://|tls://]host:port" (or "host", or ":port") as Address(host, port, tls)."""
    tls = False
    for scheme, secure in SCHEMES.items():
        if url.startswith(scheme):
            url, tls = url[len(scheme):], secure
            break
    else:
        if "://" in url:
            raise ValueError(f"unknown scheme in {url!r} (tcp:// or tls://)")
    host, sep, port = url.rpartition(":")
    if not sep:
        return Address(url or DEFAULT_HOST, default_port, tls)
    number = int(port)
    if not 0 < number < 65536:   # the OS would take it modulo 65536: another port, silently
        raise ValueError(f"port {number} in {url!r} is not in 1-65535")
    return Address(host or DEFAULT_HOST, number, tls)


def parse_url(url, default_port=DEFAULT_PORT):
    """"host:port" (or "host", or ":port", or "tcp://host:port") as (host, port). A tls:// address
    raises ValueError: a caller that only takes (host, port) would drop the TLS silently; use
    parse_address."""
    host, port, tls = parse_address(url, default_port)
    if tls:
        raise ValueError(f"{url!r} needs TLS: use parse_address")
    return host, port


def default_consumer_name(client_name):
    return f"{client_name}-{os.urandom(6).hex()}"


# --- frames -----------------------------------------------------------------------------------

def _with_optional(frame, **optional):
    """`frame` plus the optional fields that were given (None means: let the broker decide)."""
    frame.update((k, v) for k, v in optional.items() if v is not None)
    return frame


def hello_frame(client_name, token=None, heartbeat_ms=None, version=PROTOCOL_VERSION):
    return _with_optional({"op": "hello", "version": version, "client": client_name},
                          token=token, heartbeat_ms=heartbeat_ms)


def producer_frame(topic, name=None, dispatch=None, access=None):
    return _with_optional({"op": "producer", "topic": topic}, name=name, dispatch=dispatch, access=access)


def subscribe_frame(topic, subscription, sub_type, consumer, *, start=None, dispatch=None,
                    max_unacked=None, ack_timeout_ms=None, max_redeliveries=None, dead_letter_topic=None):
    return _with_optional(
        {"op": "subscribe", "topic": topic, "subscription": subscription, "type": sub_type,
         "consumer": consumer},
        start=start, dispatch=dispatch, max_unacked=max_unacked, ack_timeout_ms=ack_timeout_ms,
        max_redeliveries=max_redeliveries, dead_letter_topic=dead_letter_topic)


def open_producer(client, cls, topic, name, dispatch, access, linger_ms, max_batch, max_pending):
    """(frame, make) of a `producer` request: make(reply) builds the client's producer class."""
    frame = producer_frame(topic, name, dispatch, access)

    def make(reply):
        producer = cls(client, reply, name, linger_ms, max_batch, max_pending)
        # after a reconnect: the same topic, name and mode (the broker named it if we did not)
        producer._reopen_frame = dict(frame, name=producer.name, dispatch=producer.dispatch)
        return producer
    return frame, make


def open_consumer(client, cls, topic, subscription, sub_type, consumer, receiver_queue, auto_credit,
                  on_active, options):
    """(frame, make) of a `subscribe` request; options are subscribe_frame's keywords."""
    # (None: a name of our own; "" goes to the broker, which refuses it: BAD_REQUEST)
    name = default_consumer_name(client.name) if consumer is None else consumer
    frame = subscribe_frame(topic, subscription, sub_type, name, **options)
    credits = receiver_queue if auto_credit else None

    def make(reply):
        consumer = cls(client, reply, topic, subscription, sub_type, name, credits, on_active)
        consumer._reopen_frame = frame     # after a reconnect: subscribe again, the same way
        return consumer
    return frame, make


def reply_fields(frame):
    """A reply without its envelope (op, rid): what admin calls return."""
    return {k: v for k, v in frame.items() if k not in ("op", "rid")}


class TopicList(list):
    """The `topics` reply's list; `truncated`: the broker cut it to fit max_frame (docs/protocol.md),
    so some topics are not in it."""
    truncated = False


def topic_list(reply):
    listed = TopicList(reply["topics"])
    listed.truncated = bool(reply.get("truncated"))
    return listed


# Admin calls: name -> (request frame from the call's arguments, result from the reply).
ADMIN = {
    "topics": (lambda: {"op": "topics"}, topic_list),
    "stats": (lambda topic: {"op": "stats", "topic": topic}, reply_fields),
    "delete_topic": (lambda topic: {"op": "delete_topic", "topic": topic}, lambda reply: None),
    "watch": (lambda topics: {"op": "watch", "topics": topics}, lambda reply: None),
    "unwatch": (lambda: {"op": "unwatch"}, lambda reply: None),
    "ping": (lambda: {"op": "ping"}, lambda reply: None),
    "lookup": (lambda topic: {"op": "lookup", "topic": topic}, reply_fields),
    "cluster": (lambda: {"op": "cluster"}, lambda reply: reply["members"]),
    "broker_stats": (lambda: {"op": "broker_stats"}, reply_fields),
}


def call_back(callback, *args):
    """Call a user's callback (on_active, on_reconnect) from the client's reader or reopen thread
    or task: what it raises is logged, never taken for a failure of the connection (which would
    end every producer and consumer of the client, and, with reconnect, start over on each call)."""
    try:
        callback(*args)
    except Exception:   # noqa: BLE001 - the user's code; the client goes on
        import logging   # only here: the client imports no more than it needs
        logging.getLogger("actorbroker.client").exception("%r raised", callback)


def read_failure(exc):
    """Why a connection ended, when reading from it raised exc."""
    if isinstance(exc, OSError):
        return f"connection failed: {exc}"
    return f"connection abandoned: {type(exc).__name__}: {exc}"   # a bad frame, or a bug in a handler


# --- reconnecting -----------------------------------------------------------------------------

class Reconnect:
    """When and where a client whose connection was lost tries again (Pulsar's and NATS's clients
    do the same): the seed addresses in turn, the first attempt at once, then waits that start at
    `initial` seconds and double after each round of the addresses, up to `maximum`; it gives up
    `give_up_after` seconds after the loss (None: never). Addresses are (host, port) pairs.

    A reconnected client opens its producers again and subscribes its consumers again (same
    names, same options), and they keep their objects: only their ids change. Sends that were
    waiting for their receipt when the connection was lost fail with ConnectionLost (they may or
    may not have been published: send them again, at least once); messages in a consumer's
    receiver queue are dropped (the broker delivers them again)."""

    def __init__(self, addresses, initial=0.1, maximum=5.0, give_up_after=60.0):
        if not addresses:
            raise ValueError("reconnect needs at least one address")
        self.addresses = [tuple(a) for a in addresses]
        self.initial, self.maximum, self.give_up_after = initial, maximum, give_up_after
        self.lost_at = 0.0
        self.attempt = 0

    def start(self, now):
        """The connection was lost at `now`: the attempts start afresh."""
        self.lost_at, self.attempt = now, 0

    def attempts(self, clock, stopped):
        """(address, seconds to wait first) of each attempt after a loss now, until it gives up or
        stopped(); clock() is the I/O layer's monotonic time."""
        self.start(clock())
        while not stopped():
            attempt = self.next_attempt(clock())
            if attempt is None:
                return
            yield attempt

    def next_attempt(self, now):
        """(address, seconds to wait before trying it), or None: give up."""
        if self.give_up_after is not None and now - self.lost_at >= self.give_up_after:
            return None
        n, self.attempt = self.attempt, self.attempt + 1
        rounds = (n - 1) // len(self.addresses)
        delay = 0.0 if n == 0 else min(self.maximum, self.initial * 2 ** min(rounds, 32))
        if self.give_up_after is not None:
            delay = min(delay, max(0.0, self.lost_at + self.give_up_after - now))
        return self.addresses[n % len(self.addresses)], delay

    def backoff(self, retries):
        """The wait before the retry that follows `retries` others: `initial`, doubling, up to
        `maximum`."""
        return min(self.maximum, self.initial * 2 ** min(retries, 32))


def first_addresses(address, reconnect):
    """Where the first connect goes: address, then the other seed addresses of a Reconnect (as
    NATS's clients use their server list from the start)."""
    seeds = reconnect.addresses if isinstance(reconnect, Reconnect) else []
    return [tuple(address)] + [seed for seed in seeds if seed != tuple(address)]


def next_seed_may_help(error):
    """A first connect's hello failed with `error`: may another seed of a Reconnect take us? Yes
    when this address could not be reached, hung up, did not answer in time, sent what is no
    frame of ours (not a broker), or was OVERLOADED (max_connections) or INTERNAL; no when every
    broker would refuse the same (AUTH_FAILED, UNSUPPORTED_VERSION, ...)."""
    if isinstance(error, ProtocolError):   # what it sent is no frame of ours: not a broker
        return True
    code = getattr(error, "code", None)
    if code is not None:
        return code in (OVERLOADED, INTERNAL)
    return isinstance(error, (ConnectionLost, OSError))


# --- batching ---------------------------------------------------------------------------------

def _as_bytes(payload):
    """bytes, str (sent as UTF-8), or any object with the buffer protocol (bytearray, memoryview,
    array.array, ...); anything else is a TypeError (bytes() of an int would send that many
    zero bytes, and of a list of ints its values)."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8")
    try:
        view = memoryview(payload)
    except TypeError:
        raise TypeError(f"a payload is bytes, str or a buffer, not {type(payload).__name__}") from None
    return view.tobytes()


def record_for(payload, key=None, attrs=None):
    """The `msgs` element for one message, and an upper bound of its msgpack size.

    The bound is computed instead of packing twice; each str/bin/map header counts 5 bytes (their
    largest form), and each attribute 10 bytes more, as the broker's own size check does."""
    if type(payload) is not bytes:
        payload = _as_bytes(payload)
    record = {"payload": payload}
    size = 1 + 8 + 5 + len(payload)
    if key is not None:
        record["key"] = key
        size += 4 + 5 + _name_bytes(key, "key")
    if attrs:
        if not isinstance(attrs, dict):
            raise TypeError("attrs must be a dict of str to str")
        record["attrs"] = attrs
        size += 6 + 5 + sum(20 + _name_bytes(k, "attrs name") + _name_bytes(v, f"attrs[{k!r}]")
                            for k, v in attrs.items())
    return record, size


def _name_bytes(value, what):
    """The UTF-8 length of a key or attribute, which the broker bounds: checked here, one message
    at a time, because the broker refuses the whole `send` frame (every message batched with it)."""
    if type(value) is not str:
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    n = len(value.encode("utf-8"))
    if n > MAX_NAME_BYTES:
        raise error_for(BAD_REQUEST, f"{what} of {n} bytes is longer than {MAX_NAME_BYTES} bytes")
    return n


def max_message_size(max_frame, producer_name):
    """Largest message the broker takes, measured as it measures it (_wire_size)."""
    return max_message_bytes(max_frame, producer_name)


def _wire_size(payload, key, attrs):
    """A message's size as the broker measures it against max_message_size."""
    size = len(payload) + (len(key.encode("utf-8")) if key else 0)
    if attrs:
        size += sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) + 10 for k, v in attrs.items())
    return size


def too_large(size, limit):
    return error_for(BAD_REQUEST, f"message of {size} bytes is larger than the {limit} bytes "
                                  f"this broker's max_frame allows")


class Batch:
    """Records collected for one `send` frame, and its outcome once settled. `done` is the I/O
    layer's way to wake who waits for it (a threading.Event or an asyncio.Event)."""
    __slots__ = ("records", "size", "settled", "first", "error", "done")

    def __init__(self, done=None):
        self.records = []
        self.size = SEND_OVERHEAD
        self.settled = False
        self.first = None
        self.error = None
        self.done = done

    def add(self, record, size):
        self.records.append(record)
        self.size += size
        return len(self.records) - 1

    def offset(self, index):
        """The offset of the index-th message once settled; raises the batch's error."""
        if self.error is not None:
            raise self.error
        return self.first + index


class BatchFuture:
    """The offset one message of a batch will get; the I/O layer adds how to wait for it."""
    __slots__ = ("_batch", "_index")

    def __init__(self, batch, index):
        self._batch, self._index = batch, index

    def done(self):
        return self._batch.done.is_set()


class Batcher:
    """Groups records into batches of at most max_batch records and max_frame bytes.

    `add` returns (batch, index, ready): the batch the record went into, its index there, and the
    batches that are complete and must be sent now, in order. The batch being filled is `current`;
    `take` removes it (to send it when the linger time is up, or on flush)."""

    def __init__(self, max_frame, max_batch, new_batch=Batch):
        self.max_frame = max_frame
        self.max_batch = max(1, max_batch)
        self.new_batch = new_batch
        self.current = None

    def add(self, record, size):
        batch = self.current
        if batch is None:
            batch = self.current = self.new_batch()
            ready = []
        elif batch.size + size > self.max_frame:
            ready = [batch]
            batch = self.current = self.new_batch()
        else:
            ready = []
        records = batch.records
        records.append(record)
        batch.size += size
        index = len(records) - 1
        if index + 1 >= self.max_batch:
            ready.append(batch)
            self.current = None
        return batch, index, ready

    def take(self):
        batch, self.current = self.current, None
        return batch


# --- receiver queue credits -------------------------------------------------------------------

class CreditWindow:
    """Pulsar-style receiver queue: `size` credits up front, then the consumed ones are granted
    back in one `flow` once half the queue has been taken, so that at most `size` messages are
    ever credited but not yet taken by the application. `take` is safe from several threads
    without a lock (one counter step, atomic in CPython)."""

    def __init__(self, size):
        if size < 1:
            raise ValueError("receiver_queue must be at least 1")
        self.size = size
        self.threshold = max(1, size // 2)
        self._taken = itertools.count(1)

    def initial(self):
        return self.size

    def take(self):
        """Count one message taken; returns the credits to grant now (0: none yet)."""
        return self.threshold if next(self._taken) % self.threshold == 0 else 0


# --- push routing -----------------------------------------------------------------------------

class Attachments:
    """The producers and consumers of one connection by id, to route pushes to them.

    A push can overtake the reply that announces its id (PROTOCOL: hold pushes for an id not known
    yet), so while a producer/subscribe request is in flight, pushes for unknown ids are held and
    handed over when the id is attached. With no such request in flight, a push for an unknown id
    is for something already closed here and is dropped."""

    def __init__(self):
        self.by_id = {}        # ("consumer" | "producer", id) -> object
        self.opening = set()   # rids of producer/subscribe requests in flight
        self.held = {}         # ("consumer" | "producer", id) -> [push frames]

    @staticmethod
    def key_of(frame):
        if "consumer" in frame:
            return "consumer", frame["consumer"]
        if "producer" in frame:
            return "producer", frame["producer"]
        return None

    def route(self, frame):
        """The object the push is for, or None (held for later or dropped)."""
        key = self.key_of(frame)
        target = self.by_id.get(key)
        if target is None and key is not None and self.opening:
            self.held.setdefault(key, []).append(frame)
        return target

    def begin_open(self, rid):
        self.opening.add(rid)

    def end_open(self, rid):
        self.opening.discard(rid)
        if not self.opening:
            self.held.clear()

    def attach(self, kind, ident, obj):
        """Registers obj; returns the pushes held for it, to be handed to it in order."""
        self.by_id[(kind, ident)] = obj
        return self.held.pop((kind, ident), [])

    def detach(self, kind, ident):
        self.by_id.pop((kind, ident), None)

    def take_all(self):
        objs = list(self.by_id.values())
        self.by_id.clear()
        self.held.clear()
        return objs


# --- producers and consumers ------------------------------------------------------------------

class ProducerCore:
    """The pure part of a producer: batching (max_batch messages, never over max_frame), the count
    of messages buffered or waiting for their receipt (bounded by max_pending), its end. The I/O
    subclass guards these with its own lock where it has threads."""
    kind = "producer"

    def __init__(self, reply, name, linger_ms, max_batch, max_pending, max_frame, new_batch=Batch):
        self.id = reply["producer"]
        self.topic = reply.get("topic")
        self.dispatch = reply.get("dispatch")
        self.name = name or f"producer-{self.id}"    # the broker's default name
        self.closed_reason = None
        self._linger_s = max(0.0, linger_ms / 1000)
        self._max_pending = max(1, max_pending)
        self._max_message = max_message_size(max_frame, self.name)
        self._batcher = Batcher(max_frame, max_batch, new_batch)
        self._outstanding = 0     # messages buffered or waiting for their receipt
        self._flushing = 0        # flushes waiting: while one waits, nothing lingers
        self._end = None          # (exception class, argument) sends fail with once closed

    def _rebind(self, reply):
        """Opened again after a reconnect: the broker's new id for this producer."""
        self.id = reply["producer"]
        return self

    def _record(self, payload, key, attrs):
        """The record of one message and its size bound; too large for the broker: raises. The
        record of a message with neither key nor attrs is its payload (bytes) alone; the others
        are maps as in a v1 `msgs` array."""
        if key is None and not attrs:    # the common case
            if type(payload) is not bytes:
                payload = _as_bytes(payload)
            record, size = payload, 14 + len(payload)
            if len(payload) > self._max_message:
                raise too_large(len(payload), self._max_message)
        else:
            record, size = record_for(payload, key, attrs)
            wire = _wire_size(record["payload"], key, attrs)
            if wire > self._max_message:
                raise too_large(wire, self._max_message)
        return record, size

    def _add(self, record, size):
        """Count the message and batch it: (batch, index, ready batches, starts a linger wait)."""
        self._outstanding += 1
        batcher = self._batcher
        batch = batcher.current
        if batch is not None:   # the common case, inline: room in the batch being filled
            records = batch.records
            if batch.size + size <= batcher.max_frame and len(records) + 1 < batcher.max_batch:
                records.append(record)
                batch.size += size
                return batch, len(records) - 1, (), False
        batch, index, ready = batcher.add(record, size)
        return batch, index, ready, index == 0 and batch is batcher.current

    def _send_frame(self, batch, version=1):
        """The `send` of a batch: columns (`payloads`, and `keys` / `attrs` if any message has
        them) in v2, a map per message in v1."""
        records = batch.records
        if version < 2:
            return {"op": "send", "producer": self.id,
                    "msgs": [{"payload": r} if type(r) is bytes else r for r in records]}
        if dict not in set(map(type, records)):   # payloads alone: the list is the column
            return {"op": "send", "producer": self.id, "payloads": records}
        frame = {"op": "send", "producer": self.id,
                 "payloads": [r if type(r) is bytes else r["payload"] for r in records]}
        keys = [None if type(r) is bytes else r.get("key") for r in records]
        if keys.count(None) != len(keys):
            frame["keys"] = keys
        attrs = [None if type(r) is bytes else r.get("attrs") for r in records]
        if any(attrs):
            frame["attrs"] = [a or {} for a in attrs]
        return frame

    def _settle(self, batch, reply=None, error=None):
        """Record a batch's receipt (or error), once; returns whether it was settled now."""
        if batch.settled:
            return False
        if error is None and reply.get("count") != len(batch.records):
            error = BrokerError(INTERNAL, f"receipt counts {reply.get('count')} messages, "
                                          f"the send had {len(batch.records)}")
        batch.settled = True
        batch.error = error
        batch.first = None if error is not None else reply["first"]
        self._outstanding -= len(batch.records)
        return True

    def _set_end(self, cls, arg):
        if self._end is None:
            self._end = (cls, arg)

    def _end_error(self):
        cls, arg = self._end
        return cls(arg)

    def _close_frame(self):
        return {"op": "close_producer", "producer": self.id}

    # Events (see dispatch); the I/O subclass gives _ended(cls, arg) and _fail_unsent().

    def _closed(self, reason):
        self.closed_reason = reason
        self._ended(ProducerClosed, reason)
        self._fail_unsent()

    def _lost(self, error, client_closing):
        if self.closed_reason is None:
            self.closed_reason = "client_closed" if client_closing else "connection_lost"
        self._ended(ConnectionLost, str(error))
        self._fail_unsent()


class ConsumerCore:
    """The pure part of a consumer: its identity, failover state, receiver-queue credits, end."""
    kind = "consumer"

    def __init__(self, reply, topic, subscription, sub_type, name, receiver_queue, on_active):
        self.id = reply["consumer"]
        self.dispatch = reply.get("dispatch")
        self.topic, self.subscription, self.type, self.name = topic, subscription, sub_type, name
        self.active = None            # failover: set by the broker's `active` pushes
        self.closed_reason = None
        self.on_active = on_active
        self._credits = CreditWindow(receiver_queue) if receiver_queue else None
        # auto_credit=False: credits the application granted (flow) that it has not used yet by
        # taking messages; a consumer opened again after a reconnect gets them again
        self._granted = 0
        self._end = None              # (exception class, argument) that receive raises once closed

    def _set_end(self, reason, raises=None):
        """Mark the consumer ended; False if it already was."""
        if self._end is not None:
            return False
        self.closed_reason = reason
        self._end = raises or (ConsumerClosed, reason)
        return True

    def _end_error(self):
        cls, arg = self._end
        return cls(arg)

    def _rebind(self, reply):
        """Subscribed again after a reconnect: the broker's new id; credits start afresh."""
        self.id = reply["consumer"]
        self.active = None
        if self._credits is not None:
            self._credits = CreditWindow(self._credits.size)
        return self

    def _grant(self):
        """One message taken by the application: the credits to grant back now (0: none)."""
        credits = self._credits
        if credits is None:
            self._granted = max(0, self._granted - 1)
            return 0
        if self._end is not None:
            return 0
        return credits.take()

    def _flow_frame(self, credits):
        """The application's flow (auto_credit=False: counted, see _granted)."""
        if self._credits is None:
            self._granted += credits
        return {"op": "flow", "consumer": self.id, "credits": credits}

    def _credits_again(self):
        """Opened again (reconnect, or a broker process died): the credits its new attachment gets,
        as at subscribe (auto_credit) or what the application granted and has not used."""
        return self._credits.initial() if self._credits is not None else self._granted

    def _ack_frame(self, op, msg_or_ids, delay_ms=None):
        """The ack/nack frame for these messages, or None if there are none."""
        ids = ids_of(msg_or_ids)
        if not ids:
            return None
        frame = {"op": op, "consumer": self.id, "ids": ids}
        if delay_ms is not None:
            frame["delay_ms"] = delay_ms
        return frame

    def _ack_frames(self, op, msg_or_ids, max_frame, delay_ms=None):
        """The ack/nack frames for these messages, each within max_frame (none if no messages)."""
        frame = self._ack_frame(op, msg_or_ids, delay_ms)
        if frame is None:
            return []
        return [dict(frame, ids=part) for part in split_ids(frame["ids"], max_frame)]

    def _close_frame(self):
        return {"op": "close_consumer", "consumer": self.id}

    def _unsubscribe_frame(self):
        return {"op": "unsubscribe", "consumer": self.id}

    # Events (see dispatch); the I/O subclass gives _deliver(messages) and _ended(reason, raises).

    def _activated(self, active):
        self.active = active
        if self.on_active is not None:
            call_back(self.on_active, self, active)

    def _closed(self, reason):
        self._ended(reason)

    def _lost(self, error, client_closing):
        if client_closing:
            self._ended("client_closed")
        else:
            self._ended("connection_lost", (ConnectionLost, str(error)))


# --- the connection ---------------------------------------------------------------------------

class ClientCore:
    """The state of one client connection: rids and pending requests, attached producers and
    consumers, the frame decoder, heartbeat bookkeeping, and how the connection ended.

    Methods that return bytes give what to write, in the order they are called; the I/O layer
    writes them in that order per producer (rids need not be written in order)."""

    def __init__(self, name):
        self.name = name
        self.max_frame = DEFAULT_MAX_FRAME
        self.heartbeat_ms = DEFAULT_HEARTBEAT_MS
        self.version = 1          # the protocol version of the connection, once welcomed
        self.lost = None          # the ConnectionLost once the connection is gone
        self.closing = False      # the application is closing the client
        self.last_error = None    # a fatal error without rid: why the broker closes
        self.last_received = 0.0
        self._last_ping = 0.0
        # rid -> (REPLY, waiter, make, kind) | (RECEIPT, producer, batch) | (_CLOSING, waiter) | _IGNORED
        self._pending = {}
        self._attachments = Attachments()
        self._rids = itertools.count(1)
        self._decoder = FrameDecoder(max_frame=DEFAULT_MAX_FRAME)
        self.detached = []        # producers and consumers kept across a loss, to open again
        self.reopens = False      # the I/O layer reconnects: keep what REOPEN_REASONS ended too
        self.final = False        # closed for good: nothing is kept for a reopen any more
        self._reopening = {}      # producer/consumer -> the `closed` reason it is being reopened after
        self._busy = {}           # producer/consumer -> (deadline, retries) of a reopen refused as busy

    def restart(self, now):
        """A new connection of a reconnecting client, opened at `now`: nothing of the old one's
        bytes, errors or heartbeat clock."""
        self.lost = None
        self.last_error = None
        self.last_received = now
        self._last_ping = 0.0
        self._decoder = FrameDecoder(max_frame=DEFAULT_MAX_FRAME)
        self._busy.clear()

    def reopen_request(self, obj, waiter):
        """(rid, bytes) of the request that opens a kept producer or consumer again; its reply
        rebinds it (new id) and settles waiter with it."""
        return self.request(obj._reopen_frame, waiter, obj._rebind, obj.kind)

    def take_detached(self, final=False):
        """What is kept to be opened again; final: the client is closed for good, so a reopen
        that fails from now on ends its producer or consumer (reopen_failed)."""
        self.final = self.final or final
        kept, self.detached = self.detached, []
        return [obj for obj in kept if obj._end is None]   # not closed by the application meanwhile

    def reopen_failed(self, obj, error):
        """A reopen that failed with error: True if obj must end with it (the broker refused, e.g.
        CONSUMER_BUSY); False if it is kept for the next reconnect (the connection was lost again)."""
        if isinstance(error, ConnectionLost) and not self.final:
            if obj not in self.detached:   # the loss may have put it there already (attached then)
                self.detached.append(obj)
            return False
        self._busy.pop(obj, None)
        return True

    def reopen_retry(self, obj, error, now, reconnect):
        """Seconds to wait before reopening obj again, or None (see reopen_failed). An exclusive
        producer or consumer refused as busy (PRODUCER_BUSY / CONSUMER_BUSY) is likely held by the
        old connection, which the broker has not found dead yet (a network cut it did not see):
        it is retried with the reconnect's backoff until the broker must have dropped that one
        (BUSY_RETRY_HEARTBEATS heartbeats and a margin after the first refusal)."""
        if not (isinstance(error, BrokerError) and error.code in REOPEN_RETRY_CODES):
            self._busy.pop(obj, None)
            return None
        window = BUSY_RETRY_HEARTBEATS * self.heartbeat_ms / 1000 + BUSY_RETRY_MARGIN_S
        deadline, retries = self._busy.get(obj) or (now + window, 0)
        if now >= deadline:
            self._busy.pop(obj, None)
            return None
        self._busy[obj] = (deadline, retries + 1)
        return min(reconnect.backoff(retries), deadline - now)

    def reopened(self, obj):
        """obj is open again: None, or, if the application closed it while it was being opened,
        the bytes that close it on the broker again (nobody waits for their answer)."""
        self._busy.pop(obj, None)
        self._reopening.pop(obj, None)
        if obj._end is None:
            return None
        self._attachments.detach(obj.kind, obj.id)
        rid = next(self._rids)
        self._pending[rid] = _IGNORED
        return encode_frame(dict(obj._close_frame(), rid=rid))

    def reopen_reason(self, obj):
        """The `closed` reason obj was being reopened after (None after a lost connection); its
        reopen has failed for good."""
        return self._reopening.pop(obj, None)

    # --- session -------------------------------------------------------------------------------

    def welcomed(self, welcome):
        """Take the broker's `welcome`: its max_frame and the heartbeat both sides use."""
        self.max_frame = welcome.get("max_frame", DEFAULT_MAX_FRAME)
        self.heartbeat_ms = welcome.get("heartbeat_ms", DEFAULT_HEARTBEAT_MS)
        self.version = welcome.get("version", 1)
        self._decoder.max_frame = max(self.max_frame, DEFAULT_MAX_FRAME)

    def hello_error(self, exc):
        """What to raise when hello failed with exc: when the connection ended, the broker's fatal
        error if it sent one."""
        if isinstance(exc, ConnectionLost):
            if self.last_error is not None:
                return self.last_error
            # bytes that are no frame at all before any answer: most likely not a broker
            hint = " (is the peer an actorbroker broker?)" if "connection abandoned" in str(exc) else ""
            return ConnectionLost(f"during hello: {exc}{hint}")
        return exc

    def end_reason(self, reason):
        """The reason a connection ended, with the broker's fatal error when it sent one."""
        return reason if self.last_error is None else f"{reason} (after {self.last_error})"

    # --- writing -------------------------------------------------------------------------------

    def check(self):
        if self.lost is not None:
            raise ConnectionLost(str(self.lost))

    def one_way(self, frame):
        """Bytes of a frame that gets no reply (flow, ack, nack without rid)."""
        self.check()
        return encode_frame(frame)

    def request(self, frame, waiter, make=None, kind=None):
        """Bytes of a request; (rid, bytes). Its reply settles `waiter` (REPLY event), with
        make(reply) as the result if given. kind ("producer" | "consumer"): the request opens one,
        whose pushes may overtake the reply; the result of make is attached under its id."""
        self.check()
        rid = next(self._rids)
        self._pending[rid] = (REPLY, waiter, make, kind)
        if kind is not None:
            self._attachments.begin_open(rid)
        return rid, encode_frame(dict(frame, rid=rid))

    def send_request(self, producer, batch):
        """Bytes of the `send` of a producer's batch; its receipt comes as a RECEIPT event."""
        self.check()
        rid = next(self._rids)
        self._pending[rid] = (RECEIPT, producer, batch)
        frame = producer._send_frame(batch, self.version)
        frame["rid"] = rid
        return encode_frame(frame)

    def close_request(self, obj, waiter):
        """Detach a producer or consumer here and close it on the broker: (rid, bytes) of the
        request, or None if the connection is gone (which closed it). Its reply settles waiter with
        None also when the broker no longer has it (UNKNOWN_PRODUCER / UNKNOWN_CONSUMER) and when
        the connection ends meanwhile: closed either way."""
        self._attachments.detach(obj.kind, obj.id)
        if self.lost is not None:
            return None
        rid = next(self._rids)
        self._pending[rid] = (_CLOSING, waiter)
        return rid, encode_frame(dict(obj._close_frame(), rid=rid))

    def forget(self, rid):
        """Nobody waits for this request any more (timed out, cancelled): its reply will be
        dropped; if it opens a producer or consumer, what it opens is closed again when the reply
        comes (a WRITE event; nobody waits for that close either). Returns False if the request
        was no longer pending: its reply (or the connection's loss) was taken already, and its
        waiter is settled, or about to be."""
        entry = self._pending.pop(rid, None)
        self._attachments.end_open(rid)
        if entry is None:
            return False
        if entry[0] is REPLY and entry[3] is not None:
            self._pending[rid] = (_ABANDONED, entry[3])
        return True

    def _close_abandoned(self, kind, ident):
        rid = next(self._rids)
        self._pending[rid] = _IGNORED
        return encode_frame({"op": f"close_{kind}", kind: ident, "rid": rid})

    def heartbeat(self, now):
        """A tick of the heartbeat clock: (bytes of a ping to send or None, ConnectionLost to end
        the connection with or None)."""
        if self.lost is not None:
            return None, None
        beat = self.heartbeat_ms / 1000
        quiet = now - self.last_received
        if quiet > DEAD_AFTER_HEARTBEATS * beat:
            return None, ConnectionLost(f"nothing received from the broker for {quiet:.1f}s")
        if quiet >= beat and now - self._last_ping >= beat:
            self._last_ping = now
            rid = next(self._rids)
            self._pending[rid] = _IGNORED    # the pong only proves the broker alive
            return encode_frame({"op": "ping", "rid": rid}), None
        return None, None

    # --- attachments ---------------------------------------------------------------------------

    def detach(self, obj):
        self._attachments.detach(obj.kind, obj.id)

    def producers(self):
        return [o for o in self._attachments.by_id.values() if isinstance(o, ProducerCore)]

    # --- reading -------------------------------------------------------------------------------

    def receive_data(self, data, now):
        """Bytes from the broker: the events they make, in order. If they cannot be used (a bad
        frame, a push that does not follow the protocol), the last event is (BROKEN, exception),
        after the events of the frames before: the connection must then be abandoned."""
        self.last_received = now
        decoder = self._decoder
        decoder.feed(data)
        events = []
        try:
            for frame in decoder:
                self._handle(frame, events)
        except Exception as exc:
            events.append((BROKEN, exc))
        return events

    def _handle(self, frame, events):
        op = frame["op"]
        if op == "message":
            target = self._attachments.route(frame)
            if target is not None and target._end is None:
                events.append((MESSAGES, target, messages_of_push(frame, target.id)))
        elif op == "active" or op == "closed":
            target = self._attachments.route(frame)
            if target is not None:
                self._push(target, frame, events)
        elif op == "ping":
            # (skippable: while another thread's write waits for the broker to read, what it
            # writes proves us alive, and the reader must not wait behind it: it would read no
            # more, and take the broker's own pings for silence)
            events.append((WRITE, encode_frame({"op": "pong", "rid": frame.get("rid", 0)}), False))
        elif op == "event":   # the lifecycle event stream of a `watch` (docs/protocol.md, "Events")
            events.append((EVENT, frame))
        elif "rid" in frame:
            entry = self._pending.pop(frame["rid"], None)
            if entry is not None:
                self._reply(entry, frame, events)
        elif op == "error":
            error = error_from_frame(frame)
            if error.code in FATAL_CODES or error.code == OVERLOADED:
                self.last_error = error
            else:
                import logging   # only here: the client imports no more than it needs
                logging.getLogger("actorbroker.client").warning("broker error on a one-way op: %s", error)

    def _push(self, target, frame, events):
        if frame["op"] == "message":
            if target._end is None:
                events.append((MESSAGES, target, messages_of_push(frame, target.id)))
        elif frame["op"] == "active":
            events.append((ACTIVE, target, bool(frame.get("active"))))
        else:
            self._attachments.detach(target.kind, target.id)
            reason = frame.get("reason", "closed")
            if (self.reopens and not self.closing and not self.final and reason in REOPEN_REASONS
                    and getattr(target, "_reopen_frame", None) is not None):
                self._reopening[target] = reason
                self.detached.append(target)
                events.append((REOPEN, target, reason))
            else:
                events.append((CLOSED, target, reason))

    def _reply(self, entry, frame, events):
        error = error_from_frame(frame) if frame["op"] == "error" else None
        kind = entry[0]
        if kind is RECEIPT:
            events.append((RECEIPT, entry[1], entry[2], None if error else frame, error))
            return
        if kind is _CLOSING:
            gone = error is not None and error.code in (UNKNOWN_PRODUCER, UNKNOWN_CONSUMER)
            events.append((REPLY, entry[1], None, None if gone else error))
            return
        if entry is _IGNORED:
            return
        if kind is _ABANDONED:   # opened after all, for nobody: closed again
            ident = frame.get(entry[1]) if error is None else None
            if ident is not None:
                events.append((WRITE, self._close_abandoned(entry[1], ident)))
            return
        _, waiter, make, opens = entry
        result = frame
        if error is None and make is not None:
            try:
                result = make(frame)
                if opens is not None:
                    for push in self._attachments.attach(opens, result.id, result):
                        self._push(result, push, events)
            except Exception as exc:
                error = exc
        if opens is not None:
            self._attachments.end_open(frame["rid"])
        events.append((REPLY, waiter, None if error else result, error))

    # --- the end -------------------------------------------------------------------------------

    def connection_lost(self, error, keep=False):
        """The connection is gone: the events that tell everyone (None if it was already gone).
        keep: a client that reconnects keeps its producers and consumers (in `detached`, no LOST
        event for them); what waited for a reply or a receipt fails all the same."""
        if self.lost is not None:
            return None
        self.lost = error
        if keep:
            self.detached += self._attachments.take_all()
        pending, self._pending = self._pending, {}
        events = []
        for entry in pending.values():
            if entry[0] is RECEIPT:
                events.append((RECEIPT, entry[1], entry[2], None, ConnectionLost(str(error))))
            elif entry[0] is _CLOSING:
                events.append((REPLY, entry[1], None, None))
            elif entry[0] is REPLY:
                events.append((REPLY, entry[1], None, ConnectionLost(str(error))))
        for obj in self._attachments.take_all():
            events.append((LOST, obj, error, self.closing))
        return events


def end_unopened(obj, reason, error):
    """A reopen of obj failed for good: it ends with the `closed` reason it was being reopened
    after (ClientCore.reopen_reason), or, after a lost connection (None), as lost with error."""
    if reason is not None:
        obj._closed(reason)
    else:
        obj._lost(error, False)


def dispatch(events, client):
    """Carry out events: `client._settle(waiter, result, error)`, `client._write_quietly(data)`
    and `client._reopen_later(obj)` are the I/O layer's; producers and consumers get `_receipt`, `_deliver`, `_activated`, `_closed` and
    `_lost` calls. A BROKEN event raises its exception, after the events before it."""
    for event in events:
        kind = event[0]
        if kind is MESSAGES:
            event[1]._deliver(event[2])
        elif kind is RECEIPT:
            event[1]._receipt(event[2], event[3], event[4])
        elif kind is REPLY:
            client._settle(event[1], event[2], event[3])
        elif kind is ACTIVE:
            event[1]._activated(event[2])
        elif kind is CLOSED:
            event[1]._closed(event[2])
        elif kind is LOST:
            event[1]._lost(event[2], event[3])
        elif kind is WRITE:
            client._write_quietly(event[1], wait=len(event) < 3 or event[2])
        elif kind is EVENT:
            client._event(event[1])
        elif kind is REOPEN:
            client._reopen_later(event[1])
        elif kind is BROKEN:
            raise event[1]
