"""The protocol state of one client connection, sans-IO: bytes in, events out.

A `Session` is fed what the socket read (`receive_data`) and returns events for the actor that
owns the socket; the bytes to write accumulate in `outbox`. It handles everything that needs no
other actor: framing, `hello`, `ping`/`pong`, the heartbeat clock, the shape of the hot ops
(`send`, `flow`, `ack`, `nack`) and which producer and consumer ids are open on the connection.
No sockets, no actors, no clock of its own (the caller passes `now`).

Events (tuples, first element the kind):
  ("hello", client, permissions)              hello accepted (permissions None: auth is off)
  ("publish", producer_id, rid, send)         send: [count, payloads (msgpack array bytes), keys,
                                              attrs, payload bytes] (codec's run fields; the topic
                                              adds offset, time and producer)
  ("flow", consumer_id, credits)
  ("ack", consumer_id, ids, rid)              answered by whoever owns the subscription
  ("nack", consumer_id, ids, delay_ms)
  ("control", frame)                          control and admin ops, for the supervisor
  ("closed", reason)                          the connection must end (after the outbox is sent)

A fatal error in what the client sent (BAD_FRAME, FRAME_TOO_LARGE, NOT_CONNECTED, ...) stops the
reading of requests at once; its error frame ends the outbox, and the owner may take it back
(`hold_fatal`) to write the answers to the requests read before it first, then `release_fatal`.
"""
import ipaddress

from actorbroker.transport import errors as E, validate
from actorbroker.transport.codec import (FrameDecoder, SUPPORTED_VERSIONS, encode_frame, max_message_bytes,
                                         pack_payloads)
from actorbroker.transport.validate import Invalid, is_uint

# Ops answered by a frame of their own: they must carry a valid rid.
REPLY_OPS = frozenset({"hello", "ping", "producer", "send", "close_producer", "subscribe",
                       "close_consumer", "unsubscribe", "topics", "stats", "delete_topic",
                       "broker_stats", "lookup", "cluster", "watch", "unwatch"})
ONE_WAY_OPS = frozenset({"flow", "ack", "nack", "pong"})
HELLO_MAX_FRAME = 64 * 1024   # before hello: a connection costs a socket and a small buffer only
MAX_ERROR_TEXT = 200          # characters of an error message: a request is never echoed back whole
ENDED_KEPT = 64               # consumers the broker ended that a session remembers the reason for


def error_frame(code, message, rid=None):
    if len(message) > MAX_ERROR_TEXT:
        message = message[:MAX_ERROR_TEXT - 3] + "..."
    frame = {"op": "error", "code": code, "message": message}
    if rid is not None:
        frame["rid"] = rid
    return encode_frame(frame)


class SessionConfig:
    """What a session needs of the broker's configuration (plain values)."""
    __slots__ = ("max_frame", "heartbeat_ms", "hello_timeout_ms", "tokens", "broker_name",
                 "refuse_tokens", "max_pending_bytes", "frame_timeout_s")

    def __init__(self, config):
        self.max_frame = config.max_frame
        self.heartbeat_ms = config.heartbeat_ms
        self.hello_timeout_ms = config.hello_timeout_ms
        self.tokens = config.tokens
        self.broker_name = config.broker_name
        self.max_pending_bytes = config.max_pending_bytes
        self.frame_timeout_s = config.frame_timeout_ms / 1000.0
        # a token sent in the clear where others may read it is refused, so that it is noticed
        self.refuse_tokens = not (config.tls_cert or config.allow_plain_tokens or is_loopback(config.host))


