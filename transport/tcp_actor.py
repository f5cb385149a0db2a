"""TcpTransportActor: owns one client socket.

It reads through Thespian's watched sockets, decodes frames with the sans-IO codec, handles the
session-level ops itself (hello, ping/pong, heartbeat, framing errors), routes the hot ops
(send, flow, ack, nack) straight to the Topic or Dispatcher that owns them, and passes control ops
to its supervisor (the ConnectionActor). Writes go through a non-blocking buffer.

When the socket ends, for whatever reason, it sends ConnectionClosed to its supervisor at once
and exits: the end of the connection is itself the cleanup signal.
"""
import socket
import time
from datetime import timedelta

from thespian.actors import ThespianWatch

from actorbroker.actors.base import BrokerActor, log
from actorbroker.actors import dispatcher, topic as topic_actor
from actorbroker.transport import errors as E
from actorbroker.transport.codec import (FrameDecoder, PROTOCOL_VERSION, PUSH_OVERHEAD, encode_frame,
                             encode_message_frames, encode_record_tail)
# The messages this actor handles (on_<Name>) are in transport/messages.py.
from actorbroker.transport.messages import AdoptSocket, ClientHello, ClientRequest, ConnectionClosed

READ_SIZE = 256 * 1024
MAX_READ_PER_MESSAGE = 512 * 1024       # per message: bounds a Publish, lets deliveries in
HIGH_WATER = 1024 * 1024                 # above this many unsent bytes, deliveries wait
PUBLISH_WINDOW = 2                       # Publish in flight per producer; the rest is merged
MAX_PENDING_RECORDS = 20_000             # then stop reading: TCP pushes back on the producer
RETRY_WRITE_S = 0.005
LINGER_S = 1.0

# Ops answered by a frame of their own: they must carry a valid rid.
REPLY_OPS = {"hello", "ping", "producer", "send", "close_producer", "subscribe", "close_consumer",
             "unsubscribe", "topics", "stats", "delete_topic"}
ONE_WAY_OPS = {"flow", "ack", "nack", "pong"}
CONTROL_OPS = {"producer", "close_producer", "subscribe", "close_consumer", "unsubscribe",
               "topics", "stats", "delete_topic"}


def error_frame(code, message, rid=None):
    frame = {"op": "error", "code": code, "message": message}
    if rid is not None:
        frame["rid"] = rid
    return encode_frame(frame)


