"""Pure pieces shared by the threaded client (client.py) and the asyncio client (aio_client.py):
the Message type, frame builders, send batching arithmetic, receiver-queue credits, push routing.
No sockets and no threads here."""
import logging
import uuid
from dataclasses import dataclass, field

from actorbroker.transport.codec import PROTOCOL_VERSION
from actorbroker.transport.errors import BAD_REQUEST, FATAL_CODES, OVERLOADED, error_for

log = logging.getLogger("actorbroker.client")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6650
PUSH_OPS = frozenset({"message", "closed", "active"})

# Bytes of a `send` frame around its records: length header, op, rid, producer id, msgs array header.
SEND_OVERHEAD = 64
# A record must also fit, alone, in the broker's `message` push to a consumer, whose envelope adds
# the producer name, id, time and redeliveries; this margin covers that with room to spare.
PUSH_MARGIN = 128


@dataclass(frozen=True, slots=True)
class Message:
    """One delivered message; `id` is its topic offset, `time` its publish time (ms since epoch)."""
    id: int
    payload: bytes
    key: str | None = None
    attrs: dict = field(default_factory=dict)
    time: int = 0
    producer: str = ""
    redeliveries: int = 0
    consumer_id: int | None = None

    @property
    def text(self):
        return self.payload.decode("utf-8")


def message_from_record(record, consumer_id):
    return Message(id=record["id"], payload=record["payload"], key=record.get("key"),
                   attrs=record.get("attrs") or {}, time=record.get("time", 0),
                   producer=record.get("producer", ""), redeliveries=record.get("redeliveries", 0),
                   consumer_id=consumer_id)


def parse_url(url, default_port=DEFAULT_PORT):
    """"host:port" (or "host", or ":port") as (host, port)."""
    host, sep, port = url.rpartition(":")
    if not sep:
        return url or DEFAULT_HOST, default_port
    return host or DEFAULT_HOST, int(port)


def default_consumer_name(client_name):
    return f"{client_name}-{uuid.uuid4().hex[:12]}"


# --- frames -----------------------------------------------------------------------------------

def _with_optional(frame, **optional):
    """`frame` plus the optional fields that were given (None means: let the broker decide)."""
    frame.update((k, v) for k, v in optional.items() if v is not None)
    return frame


def hello_frame(client_name, token=None, heartbeat_ms=None):
    return _with_optional({"op": "hello", "version": PROTOCOL_VERSION, "client": client_name},
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


def ids_of(msg_or_ids):
    """Message ids from a Message, an int, or an iterable of either."""
    if isinstance(msg_or_ids, Message):
        return [msg_or_ids.id]
    if isinstance(msg_or_ids, int):
        return [msg_or_ids]
    return [m.id if isinstance(m, Message) else int(m) for m in msg_or_ids]


def note_unanswered_error(client, error):
    """An error frame without rid: a fatal one (or a refused connection) is kept as the reason the
    broker is about to close; any other answers a one-way op (flow, ack, nack), so it is logged."""
    if error.code in FATAL_CODES or error.code == OVERLOADED:
        client._last_error = error
    else:
        log.warning("broker error on a one-way op: %s", error)


def reply_fields(frame):
    """A reply without its envelope (op, rid): what admin calls return."""
    return {k: v for k, v in frame.items() if k not in ("op", "rid")}


# --- batching ---------------------------------------------------------------------------------

def record_for(payload, key=None, attrs=None):
    """The `msgs` element for one message, and an upper bound of its msgpack size.

    The bound is computed instead of packing twice; each str/bin/map header counts 5 bytes (their
    largest form), and each attribute 10 bytes more, as the broker's own size check does."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    elif not isinstance(payload, bytes):
        payload = bytes(payload)
    record = {"payload": payload}
    size = 1 + 8 + 5 + len(payload)
    if key is not None:
        record["key"] = key
        size += 4 + 5 + len(key.encode("utf-8"))
    if attrs:
        record["attrs"] = attrs
        size += 6 + 5 + sum(20 + len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in attrs.items())
    return record, size


def max_message_size(max_frame, producer_name):
    """Largest record (as measured by record_for) that the broker can take and deliver."""
    return max_frame - PUSH_MARGIN - len(producer_name.encode("utf-8"))


def too_large(size, limit):
    return error_for(BAD_REQUEST, f"message of about {size} bytes is larger than the {limit} bytes "
                                  f"this broker's max_frame allows")


class Batch:
    """Records collected for one `send` frame; subclasses add how waiters learn the receipt."""

    def __init__(self):
        self.records = []
        self.size = SEND_OVERHEAD

    def add(self, record, size):
        self.records.append(record)
        self.size += size
        return len(self.records) - 1


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
        ready = []
        batch = self.current
        if batch is not None and batch.size + size > self.max_frame:
            ready.append(batch)
            batch = None
        if batch is None:
            batch = self.new_batch()
        index = batch.add(record, size)
        if len(batch.records) >= self.max_batch:
            ready.append(batch)
            self.current = None
        else:
            self.current = batch
        return batch, index, ready

    def take(self):
        batch, self.current = self.current, None
        return batch


# --- receiver queue credits -------------------------------------------------------------------

class CreditWindow:
    """Pulsar-style receiver queue: `size` credits up front, then the consumed ones are granted
    back in one `flow` once half the queue has been taken, so that at most `size` messages are
    ever credited but not yet taken by the application."""

    def __init__(self, size):
        if size < 1:
            raise ValueError("receiver_queue must be at least 1")
        self.size = size
        self.threshold = max(1, size // 2)
        self.taken = 0

    def initial(self):
        return self.size

    def take(self):
        """Count one message taken; returns the credits to grant now (0: none yet)."""
        self.taken += 1
        if self.taken < self.threshold:
            return 0
        grant, self.taken = self.taken, 0
        return grant


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