def is_loopback(host):
    """Whether a listener bound to `host` is reachable from this machine only (no DNS lookup:
    a name other than localhost counts as reachable from elsewhere)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Session:
    __slots__ = ("id", "config", "decoder", "outbox", "hello_done", "heartbeat_s", "last_recv",
                 "ping_sent", "ping_rid", "producers", "consumers", "ended", "open", "opened_at",
                 "frame_started", "frame_start", "version", "fatal", "answering")

    def __init__(self, connection_id, config, now):
        self.id = connection_id
        self.config = config
        self.decoder = FrameDecoder(min(config.max_frame, HELLO_MAX_FRAME))   # raised by hello
        self.outbox = bytearray()
        self.frame_start = 0      # offset in outbox of its first frame not yet begun on the wire
        self.frame_started = None  # when the first byte of the frame being received arrived
        self.hello_done = False
        self.version = 1          # the protocol version hello chose: the shape of `message` pushes
        self.heartbeat_s = config.heartbeat_ms / 1000.0
        self.last_recv = now
        self.opened_at = now
        self.ping_sent = False
        self.ping_rid = 0
        self.producers = {}     # producer id -> producer name
        self.consumers = set()  # consumer ids
        self.ended = {}         # consumer id -> why the broker ended it (the last ENDED_KEPT)
        self.open = True        # reading requests (False once closed or failed)
        self.fatal = None       # the error frame of a fatal error in what the client sent
        self.answering = False  # failed, its error frame held back: still writing answers (hold_fatal)

    def consumer_ended(self, consumer_id, reason):
        """The broker ended this consumer (its `closed` push says why): later flow/ack/nack for
        it are refused here, saying so."""
        self.consumers.discard(consumer_id)
        self.ended[consumer_id] = reason
        if len(self.ended) > ENDED_KEPT:
            del self.ended[next(iter(self.ended))]

    # --- input ----------------------------------------------------------------------------------
    def receive_data(self, data, now):
        """Feed bytes read from the socket; returns the events they make."""
        if not self.open:
            return []
        self.last_recv = now
        self.ping_sent = False
        self.decoder.feed(data)
        events = []
        frames = 0
        try:
            for frame in self.decoder:
                frames += 1
                self._frame(frame, events)
                if not self.open:
                    break
        except E.ProtocolError as exc:
            self._fail(exc.code, exc.message, None, events)
        if not self.decoder.buffered:
            self.frame_started = None
        elif frames or self.frame_started is None:   # a new frame began in this read
            self.frame_started = now
        return events

    def paused(self, now):
        """The broker stopped reading this connection (its sends wait for the topic: backpressure):
        its silence is the broker's, not the client's, and the client, whose writes the broker
        does not take, must hear that the broker lives: a ping now (one per heartbeat while it
        lasts). Returns the seconds until the next check."""
        if self.open and self.hello_done:
            self.last_recv = now
            self.ping_rid += 1
            self.outbox += encode_frame({"op": "ping", "rid": self.ping_rid})
            self.ping_sent = True
        return self.heartbeat_s

    def check_heartbeat(self, now):
        """Returns (events, seconds until the next check)."""
        if not self.open:
            return [], None
        events = []
        frame_due = None
        if self.frame_started is not None:   # any byte resets the heartbeat clock, not this one
            frame_due = self.frame_started + self.config.frame_timeout_s - now
            if frame_due <= 0:
                self._fail(E.BAD_FRAME, f"frame not complete within {self.config.frame_timeout_s:g} s "
                           "of its first byte", None, events)
                return events, None
        if not self.hello_done:
            due = self.opened_at + self.config.hello_timeout_ms / 1000.0 - now
            if due <= 0:
                self._fail(E.NOT_CONNECTED, "no hello within the hello timeout", None, events)
                return events, None
            # never 0: a caller that checks again at `now + due` with the same clock reading must
            # not find it due again (the shard spun on a hello deadline under a millisecond away)
            return events, max(due if frame_due is None else min(due, frame_due), 0.01)
        idle = now - self.last_recv
        if idle >= 2 * self.heartbeat_s:
            self.open = False
            events.append(("closed", f"heartbeat timeout ({idle:.1f}s silent)"))
            return events, None
        if idle >= self.heartbeat_s and not self.ping_sent:
            self.ping_rid += 1
            self.outbox += encode_frame({"op": "ping", "rid": self.ping_rid})
            self.ping_sent = True
        due = self.heartbeat_s - idle if idle < self.heartbeat_s else 2 * self.heartbeat_s - idle
        if frame_due is not None:
            due = min(due, frame_due)
        return events, max(due, 0.01)

    # --- output ---------------------------------------------------------------------------------
    def write(self, data):
        if self.open or self.answering:
            self.outbox += data

    def sent(self, n):
        """`n` bytes of the outbox went to the socket: drop them, keeping track of where the first
        frame not yet begun on the wire starts (all frames in the outbox are whole)."""
        outbox = self.outbox
        if n >= len(outbox):
            outbox.clear()
            self.frame_start = 0
            return
        start = self.frame_start
        while start < n:
            start += 4 + int.from_bytes(outbox[start:start + 4], "big")
        del outbox[:n]
        self.frame_start = start - n

    def check_outbox(self):
        """A client that does not read: beyond max_pending_bytes unsent, the frames not begun on
        the wire are dropped and the connection ends with SLOW_CONSUMER (after the frame it is
        in the middle of). Returns the events."""
        events = []
        if self.open and len(self.outbox) > self.config.max_pending_bytes:
            del self.outbox[self.frame_start:]
            self._fail(E.SLOW_CONSUMER, f"more than {self.config.max_pending_bytes} bytes waiting to be "
                       "written to this connection: it does not read fast enough", None, events, hold=False)
        return events

    def error(self, code, message, rid=None):
        self.write(error_frame(code, message, rid))

    def ok(self, rid):
        if rid is not None:
            self.write(encode_frame({"op": "ok", "rid": rid}))

    def close(self, reason, events):
        if self.open:
            self.open = False
            events.append(("closed", reason))

    # --- frames ---------------------------------------------------------------------------------
    def _frame(self, frame, events):
        op = frame["op"]
        rid = frame.get("rid")
        if not self.hello_done and op != "hello":
            self._fail(E.NOT_CONNECTED, f"'{op}' before hello", rid if is_uint(rid) else None, events)
            return
        if op == "send":           # the hot op first
            if is_uint(rid):
                self._send(frame, rid, events)
            else:
                self.error(E.BAD_REQUEST, "'send' needs a 'rid' (int >= 0)")
            return
        if op not in REPLY_OPS and op not in ONE_WAY_OPS:
            self.error(E.UNKNOWN_OP, f"unknown op '{op}'", rid if is_uint(rid) else None)
            return
        if op in REPLY_OPS and not is_uint(rid):
            self.error(E.BAD_REQUEST, f"'{op}' needs a 'rid' (int >= 0)")
            return
        if op in ONE_WAY_OPS and rid is not None and not is_uint(rid):
            self.error(E.BAD_REQUEST, "'rid' must be an int >= 0")
            return
        if op == "hello":
            self._hello(frame, rid, events)
        elif op == "ping":
            self.write(encode_frame({"op": "pong", "rid": rid}))
        elif op == "pong":
            pass   # receiving it already proved the client alive
        elif op in ("flow", "ack", "nack"):
            self._consumer_op(op, frame, rid, events)
        else:
            self._control(frame, rid, events)

    def _control(self, frame, rid, events):
        """Control and admin ops go to the supervisor as a clean copy (known fields only)."""
        try:
            frame = validate.control(frame)
        except Invalid as exc:
            self.error(exc.code, exc.message, rid)
            return
        # forget routes of what closes now, so that frames pipelined after the close are
        # refused here, in order
        op = frame["op"]
        if op == "close_producer":
            self.producers.pop(frame["producer"], None)
        elif op in ("close_consumer", "unsubscribe"):
            self.consumers.discard(frame["consumer"])
        events.append(("control", frame))

    def _hello(self, frame, rid, events):
        if self.hello_done:
            self.error(E.BAD_REQUEST, "second hello", rid)
            return
        version = frame.get("version")
        if type(version) is not int:
            self.error(E.BAD_REQUEST, "'version' must be an int", rid)
            return
        if version not in SUPPORTED_VERSIONS:
            self._fail(E.UNSUPPORTED_VERSION, f"version {version} is not served (only "
                       f"{', '.join(map(str, SUPPORTED_VERSIONS))})", rid, events)
            return
        try:
            client, token, wish = validate.hello(frame)
        except Invalid as exc:
            self.error(exc.code, exc.message, rid)
            return
        if token is not None and self.config.refuse_tokens:
            self._fail(E.AUTH_FAILED, "tokens are refused over plain TCP on a non-loopback listener "
                       "(anyone on the path can read them): connect with TLS, or serve with "
                       "--allow-plain-tokens", rid, events)
            return
        permissions = None
        if self.config.tokens:
            if token is None or token not in self.config.tokens:
                self._fail(E.AUTH_FAILED, "missing or wrong token", rid, events)
                return
            permissions = tuple(self.config.tokens[token])
        heartbeat_ms = self.config.heartbeat_ms if wish is None else min(max(wish, 200), 60000)
        self.heartbeat_s = heartbeat_ms / 1000.0
        self.hello_done = True
        self.version = version
        self.decoder.max_frame = self.config.max_frame
        events.append(("hello", client, permissions))
        self.write(encode_frame({"op": "welcome", "rid": rid, "version": version,
                                 "broker": self.config.broker_name, "heartbeat_ms": heartbeat_ms,
                                 "max_frame": self.config.max_frame}))

    def _send(self, frame, rid, events):
        producer_id = frame.get("producer")
        if type(producer_id) is not int:
            self.error(E.BAD_REQUEST, "'producer' must be an int", rid)
            return
        name = self.producers.get(producer_id)
        if name is None:
            self.error(E.UNKNOWN_PRODUCER, f"producer {producer_id} is not open on this connection", rid)
            return
        limit = max_message_bytes(self.config.max_frame, name)
        payloads = frame.get("payloads")
        if payloads is not None and self.version >= 2:
            send = self._columns(frame, payloads, limit, rid)
        else:
            send = self._msgs(frame.get("msgs"), limit, rid)
        if send is not None:
            events.append(("publish", producer_id, rid, send))

    def _columns(self, frame, payloads, limit, rid):
        """A v2 send: `payloads`, and `keys` / `attrs` of the same length when given."""
        if type(payloads) is not list or not payloads:
            self.error(E.BAD_REQUEST, "'payloads' must be a non-empty list", rid)
            return None
        n = len(payloads)
        keys, attrs = frame.get("keys"), frame.get("attrs")
        for field, column in (("keys", keys), ("attrs", attrs)):
            if column is not None and (type(column) is not list or len(column) != n):
                self.error(E.BAD_REQUEST, f"'{field}' must be a list as long as 'payloads'", rid)
                return None
        if keys is not None and keys.count(None) == n:
            keys = None
        if attrs is not None and all(a is None or a == {} for a in attrs):   # (not any falsy value: [] is no map)
            attrs = None
        # the hot case, checked in C: every payload bytes and small enough, no keys, no attrs
        if keys is None and attrs is None and set(map(type, payloads)) == {bytes} \
                and max(map(len, payloads)) <= limit:
            return [n, pack_payloads(payloads), None, None, sum(map(len, payloads))]
        for i, payload in enumerate(payloads):
            problem = validate.message_problem(payload, None if keys is None else keys[i],
                                               None if attrs is None else attrs[i], limit)
            if problem:
                self.error(E.BAD_REQUEST, f"message {i}: {problem}", rid)
                return None
        if attrs is not None:
            attrs = [a or {} for a in attrs]
        return [n, pack_payloads(payloads), keys, attrs, sum(map(len, payloads))]

    def _msgs(self, msgs, limit, rid):
        """A v1 send: `msgs`, a map per message."""
        if type(msgs) is not list or not msgs:
            self.error(E.BAD_REQUEST, "'msgs' must be a non-empty list", rid)
            return None
        payloads, keys, attrs = [], [], []
        for i, m in enumerate(msgs):   # the hot loop of a v1 send: checks are kept cheap
            if type(m) is not dict:
                problem = "must be a map"
            else:
                payload, key, attr = m.get("payload"), m.get("key"), m.get("attrs")
                if key is None and (attr is None or attr == {}) and type(payload) is bytes \
                        and len(payload) <= limit:   # the common record: nothing more to check
                    payloads.append(payload)
                    keys.append(None)
                    attrs.append(None)
                    continue
                problem = validate.message_problem(payload, key, attr, limit)
            if problem:
                self.error(E.BAD_REQUEST, f"msgs[{i}]: {problem}", rid)
                return None
            payloads.append(payload)
            keys.append(key)
            attrs.append(attr or None)
        n = len(payloads)
        keys = None if keys.count(None) == n else keys
        attrs = None if attrs.count(None) == n else [a or {} for a in attrs]
        return [n, pack_payloads(payloads), keys, attrs, sum(map(len, payloads))]

    def _consumer_op(self, op, frame, rid, events):
        """flow, ack, nack: checked here, then straight to the consumer's dispatcher."""
        try:
            # every field checked first (BAD_REQUEST), then whether the consumer is open here
            consumer_id = validate.ident(frame, "consumer")
            if op == "flow":
                event = ("flow", consumer_id, validate.credits(frame))
            elif op == "nack":
                event = ("nack", consumer_id, validate.ids(frame), validate.delay(frame))
            else:
                event = ("ack", consumer_id, validate.ids(frame), rid)
            if consumer_id not in self.consumers:
                why = self.ended.get(consumer_id)
                self.error(E.UNKNOWN_CONSUMER, f"consumer {consumer_id} is not open on this connection" + (
                    f": the broker closed it ({why})" if why else ""), rid)
                return
            events.append(event)
            if op == "ack":   # the dispatcher answers, once the ack is durable on a reliable topic
                return
        except Invalid as exc:
            self.error(exc.code, exc.message, rid)
            return
        self.ok(rid)

    def _fail(self, code, message, rid, events, hold=True):
        """A fatal protocol error: say why, then close. `hold`: an error in what the client sent,
        whose frame the owner may hold back until the requests read before it are answered."""
        frame = error_frame(code, message, rid)
        if hold and self.open:
            self.fatal = frame
        self.write(frame)
        self.close(f"{code}: {message[:MAX_ERROR_TEXT]}", events)

    def hold_fatal(self):
        """Just after a fatal error in what the client sent (its `closed` event, before the outbox
        went to the socket): take its error frame back off the end of the outbox, and keep taking
        writes, so that the answers to the requests read before it go first. Returns whether it
        was held; release_fatal() writes it, last."""
        frame = self.fatal
        start = len(self.outbox) - len(frame) if frame is not None else -1
        if self.open or self.answering or start < self.frame_start or not self.outbox.endswith(frame):
            return False
        del self.outbox[start:]
        self.answering = True
        return True

    def release_fatal(self):
        """The answers are written (or their time is up): the held error frame goes last, and
        nothing is written after it."""
        if self.answering:
            self.answering = False
            self.outbox += self.fatal
        self.fatal = None