def is_uint(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_str_map(value):
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


class _Outgoing:
    """Sends of one producer on their way to its topic."""
    __slots__ = ("topic", "name", "sends", "records", "in_flight")

    def __init__(self, topic, name):
        self.topic, self.name = topic, name
        self.sends, self.records, self.in_flight = [], 0, 0


class _Tick:
    """Our own wakeup payloads, told apart by kind."""
    HEARTBEAT = "heartbeat"
    WRITE = "write"
    LINGER = "linger"


class TcpTransportActor(BrokerActor):
    process_name = "ab-transport"
    init_message = AdoptSocket

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sock = None
        self.fd = None
        self.supervisor = None
        self.connection_id = None
        self.config = None
        self.decoder = None
        self.outbuf = bytearray()
        self.hello_done = False
        self.heartbeat_s = 5.0
        self.last_recv = time.monotonic()
        self.ping_sent = False
        self.ping_rid = 0
        self.producers = {}      # producer id -> (topic address, name)
        self.consumers = {}      # consumer id -> dispatcher address
        self.outgoing = {}       # producer id -> _Outgoing (sends not yet given to the topic)
        self.pending_records = 0
        self.deferred_acks = []  # (dispatcher, consumer id) waiting for the buffer to drain
        self.write_retry_pending = False
        self.heartbeat_timer = 0  # only the newest heartbeat wakeup counts
        self.state = "new"       # new -> open -> lingering -> closed

    # --- the watch is returned after every message (see BrokerActor) ----------------------
    def watch(self):
        if self.sock is None or self.state == "closed":
            return None
        if self.state == "open" and self.pending_records >= MAX_PENDING_RECORDS:
            return None  # paused: the kernel buffer fills and the producer is pushed back
        return ThespianWatch([self.fd])

    # --- set-up ---------------------------------------------------------------------------------
    def on_AdoptSocket(self, msg, sender):
        self.supervisor = sender
        self.connection_id = msg.connection_id
        self.config = msg.config
        self.sock = socket.socket(fileno=msg.fd)
        self.fd = msg.fd
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder(self.config.max_frame)
        self.heartbeat_s = self.config.heartbeat_ms / 1000.0
        self.last_recv = time.monotonic()
        self.state = "open"
        self._heartbeat_after(self.config.hello_timeout_ms / 1000.0)

    # --- reading ----------------------------------------------------------------------------------
    def on_WatchMessage(self, msg, sender):
        if self.sock is None or self.fd not in msg.ready:
            return
        if self.state == "lingering":
            self._drain_lingering()
            return
        if self.state != "open":
            return
        got = 0
        while got < MAX_READ_PER_MESSAGE:
            try:
                data = self.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._closed(f"socket error: {exc}")
                return
            if not data:
                self._closed("eof")
                return
            got += len(data)
            self.decoder.feed(data)
            if len(data) < READ_SIZE:
                break
        if got:
            self.last_recv = time.monotonic()
            self.ping_sent = False
            self._handle_frames()

    def _handle_frames(self):
        publishes = {}  # producer id -> [(rid, msgs)], one Publish per producer per read
        try:
            for frame in self.decoder:
                fatal = self._handle_frame(frame, publishes)
                if fatal:
                    break
        except E.ProtocolError as exc:
            self._send_publishes(publishes)
            self._fail(exc.code, exc.message)
            return
        self._send_publishes(publishes)
        self._flush()

    def _handle_frame(self, frame, publishes):
        """Handle one decoded frame; returns True when the connection is being closed."""
        op = frame["op"]
        rid = frame.get("rid")
        if not self.hello_done and op != "hello":
            self._fail(E.NOT_CONNECTED, f"'{op}' before hello")
            return True
        if op not in REPLY_OPS and op not in ONE_WAY_OPS:
            self._error(E.UNKNOWN_OP, f"unknown op '{op}'", rid if is_uint(rid) else None)
            return False
        if op in REPLY_OPS and not is_uint(rid):
            self._error(E.BAD_REQUEST, f"'{op}' needs a 'rid' (int >= 0)")
            return False
        if op in ONE_WAY_OPS and rid is not None and not is_uint(rid):
            self._error(E.BAD_REQUEST, "'rid' must be an int >= 0")
            return False
        handler = getattr(self, "_op_" + op, None)
        if handler is not None:
            return handler(frame, rid, publishes)
        # control and admin ops belong to the supervisor; forget routes of what is closing now so
        # that frames pipelined after the close are refused here, in order.
        if op == "close_producer" and frame.get("producer") in self.producers:
            self._drop_producer(frame["producer"], publishes)
        elif op in ("close_consumer", "unsubscribe") and isinstance(frame.get("consumer"), int):
            self.consumers.pop(frame["consumer"], None)
        self.send(self.supervisor, ClientRequest(frame))
        return False

    def _op_hello(self, frame, rid, publishes):
        if self.hello_done:
            self._error(E.BAD_REQUEST, "second hello", rid)
            return False
        version = frame.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            self._error(E.BAD_REQUEST, "'version' must be an int", rid)
            return False
        if version != PROTOCOL_VERSION:
            self._fail(E.UNSUPPORTED_VERSION, f"version {version} is not served (only {PROTOCOL_VERSION})", rid)
            return True
        client = frame.get("client")
        if not isinstance(client, str):
            self._error(E.BAD_REQUEST, "'client' must be a str", rid)
            return False
        token = frame.get("token")
        if token is not None and not isinstance(token, str):
            self._error(E.BAD_REQUEST, "'token' must be a str", rid)
            return False
        wish = frame.get("heartbeat_ms")
        if wish is not None and (not isinstance(wish, int) or isinstance(wish, bool)):
            self._error(E.BAD_REQUEST, "'heartbeat_ms' must be an int", rid)
            return False
        permissions = None
        if self.config.tokens:
            if token is None or token not in self.config.tokens:
                self._fail(E.AUTH_FAILED, "missing or wrong token", rid)
                return True
            permissions = tuple(self.config.tokens[token])
        heartbeat_ms = self.config.heartbeat_ms if wish is None else min(max(wish, 200), 60000)
        self.heartbeat_s = heartbeat_ms / 1000.0
        self.hello_done = True
        self.send(self.supervisor, ClientHello(client, permissions))
        self._write(encode_frame({"op": "welcome", "rid": rid, "version": PROTOCOL_VERSION,
                                  "broker": self.config.broker_name, "heartbeat_ms": heartbeat_ms,
                                  "max_frame": self.config.max_frame}))
        self._heartbeat_after(self.heartbeat_s)
        return False

    def _op_ping(self, frame, rid, publishes):
        self._write(encode_frame({"op": "pong", "rid": rid}))
        return False

    def _op_pong(self, frame, rid, publishes):
        return False  # receiving it already proved the client alive

    def _op_send(self, frame, rid, publishes):
        producer_id = frame.get("producer")
        if not isinstance(producer_id, int) or isinstance(producer_id, bool):
            self._error(E.BAD_REQUEST, "'producer' must be an int", rid)
            return False
        route = self.producers.get(producer_id)
        if route is None:
            self._error(E.UNKNOWN_PRODUCER, f"producer {producer_id} is not open on this connection", rid)
            return False
        msgs = frame.get("msgs")
        if not isinstance(msgs, list) or not msgs:
            self._error(E.BAD_REQUEST, "'msgs' must be a non-empty list", rid)
            return False
        records = []
        name = route[1]
        limit = self.config.max_frame - PUSH_OVERHEAD - 64 - len(name.encode())
        for i, m in enumerate(msgs):   # the hot loop of the record path: checks are kept cheap
            if type(m) is not dict:
                problem = "must be a map"
            else:
                payload, key, attrs = m.get("payload"), m.get("key"), m.get("attrs")
                problem = self._check_msg(payload, key, attrs, limit)
            if problem:
                self._error(E.BAD_REQUEST, f"msgs[{i}]: {problem}", rid)
                return False
            records.append((key, encode_record_tail(payload, key, attrs or {}, name), len(payload)))
        publishes.setdefault(producer_id, []).append((rid, records))
        return False

    @staticmethod
    def _check_msg(payload, key, attrs, limit):
        if type(payload) is not bytes:
            return "'payload' must be bin"
        if key is not None and type(key) is not str:
            return "'key' must be a str"
        if attrs and not is_str_map(attrs):
            return "'attrs' must be a map of str to str"
        if attrs is not None and type(attrs) is not dict:
            return "'attrs' must be a map of str to str"
        # 4 bytes per character bounds UTF-8; measure exactly only when the bound is too big
        bound = len(payload) + 4 * len(key or "") + (
            sum(4 * (len(k) + len(v)) + 10 for k, v in attrs.items()) if attrs else 0)
        if bound > limit:
            size = len(payload) + len((key or "").encode()) + (
                sum(len(k.encode()) + len(v.encode()) + 10 for k, v in attrs.items()) if attrs else 0)
            if size > limit:
                return (f"message of {size} bytes is too large to be delivered in one frame "
                        f"(max_frame {limit + PUSH_OVERHEAD + 64})")
        return None

    def _op_flow(self, frame, rid, publishes):
        consumer_id = self._routed_consumer(frame, rid)
        if consumer_id is None:
            return False
        credits = frame.get("credits")
        if not is_uint(credits):
            self._error(E.BAD_REQUEST, "'credits' must be an int >= 0", rid)
            return False
        self.send(self.consumers[consumer_id], dispatcher.Flow(consumer_id, credits))
        self._ok(rid)
        return False

    def _op_ack(self, frame, rid, publishes):
        return self._acknowledge(frame, rid, nack=False)

    def _op_nack(self, frame, rid, publishes):
        return self._acknowledge(frame, rid, nack=True)

    def _acknowledge(self, frame, rid, nack):
        consumer_id = self._routed_consumer(frame, rid)
        if consumer_id is None:
            return False
        ids = frame.get("ids")
        if not isinstance(ids, list) or not all(is_uint(i) for i in ids):
            self._error(E.BAD_REQUEST, "'ids' must be a list of ints >= 0", rid)
            return False
        if nack:
            delay = frame.get("delay_ms", 0)
            if not is_uint(delay):
                self._error(E.BAD_REQUEST, "'delay_ms' must be an int >= 0", rid)
                return False
            self.send(self.consumers[consumer_id], dispatcher.Nack(consumer_id, ids, delay))
            self._ok(rid)
        else:  # the dispatcher answers, once the ack is durable on a reliable topic
            self.send(self.consumers[consumer_id], dispatcher.Ack(consumer_id, ids, rid))
        return False

    def _routed_consumer(self, frame, rid):
        consumer_id = frame.get("consumer")
        if not isinstance(consumer_id, int) or isinstance(consumer_id, bool):
            self._error(E.BAD_REQUEST, "'consumer' must be an int", rid)
            return None
        if consumer_id not in self.consumers:
            self._error(E.UNKNOWN_CONSUMER, f"consumer {consumer_id} is not open on this connection", rid)
            return None
        return consumer_id

    def _send_publishes(self, publishes):
        """Adaptive batching: sends that arrive while PUBLISH_WINDOW batches of their producer are
        in flight wait here and go together in the next Publish."""
        for producer_id, sends in publishes.items():
            out = self.outgoing.get(producer_id)
            if out is None:
                continue
            out.sends.extend(sends)
            count = sum(len(records) for _, records in sends)
            out.records += count
            self.pending_records += count
            self._publish(producer_id, out)
        publishes.clear()

    def _publish(self, producer_id, out, force=False):
        if out.sends and (force or out.in_flight < PUBLISH_WINDOW):
            self.send_ordered(out.topic, topic_actor.Publish(producer_id, out.name, out.sends), producer_id)
            self.pending_records -= out.records
            out.sends, out.records = [], 0
            out.in_flight += 1

    def _drop_producer(self, producer_id, publishes=None):
        """The producer is closed: what it sent before goes to the topic now, then its channel ends."""
        if publishes:
            self._send_publishes(publishes)
        self.producers.pop(producer_id, None)
        out = self.outgoing.pop(producer_id, None)
        if out is not None:
            self._publish(producer_id, out, force=True)
            self.end_ordered(out.topic, producer_id)

    # --- messages from the broker side ----------------------------------------------------------
    def on_Outbound(self, msg, sender):
        self._write(msg.data)

    def on_RouteProducer(self, msg, sender):
        self.producers[msg.producer_id] = (msg.topic, msg.name)
        self.outgoing[msg.producer_id] = _Outgoing(msg.topic, msg.name)
        self._write(msg.data)

    def on_UnrouteProducer(self, msg, sender):
        self._drop_producer(msg.producer_id)
        self._write(msg.data)

    def on_RouteConsumer(self, msg, sender):
        self.consumers[msg.consumer_id] = msg.dispatcher
        self._write(msg.data)

    def on_UnrouteConsumer(self, msg, sender):
        self.consumers.pop(msg.consumer_id, None)
        self._write(msg.data)

    def on_Receipts(self, msg, sender):
        producer = self.outgoing.get(msg.producer_id)
        if producer is not None:
            producer.in_flight -= 1
            self._publish(msg.producer_id, producer)
        out = [encode_frame({"op": "receipt", "rid": rid, "first": first, "count": count})
               for rid, first, count in msg.items]
        out += [error_frame(code, text, rid) for rid, code, text in msg.errors]
        self._write(b"".join(out))

    def on_Deliver(self, msg, sender):
        if self.state == "open":
            self._write(b"".join(encode_message_frames(msg.consumer_id, msg.blobs, self.config.max_frame)))
        # Ack at once unless the client is slow to read; then when the buffer drains.
        if len(self.outbuf) < HIGH_WATER or self.state != "open":
            self.send(sender, dispatcher.DeliverAck(msg.consumer_id))
        else:
            self.deferred_acks.append((sender, msg.consumer_id))

    def on_WakeupMessage(self, msg, sender):
        if msg.payload == _Tick.WRITE:
            self.write_retry_pending = False
            self._flush()
        elif msg.payload == (_Tick.HEARTBEAT, self.heartbeat_timer):
            self._check_heartbeat()
        elif msg.payload == _Tick.LINGER:
            self._finish()

    def on_ActorExitRequest(self, msg, sender):
        if self.sock is not None and self.state in ("open", "lingering"):
            self._flush()
            self.sock.close()
        self.state = "closed"

    # --- heartbeat ------------------------------------------------------------------------------
    def _check_heartbeat(self):
        if self.state != "open":
            return
        if not self.hello_done:
            self._fail(E.NOT_CONNECTED, "no hello within the hello timeout")
            return
        idle = time.monotonic() - self.last_recv
        if idle >= 2 * self.heartbeat_s:
            self._closed(f"heartbeat timeout ({idle:.1f}s silent)")
            return
        if idle >= self.heartbeat_s and not self.ping_sent:
            self.ping_rid += 1
            self._write(encode_frame({"op": "ping", "rid": self.ping_rid}))
            self.ping_sent = True
        due = self.heartbeat_s - idle if idle < self.heartbeat_s else 2 * self.heartbeat_s - idle
        self._heartbeat_after(max(due, 0.01))

    def _heartbeat_after(self, seconds):
        self.heartbeat_timer += 1
        self.wakeupAfter(timedelta(seconds=seconds), payload=(_Tick.HEARTBEAT, self.heartbeat_timer))

    # --- writing --------------------------------------------------------------------------------
    def _ok(self, rid):
        if rid is not None:
            self._write(encode_frame({"op": "ok", "rid": rid}))

    def _error(self, code, message, rid=None):
        self._write(error_frame(code, message, rid))

    def _write(self, data):
        if data and self.state == "open":
            self.outbuf += data
            self._flush()

    def _flush(self):
        if self.sock is None or self.state not in ("open", "lingering"):
            return
        while self.outbuf:
            try:
                sent = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.outbuf.clear()
                if self.state == "open":
                    self._closed(f"socket error: {exc}")
                return
            del self.outbuf[:sent]
        if self.outbuf and not self.write_retry_pending:
            self.write_retry_pending = True
            self.wakeupAfter(timedelta(seconds=RETRY_WRITE_S), payload=_Tick.WRITE)
        if self.deferred_acks and len(self.outbuf) < HIGH_WATER:
            for address, consumer_id in self.deferred_acks:
                self.send(address, dispatcher.DeliverAck(consumer_id))
            self.deferred_acks.clear()

    # --- closing --------------------------------------------------------------------------------
    def _fail(self, code, message, rid=None):
        """A fatal protocol error: say why, then close."""
        self._error(code, message, rid)
        self._closed(f"{code}: {message}")

    def _closed(self, reason):
        """Tell the supervisor at once, then let the socket linger briefly so that the last frames
        (an error, say) reach the client before the close instead of being cut off by a reset."""
        if self.state != "open":
            return
        log.info("connection %s closed: %s", self.connection_id, reason)
        self.send(self.supervisor, ConnectionClosed(self.connection_id, reason))
        for producer_id in list(self.producers):
            self._drop_producer(producer_id)
        for address, consumer_id in self.deferred_acks:
            self.send(address, dispatcher.DeliverAck(consumer_id))
        self.deferred_acks.clear()
        self.state = "lingering"
        self._flush()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._finish()
            return
        self.wakeupAfter(timedelta(seconds=LINGER_S), payload=_Tick.LINGER)

    def _drain_lingering(self):
        try:
            while self.sock.recv(READ_SIZE):
                pass
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._finish()  # EOF: the client has seen everything

    def _finish(self):
        if self.state == "closed":
            return
        self.state = "closed"
        try:
            self.sock.close()
        except OSError:
            pass
        self.exit_self()
