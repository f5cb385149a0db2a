"""ShardActor: a connection shard, the design card's TCP transport actor. It owns many client
sockets (handed over by the listener) and, per connection, a sans-IO `Session`.

Everything a socket reads goes through its session; the hot ops go straight over lanes (records
to the topic, credits and acks to the dispatcher), control ops go to the supervisor, the
ConnectionActor of this shard, as Thespian messages. Deliveries come back over the lanes and are
written to the consumer's socket without decoding the records.

Sockets, lanes and the handoff socket are all registered in one epoll of the shard's own; Thespian
watches only that epoll's fd (see transport/lanes.py for why).

With `serve --tls-cert`, each socket carries TLS: a sans-IO TlsConnection (transport/tls.py) per
client turns what the socket reads into plaintext for the session and the session's outbox into
ciphertext, chunk by chunk as the socket takes it; the handshake advances in the same epoll loop as
everything else and never blocks. A client that stalls mid-handshake is closed at the hello
deadline like any connection without `hello`.

The end of a connection is itself the cleanup signal: EOF, a socket error, a fatal protocol error
or a heartbeat timeout sends ConnectionClosed(connection) to the supervisor at once (a fatal error
in what the client sent: once the requests read before it are answered, within ANSWER_FIRST_S;
its consumers are detached at once). When the
shard itself dies, its supervisor gets ChildActorExited and every lane of the shard ends: the
topics and dispatchers at their other ends drop this shard's producers and consumers at once.
"""
import collections
import heapq
import select
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from thespian.actors import ThespianWatch

from actorbroker.actors import connection, listener, signing
from actorbroker.actors.base import BrokerActor, log
from actorbroker.actors.lifecycle import emit
from actorbroker.actors.reporting import Histogram
from actorbroker.actors.system import thespian_waits
from actorbroker.transport import errors as E
from actorbroker.transport.codec import RUN_COUNT, RUN_TIME, encode_frame, encode_run_frames, encode_runs_v1
from actorbroker.transport.lanes import IN, OUT, RECORD_PATH_LINGER_S, LaneHub, LaneOp, Reactor
from actorbroker.transport.session import Session, SessionConfig, error_frame
from actorbroker.transport.tls import TlsConnection, server_context

READ_SIZE = 256 * 1024
MAX_READ_PER_EVENT = 512 * 1024      # per socket per wakeup: others get their turn
HIGH_WATER = 1024 * 1024             # unsent bytes above which deliveries to a client wait
                                     # (at most half of max_pending_bytes: see _flush)
PUBLISH_WINDOW = 2                   # PUBLISH frames in flight per producer; the rest is merged
PUBLISH_MAX_BYTES = 16 * 1024 * 1024 # ... into PUBLISH frames of at most this many payload bytes
                                     # (and at least one send): well below MAX_LANE_FRAME, which a
                                     # fast producer of 1 MB messages passed (the topic's lane closed)
MAX_PENDING_RECORDS = 20_000         # per connection: then stop reading it (TCP pushes back)
MAX_PENDING_BYTES = 32 * 1024 * 1024 # ... or once its waiting sends hold this many bytes (20,000
                                     # records of 100 KB held 2 GB in one shard)
LINGER_S = 1.0
# After a fatal error in what a client sent, its error frame and the close wait this long at most
# for the answers to the requests read before it (docs/protocol.md, "Session")
ANSWER_FIRST_S = 1.0
STOPPING = "broker stopping"   # the close reason when serve stops the broker (StopClients)
TLS_CHUNK = 64 * 1024                # plaintext encrypted at a time: the rest waits in the outbox
LOAD_REPORT_S = 0.1


@dataclass(frozen=True)
class StartShard:
    handoff_fd: int     # AF_UNIX socket on which the listener passes accepted sockets
    index: int
    ident: str          # this incarnation's name on its lanes
    config: Any
    listener: Any       # told how many connections we hold (it enforces max_connections)


@dataclass(frozen=True)
class Outbound:
    """Bytes (whole frames) to write to a client."""
    connection_id: int
    data: bytes


@dataclass(frozen=True)
class RouteProducer:
    """A producer is open: its `send` frames go to the topic's lane; then write `data`."""
    connection_id: int
    producer_id: int
    lane: Any           # transport.lanes.LaneAddress of the topic
    name: str
    data: bytes
    # cluster, non_reliable: should its lane end, the ConnectionActor attaches it again to the
    # topic's new node; its client meanwhile gets TOPIC_UNAVAILABLE, never UNKNOWN_PRODUCER
    rejoins: bool = False


@dataclass(frozen=True)
class UnrouteProducer:
    connection_id: int
    producer_id: int
    data: bytes = b""
    # being re-attached to a re-homed topic (cluster): the client keeps it; its sends meanwhile
    # get TOPIC_UNAVAILABLE
    reattaching: bool = False
    name: str = ""
    # its topic's node was declared lost (cluster): what it sent there is never receipted (a cut
    # ends no lane), so it is refused now, not waited for
    lost: bool = False


@dataclass(frozen=True)
class RouteConsumer:
    """A consumer is attached: its flow/ack/nack go to the dispatcher's lane; then write `data`."""
    connection_id: int
    consumer_id: int
    lane: Any           # LaneAddress of the dispatcher
    data: bytes
    regrant: bool = False   # re-attached: give the new dispatcher the credits the client has left
    rejoins: bool = False   # as RouteProducer's: its lane's end is no end for its client


@dataclass(frozen=True)
class CloseDecided:
    """The ConnectionActor took (refused=False) or refused (a reused rid, too many requests waiting)
    a close_producer / close_consumer / unsubscribe that this shard passed on. The shard and the
    session stopped routing it when the request was read, so that frames pipelined after it are
    refused in order; refused, it was never closed, and its route comes back."""
    connection_id: int
    op: str
    ident: int
    refused: bool


@dataclass(frozen=True)
class RequestsAnswered:
    """connection.AnswerFirst's answer: no request of the connection waits in the ConnectionActor
    any more (their answers came before this, on the same channel)."""
    connection_id: int


@dataclass(frozen=True)
class ProbeRoute:
    """Is this consumer's connection up? (connection.ProbeConsumer.) Answered over the
    dispatcher's lane: PROBED, after a DETACH if it is not."""
    consumer_id: int
    token: int
    lane: Any           # LaneAddress of the dispatcher
    gone: bool          # its ConnectionActor has it detached already


@dataclass(frozen=True)
class UnrouteConsumer:
    connection_id: int
    consumer_id: int
    data: bytes = b""
    # being re-attached to a re-homed topic (cluster): the client keeps it, and its credits
    reattaching: bool = False
    reason: str = ""    # why the broker ended it (its `closed` push, in `data`)


class _Client:
    """One client socket and its session; the reactor calls on_event."""
    __slots__ = ("shard", "sock", "fd", "session", "state", "pending_records", "pending_bytes", "deferred_acks",
                 "reading", "tls", "address", "write_shut", "asked", "closing", "answer_by",
                 "parked", "allowance")

    def __init__(self, shard, sock, session, tls=None):
        self.shard, self.sock, self.fd, self.session = shard, sock, sock.fileno(), session
        self.tls = tls                  # TlsConnection, or None for plain TCP
        self.state = "open"             # open -> (answering ->) lingering -> closed
        self.pending_records = 0
        self.pending_bytes = 0      # _send_bytes of its sends waiting for a PUBLISH (as records)
        self.deferred_acks = []         # (lane, consumer id) waiting for the outbox to drain
        self.parked = collections.deque()   # deliveries (bytes) waiting for room in the outbox
        self.allowance = 0              # the outbox may hold this much: a message larger than
                                        # max_pending_bytes, written alone (see _deliver)
        self.reading = True
        self.address = None             # the peer's host: the listener counts connections by it
        self.write_shut = False
        self.asked = False              # requests went to the ConnectionActor (since RequestsAnswered)
        self.closing = None             # answering: the close reason of its fatal error
        self.answer_by = 0.0            # answering: when the error and the close go anyway

    def on_event(self, fd, events):
        if events & OUT:
            self.shard._flush(self)
        if events & ~OUT:
            self.shard._readable(self)


def _send_bytes(send):
    """About the lane bytes of a send ([rid, count, payloads, keys, attrs, payload bytes]): its
    payloads, plus keys and attributes (up to a frame of attributes with an empty payload)."""
    size = send[5] + 16 * send[1]
    if send[3] is not None:
        size += 260 * send[1]
    if send[4] is not None:
        size += sum(4 * (len(k) + len(v)) + 10 for attrs in send[4] if isinstance(attrs, dict)
                    for k, v in attrs.items())
    return size


class _Producer:
    __slots__ = ("connection_id", "lane", "name", "sends", "records", "bytes", "in_flight", "rejoins")

    def __init__(self, connection_id, lane, name, rejoins=False):
        self.connection_id, self.lane, self.name, self.rejoins = connection_id, lane, name, rejoins
        self.sends, self.records, self.bytes = [], 0, 0   # waiting sends, their records and payload bytes
        self.in_flight = []      # per PUBLISH in flight: its rids, answered if the lane dies


class _Closing:
    """The route of a producer or consumer whose close the ConnectionActor has yet to decide: put
    back if every close sent for it (pipelined, several may be) was refused."""
    __slots__ = ("kept", "connection_id", "pending", "accepted")

    def __init__(self, kept, connection_id):
        self.kept, self.connection_id, self.pending, self.accepted = kept, connection_id, 1, False


class _Handoff:
    __slots__ = ("shard",)

    def __init__(self, shard):
        self.shard = shard

    def on_event(self, fd, events):
        self.shard._adopt_sockets()


class ShardActor(BrokerActor):
    process_name = "ab-shard"
    init_message = StartShard

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reactor = Reactor(relay=True, linger=RECORD_PATH_LINGER_S)   # thousands of sockets: see Reactor
        self.hub = None
        self.supervisor = None
        self.config = None
        self.session_config = None
        self.tls_context = None  # ssl.SSLContext when the client port has TLS
        self.ident = None
        self.index = 0
        self.handoff = None
        self.clients = {}        # connection id -> _Client
        self.high_water = HIGH_WATER
        self.handoff_seq = 0     # number of the last socket taken from the listener
        self.opened = collections.Counter()   # peer host -> connections adopted since the last report
        self.finished = collections.Counter()  # peer host -> connections ended since the last report
        self.next_seq = 0
        self.producers = {}      # producer id -> _Producer
        self.closing_producers = {}  # closed producers whose last sends await their receipts
        self.closing_routes = {}     # ("producer"|"consumer", id) -> its route, until CloseDecided
        self.consumers = {}      # consumer id -> (connection id, lane)
        self.credits = {}        # consumer id -> credits its client gave and no delivery used yet
        self.reattaching = set()  # producer ids being re-attached to a re-homed topic
        self.rejoining = set()    # consumer ids routed with RouteConsumer.rejoins
        # acks with a rid sent to a dispatcher and not answered yet: consumer id -> (connection id,
        # rids); each is answered once, by the dispatcher or, if its lane ends first, here
        self.acks_waiting = {}
        self.topic_lanes = {}    # LaneAddress -> Lane
        self.dispatcher_lanes = {}
        self.timers = []         # heap of (due, seq, kind, connection id)
        self.timer_seq = 0
        self.wakeups = set()     # due times of the Thespian wakeups scheduled
        self.listener = None
        self.reported_load = -1   # a new shard reports at once: the listener may count stale ones
        self.load_report_due = False
        self.exiting = False
        self.events = None       # the EventsActor (config.events)
        self.metrics_on = False
        self.disconnects = collections.Counter()   # cause -> connections ended
        self.deliver_latency = Histogram()

    def watch(self):
        return None if self.exiting else ThespianWatch([self.reactor.fileno()])

    # --- set-up ---------------------------------------------------------------------------------
    def on_StartShard(self, msg, sender):
        self.supervisor = sender
        self.config = msg.config
        self.session_config = SessionConfig(msg.config)
        if msg.config.tls_cert:
            # the files are read here, on this shard's host (serve checked them on its own)
            try:
                self.tls_context = server_context(msg.config.tls_cert, msg.config.tls_key or None,
                                                  msg.config.tls_client_ca or None)
            except (OSError, ValueError) as exc:   # never serve plain TCP on the TLS port instead
                log.error("shard %d: cannot load the TLS certificate: %s; refusing connections",
                          self.index, exc)
                self.tls_context = False
        self.high_water = min(HIGH_WATER, msg.config.max_pending_bytes // 2)
        self.ident, self.index = msg.ident, msg.index
        self.listener = msg.listener
        self.hub = LaneHub(self.reactor, self._lane_frame, self._lane_closed,
                           kind=msg.config.lanes, host=msg.config.actor_host,
                           secret=signing.lane_secret())
        self.handoff = socket.socket(fileno=msg.handoff_fd)
        self.handoff.setblocking(False)
        self.reactor.add(self.handoff.fileno(), _Handoff(self))
        self._report_load()   # at once: the listener learns our address (RecountHost)
        self.send(sender, connection.ShardStarted(msg.ident))
        self.events = msg.config.events
        self.metrics_on = msg.config.metrics is not None
        self.start_reports(msg.config.metrics)

    def metrics_snapshot(self, counters, gauges, histograms):
        states = collections.Counter(
            "closing" if c.state != "open" else "open" if c.session.hello_done else "handshake"
            for c in self.clients.values())
        for state in ("handshake", "open", "closing"):
            gauges[("actorbroker_connections", (state,))] = states[state]
        for cause, count in self.disconnects.items():
            counters[("actorbroker_disconnects", (cause,))] = count
        histograms[("actorbroker_publish_to_deliver_seconds", ())] = self.deliver_latency.snapshot()

    def on_WatchMessage(self, msg, sender):
        if self.reactor.outside is None:   # idle in our epoll, Thespian's sockets included
            self.reactor.outside = thespian_waits(self)
        self.reactor.poll(quiet=lambda sends=self.thespian_sends: self.quiet_since(sends))

    def _adopt_sockets(self):
        for _ in range(64):
            try:
                data, fds, _, _ = socket.recv_fds(self.handoff, 64 * listener.HANDOFF_TAG.size, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("shard %d: handoff socket failed: %s", self.index, exc)
                return
            if not fds:
                return
            self.handoff_seq = listener.HANDOFF_TAG.unpack_from(data, len(data) - listener.HANDOFF_TAG.size)[0]
            for fd in fds:
                self._adopt(socket.socket(fileno=fd))

    def _adopt(self, sock):
        if self.tls_context is False:
            sock.close()
            return
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.next_seq += 1
        connection_id = self.next_seq * 256 + self.index   # unique across the broker's shards
        now = time.monotonic()
        tls = TlsConnection(self.tls_context, server_side=True) if self.tls_context else None
        client = _Client(self, sock, Session(connection_id, self.session_config, now), tls)
        try:
            peer = sock.getpeername()
            client.address = peer[0]
        except OSError:
            client.address, peer = "", ("", 0)
        emit(self, self.events, "connection_opened", connection=connection_id,
             address=f"{peer[0]}:{peer[1]}" if ":" not in peer[0] else f"[{peer[0]}]:{peer[1]}")
        self.opened[client.address] += 1
        self.clients[connection_id] = client
        self.reactor.add(client.fd, client, IN)
        self._timer(now + self.config.hello_timeout_ms / 1000.0, "heartbeat", connection_id)
        self._load_changed()

    def _load_changed(self):
        if not self.load_report_due and not self.exiting:
            self.load_report_due = True
            self._timer(time.monotonic() + LOAD_REPORT_S, "load", 0)

    def _report_load(self, recount=0):
        if not recount:   # (a report due stays due)
            self.load_report_due = False
        if recount or len(self.clients) != self.reported_load or self.opened or self.finished:
            self.reported_load = len(self.clients)
            self.send(self.listener, listener.ShardLoad(self.index, self.reported_load, self.ident,
                                                        self.handoff_seq, dict(self.opened),
                                                        dict(self.finished), recount))
            self.opened.clear()
            self.finished.clear()

    # --- reading clients ------------------------------------------------------------------------
    def _readable(self, client):
        if client.state == "lingering":
            self._drain_lingering(client)
            return
        if client.state == "answering":   # it reads nothing more: an error or a hang-up woke it
            self._closed(client, client.closing)
            return
        if client.state != "open":
            return
        got = 0
        events = []
        publishes = {}
        while got < MAX_READ_PER_EVENT:
            try:
                data = client.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._handle_events(client, events, publishes)
                self._closed(client, socket_end_reason(exc))
                return
            if not data:
                self._handle_events(client, events, publishes)
                self._closed(client, "eof")
                return
            got += len(data)
            more = len(data) == READ_SIZE
            if client.tls is not None:
                data = self._decrypt(client, data, events, publishes)
                if data is None:
                    return
            if data:
                events.extend(client.session.receive_data(data, time.monotonic()))
            if not more:
                break
        if client.tls is not None and client.tls.peer_closed:
            self._handle_events(client, events, publishes)
            self._closed(client, "eof")
            return
        self._handle_events(client, events, publishes)
        self._flush(client)

    def _decrypt(self, client, data, events, publishes):
        """The plaintext of what a TLS client sent (b"" mid-handshake); None once it broke TLS and
        the connection is closed (its alert is sent while lingering)."""
        try:
            return client.tls.receive(data)
        except ssl.SSLError as exc:
            self._handle_events(client, events, publishes)
            self._closed(client, f"TLS: {exc.reason or exc}")
            return None

    def _handle_events(self, client, events, publishes):
        connection_id = client.session.id
        for event in events:
            kind = event[0]
            if kind == "publish":   # [rid, count, payloads, keys, attrs, payload bytes]
                send = event[3]
                send.insert(0, event[2])
                publishes.setdefault(event[1], []).append(send)
            elif kind == "flow":
                self.credits[event[1]] = self.credits.get(event[1], 0) + event[2]
                self._to_dispatcher(event[1], [LaneOp.FLOW, event[1], event[2]])
            elif kind == "ack":
                self._ack(client, event[1], event[2], event[3])
            elif kind == "nack":
                self._to_dispatcher(event[1], [LaneOp.NACK, event[1], event[2], event[3]])
            elif kind == "control":
                frame = event[1]
                # Only this connection's own: the routes are the shard's, for all its connections,
                # and the ids are easy to guess; another's id gets UNKNOWN_* from the ConnectionActor
                # and must leave that connection's producer or consumer as it was.
                is_producer = frame["op"] == "close_producer"
                key = ("producer", frame.get("producer")) if is_producer else ("consumer", frame.get("consumer"))
                closing = self.closing_routes.get(key)
                producer = self.producers.get(key[1]) if is_producer else None
                route = self.consumers.get(key[1]) if not is_producer else None
                if closing is not None and closing.connection_id == connection_id:
                    closing.pending += 1   # closed again before the first was decided
                elif producer is not None and producer.connection_id == connection_id:
                    self._send_publishes(client, publishes)
                    self._drop_producer(key[1])
                    self.closing_routes[key] = _Closing(producer, connection_id)
                elif route is not None and route[0] == connection_id:
                    self.consumers.pop(key[1])
                    self.closing_routes[key] = _Closing((route, self.credits.pop(key[1], None)), connection_id)
                self.send_ordered(self.supervisor, connection.ClientRequest(connection_id, frame), "shard")
                client.asked = True
            elif kind == "hello":
                self.send_ordered(self.supervisor, connection.ClientHello(connection_id, event[1], event[2]),
                                  "shard")
                self._timer(time.monotonic() + client.session.heartbeat_s, "heartbeat", connection_id)
            elif kind == "closed":
                held = client.session.hold_fatal()   # the answers to what was read before it go first
                self._send_publishes(client, publishes)
                if held:
                    self._answer_first(client, event[1])
                else:
                    self._closed(client, event[1])
                return
        self._send_publishes(client, publishes)

    def _ack(self, client, consumer_id, ids, rid):
        route = self.consumers.get(consumer_id)
        if route is None:   # closing (close_consumer or unsubscribe sent before): no dispatcher to ask
            if rid is not None:
                self._write(client, error_frame(E.UNKNOWN_CONSUMER, f"consumer {consumer_id} is closing", rid))
            return
        if rid is not None:
            waiting = self.acks_waiting.setdefault(consumer_id, (client.session.id, route[1], set()))[2]
            if rid in waiting:   # its answer would be taken for the first one's: one answer for two
                self._write(client, error_frame(E.BAD_REQUEST, f"rid {rid} is already used by an ack of this "
                                                "consumer waiting for its answer; a rid must be unique", rid))
                return
            waiting.add(rid)
        route[1].send([LaneOp.ACK, consumer_id, ids, rid])

    def _ack_answered(self, consumer_id, data, rid):
        waiting = self.acks_waiting.get(consumer_id)
        if waiting is None or rid not in waiting[2]:
            return   # answered here already: the dispatcher's lane had ended
        waiting[2].discard(rid)
        if not waiting[2]:
            del self.acks_waiting[consumer_id]
        client = self.clients.get(waiting[0])
        if client is not None:
            self._write(client, data)

    def _acks_abandoned(self, lane):
        """The dispatcher's lane ended: its unanswered acks may or may not have been saved."""
        why = "the subscription was lost before this ack was answered; it may not have been saved"
        for consumer_id in [c for c, (_, l, _) in self.acks_waiting.items() if l is lane]:
            connection_id, _, rids = self.acks_waiting.pop(consumer_id)
            client = self.clients.get(connection_id)
            if client is not None and rids:
                self._write(client, b"".join(error_frame(E.UNKNOWN_CONSUMER, why, rid) for rid in sorted(rids)))

    def _to_dispatcher(self, consumer_id, frame):
        route = self.consumers.get(consumer_id)
        if route is not None:
            route[1].send(frame)

    # --- producing ------------------------------------------------------------------------------
    def _send_publishes(self, client, publishes):
        """Adaptive batching: sends that arrive while PUBLISH_WINDOW batches of their producer are
        in flight wait here and go together in the next PUBLISH."""
        for producer_id, sends in publishes.items():
            producer = self.producers.get(producer_id)
            if producer is None:   # ended since the session accepted them: say so, never drop
                if producer_id in self.reattaching:
                    client.session.write(b"".join(error_frame(
                        E.TOPIC_UNAVAILABLE, "the topic is moving to another node; send it again", rid)
                        for rid, *_ in sends))
                    continue
                client.session.write(b"".join(error_frame(
                    E.UNKNOWN_PRODUCER, f"producer {producer_id} is not open on this connection", rid)
                    for rid, *_ in sends))
                continue
            producer.sends.extend(sends)
            count = sum(send[1] for send in sends)
            producer.records += count
            size = sum(map(_send_bytes, sends))
            producer.bytes += size
            client.pending_records += count
            client.pending_bytes += size
            self._publish(producer_id, producer)
        publishes.clear()
        if client.reading and (client.pending_records >= MAX_PENDING_RECORDS
                               or client.pending_bytes >= MAX_PENDING_BYTES):
            client.reading = False   # paused: the kernel buffer fills and the producer is pushed back
            client.session.frame_started = None   # the frame deadline does not run while we wait
            self._update_mask(client)

    def _publish(self, producer_id, producer, force=False):
        while producer.sends and (force or len(producer.in_flight) < PUBLISH_WINDOW):
            if producer.bytes <= PUBLISH_MAX_BYTES:   # the common case: all of them
                sends, records, size = producer.sends, producer.records, producer.bytes
                producer.sends, producer.records, producer.bytes = [], 0, 0
            else:
                size = n = 0
                for send in producer.sends:
                    size += _send_bytes(send)
                    n += 1
                    if size >= PUBLISH_MAX_BYTES:
                        break
                sends, producer.sends = producer.sends[:n], producer.sends[n:]
                records = sum(send[1] for send in sends)
                producer.records -= records
                producer.bytes -= size
            producer.lane.send([LaneOp.PUBLISH, producer_id, producer.name, sends])
            producer.in_flight.append([send[0] for send in sends])
            client = self.clients.get(producer.connection_id)
            if client is not None:
                client.pending_records -= records
                client.pending_bytes -= size
                self._resume_reading(client)

    def _resume_reading(self, client):
        """Read a connection held back (backpressure) again once what it sent has gone on."""
        if not client.reading and client.pending_records < MAX_PENDING_RECORDS // 2 \
                and client.pending_bytes < MAX_PENDING_BYTES // 2 and client.state == "open":
            client.reading = True
            if client.session.decoder.buffered:
                client.session.frame_started = time.monotonic()
            self._update_mask(client)

    def _drop_producer(self, producer_id):
        """Closed: what it sent before goes to the topic now; receipts still find the client."""
        self.reattaching.discard(producer_id)
        producer = self.producers.pop(producer_id, None)
        if producer is not None:
            self._publish(producer_id, producer, force=True)
            self.closing_producers[producer_id] = producer
        return producer

    # --- lanes ----------------------------------------------------------------------------------
    def _lane(self, table, address, role):
        lane = table.get(address)
        if lane is None or lane.closed:
            lane = self.hub.connect(address, peer=(role, address))   # OSError: the peer is gone
            lane.send([LaneOp.HELLO, self.ident])
            table[address] = lane
        return lane

    def _lane_frame(self, lane, frame):
        op = frame[0]
        if op == LaneOp.DELIVER:
            self._deliver(lane, frame[1], frame[2])
        elif op == LaneOp.RECEIPTS:
            self._receipts(frame[1], frame[2], frame[3])
        elif op == LaneOp.REPLY:
            self._ack_answered(frame[1], frame[2], frame[3])
        elif op == LaneOp.ENDED:
            self._consumers_lost([frame[1]], frame[2])
        elif op == LaneOp.ACTIVE:
            self._active(lane, frame[1], frame[2])

    def on_ProbeRoute(self, msg, sender):
        """A dispatcher asks whether this consumer's connection is up (an exclusive subscribe met
        it). A client that has hung up, its EOF not read yet, is read to its end now: the close
        and its DETACH go ahead of the answer. One not routed here is not attached (its client
        hung up before its `subscribed`, or the RouteConsumer found the connection closed): the
        dispatcher hears DETACH for it too, as the ConnectionActor's own detach may come later."""
        try:
            lane = self._lane(self.dispatcher_lanes, msg.lane, "dispatcher")
        except OSError:   # the dispatcher is gone: its subscription decides when the probe times out
            return
        route = self.consumers.get(msg.consumer_id)
        if msg.gone or route is None:
            lane.send([LaneOp.DETACH, msg.consumer_id, time.time()])
        else:
            client = self.clients.get(route[0])
            for _ in range(64):   # a read takes at most MAX_READ_PER_EVENT: what it sent before its close
                if client is None or client.state != "open" or not hung_up(client.sock):
                    break
                self._readable(client)
        lane.send([LaneOp.PROBED, msg.consumer_id, msg.token])

    def _receipts(self, producer_id, items, errors):
        producer = self.producers.get(producer_id) or self.closing_producers.get(producer_id)
        if producer is None:
            return
        # The rids answered leave the front of what is in flight. Not one PUBLISH per RECEIPTS:
        # with --fsync always the topic answers each send of a PUBLISH on its own, and popping a
        # whole PUBLISH per answer lost track of rids, never answered if the topic then died.
        answered = len(items) + len(errors)
        in_flight = producer.in_flight
        while answered and in_flight:
            if len(in_flight[0]) <= answered:
                answered -= len(in_flight.pop(0))
            else:
                del in_flight[0][:answered]
                answered = 0
        if producer_id in self.closing_producers and not producer.in_flight:
            del self.closing_producers[producer_id]
        out = [encode_frame({"op": "receipt", "rid": rid, "first": first, "count": count})
               for rid, first, count in items]
        out += [error_frame(code, text, rid) for rid, code, text in errors]
        client = self.clients.get(producer.connection_id)
        if client is not None:
            self._write(client, b"".join(out))
        if producer_id in self.producers:
            self._publish(producer_id, producer)

    def _deliver(self, lane, consumer_id, runs):
        route = self.consumers.get(consumer_id)
        # (a consumer re-attached elsewhere has a new lane: what its old dispatcher sends is stale)
        client = self.clients.get(route[0]) if route and route[1] is lane else None
        if client is None or client.state != "open":   # the consumer is gone: back to its dispatcher
            lane.send([LaneOp.UNDELIVERED, consumer_id, runs])
            return
        encode = encode_run_frames if client.session.version >= 2 else encode_runs_v1
        data = b"".join(encode(consumer_id, runs, self.config.max_frame))
        self.credits[consumer_id] = self.credits.get(consumer_id, 0) - sum(run[RUN_COUNT] for run in runs)
        if self.metrics_on:   # once per delivery: its oldest record
            self.deliver_latency.observe(max(0.0, time.time() - runs[0][RUN_TIME] / 1000.0))
        # Deliveries alone never push the outbox beyond max_pending_bytes (the dispatchers bound
        # each batch so that one consumer's fit; several consumers of one connection may not):
        # one that does not fit waits here, its DELIVER_ACK with it, until the outbox has room.
        outbox = client.session.outbox
        if client.parked or (outbox and len(outbox) + len(data) > self.session_config.max_pending_bytes):
            client.parked.append(data)
            client.deferred_acks.append((lane, consumer_id))
            return
        if len(data) > self.session_config.max_pending_bytes:   # a message larger: alone, allowed
            client.allowance = len(data)
        client.session.write(data)
        self._flush(client)
        # Ack at once unless the client is slow to read; then when its outbox drains.
        if client.state != "open" or len(client.session.outbox) < self.high_water:
            lane.send([LaneOp.DELIVER_ACK, consumer_id])
        else:
            client.deferred_acks.append((lane, consumer_id))

    def _active(self, lane, consumer_id, flag):
        """A failover consumer's state changed: the push goes out in the lane's order, so the
        records the dispatcher sends it after the change come after it."""
        route = self.consumers.get(consumer_id)
        client = self.clients.get(route[0]) if route and route[1] is lane else None
        if client is None or client.state != "open":
            return
        data = encode_frame({"op": "active", "consumer": consumer_id, "active": bool(flag)})
        if client.parked:   # behind the deliveries waiting for room
            client.parked.append(data)
        else:
            client.session.write(data)
            self._flush(client)

    def _lane_closed(self, lane, reason):
        role, address = lane.peer
        if role == "topic":
            if self.topic_lanes.get(address) is lane:
                del self.topic_lanes[address]
            lost = [pid for pid, p in self.producers.items() if p.lane is lane]
            self._producers_lost(lost, "topic_lost")
            for pid, p in list(self.closing_producers.items()):
                if p.lane is lane:
                    self._refuse_in_flight(pid, p)
                    del self.closing_producers[pid]
        else:
            if self.dispatcher_lanes.get(address) is lane:
                del self.dispatcher_lanes[address]
            lost = [cid for cid, (_, l) in self.consumers.items() if l is lane]
            self._consumers_lost(lost, "subscription_lost")
            self._acks_abandoned(lane)

    def _producers_lost(self, producer_ids, reason):
        lost = []
        for producer_id in producer_ids:
            producer = self.producers.pop(producer_id, None)
            if producer is not None:
                lost.append(producer_id)
                if producer.rejoins:   # being moved (ConnectionActor._reattach): as on_UnrouteProducer's
                    self.reattaching.add(producer_id)
                    self._refuse_in_flight(producer_id, producer, E.TOPIC_UNAVAILABLE,
                                           "the topic's node was lost before this send was receipted")
                    continue
                self._refuse_in_flight(producer_id, producer)
                client = self.clients.get(producer.connection_id)
                if client is not None:   # later sends get UNKNOWN_PRODUCER at once
                    client.session.producers.pop(producer_id, None)
        if lost:
            self.send_ordered(self.supervisor, connection.ProducersLost(lost, reason), "shard")

    def _refuse_in_flight(self, producer_id, producer, code=E.INTERNAL, why="the topic was lost before this send "
                                                                           "was receipted"):
        """Sends the topic never receipted: their client hears it now, instead of never."""
        client = self.clients.get(producer.connection_id)
        rids = [rid for batch in producer.in_flight for rid in batch] + [send[0] for send in producer.sends]
        producer.in_flight, producer.sends = [], []
        if client is not None and client.pending_records:
            client.pending_records = max(0, client.pending_records - producer.records)
            client.pending_bytes = max(0, client.pending_bytes - producer.bytes)
            self._resume_reading(client)   # (held back for those sends, it was never read again)
        producer.records = producer.bytes = 0
        if client is not None and rids:
            self._write(client, b"".join(error_frame(code, f"{why} (it may have been stored: sent again, "
                                                           "it may be there twice); send it again", rid)
                                         for rid in rids))

    def _consumers_lost(self, consumer_ids, reason):
        lost = []
        for consumer_id in consumer_ids:
            route = self.consumers.pop(consumer_id, None)
            if route is not None:
                lost.append(consumer_id)
                if consumer_id in self.rejoining:   # being moved: its flow counts, as on_UnrouteConsumer's
                    continue
                client = self.clients.get(route[0])
                if client is not None:   # later flow/ack/nack get UNKNOWN_CONSUMER at once
                    client.session.consumer_ended(consumer_id, reason)
        if lost:
            self.send_ordered(self.supervisor, connection.ConsumersLost(lost, reason), "shard")

    # --- from the supervisor ----------------------------------------------------------------------
    def on_Outbound(self, msg, sender):
        client = self.clients.get(msg.connection_id)
        if client is not None:
            self._write(client, msg.data)

    def on_CloseDecided(self, msg, sender):
        kind = "producer" if msg.op == "close_producer" else "consumer"
        closing = self.closing_routes.get((kind, msg.ident))
        client = self.clients.get(msg.connection_id)
        if closing is None or closing.connection_id != msg.connection_id:
            return   # (not this connection's to close: another's id, say)
        closing.pending -= 1
        closing.accepted = closing.accepted or not msg.refused
        if closing.pending > 0:   # another close of it waits for its decision
            return
        del self.closing_routes[(kind, msg.ident)]
        kept = closing.kept
        if closing.accepted:
            if kind == "consumer":
                self.rejoining.discard(msg.ident)
            return
        if client is None or client.state != "open":
            return
        if kind == "producer":
            self.closing_producers.pop(msg.ident, None)
            self.producers[msg.ident] = kept
            client.session.producers[msg.ident] = kept.name
            if kept.lane.closed:   # its topic died meanwhile: as if it had not been closed
                self._producers_lost([msg.ident], "topic_lost")
        else:
            route, credits = kept
            self.consumers[msg.ident] = route
            if credits is not None:
                self.credits[msg.ident] = credits
            client.session.consumers.add(msg.ident)
            if route[1].closed:
                self._consumers_lost([msg.ident], "subscription_lost")

    def on_RouteProducer(self, msg, sender):
        client = self.clients.get(msg.connection_id)
        if client is None or client.state != "open":
            if client is not None and client.state == "answering":
                self._write(client, msg.data)   # its answer; closed with the connection, never routed
            # Its connection ended before it was routed: the topic frees its place now (an exclusive
            # producer's), as for a routed one (_closed), not when the ConnectionActor's close
            # comes, tens of milliseconds later (a client reconnecting at once got PRODUCER_BUSY).
            try:
                self._lane(self.topic_lanes, msg.lane, "topic").send([LaneOp.PRODUCER_GONE, msg.producer_id])
            except OSError:   # the topic is gone: nothing to free
                pass
            return   # the supervisor learns of the close from ConnectionClosed
        try:
            lane = self._lane(self.topic_lanes, msg.lane, "topic")
        except OSError:
            self._write(client, msg.data)
            self.send_ordered(self.supervisor, connection.ProducersLost([msg.producer_id], "topic_lost"),
                              "shard")
            return
        self.reattaching.discard(msg.producer_id)
        self.producers[msg.producer_id] = _Producer(msg.connection_id, lane, msg.name, msg.rejoins)
        client.session.producers[msg.producer_id] = msg.name
        self._write(client, msg.data)

    def on_UnrouteProducer(self, msg, sender):
        client = self.clients.get(msg.connection_id)
        self.closing_routes.pop(("producer", msg.producer_id), None)
        if msg.lost:
            self.reattaching.discard(msg.producer_id)
            producer = self.producers.pop(msg.producer_id, None)
            if producer is not None:
                self._refuse_in_flight(msg.producer_id, producer, E.TOPIC_UNAVAILABLE,
                                       "the topic's node was lost before this send was receipted")
        else:
            self._drop_producer(msg.producer_id)
        if msg.reattaching:
            if client is not None and client.state == "open":
                self.reattaching.add(msg.producer_id)
                client.session.producers[msg.producer_id] = msg.name
            return
        if client is not None:
            client.session.producers.pop(msg.producer_id, None)
            self._write(client, msg.data)

    def on_RouteConsumer(self, msg, sender):
        client = self.clients.get(msg.connection_id)
        if client is None or client.state != "open":
            if client is not None and client.state == "answering":
                self._write(client, msg.data)   # its answer; detached with the connection, never routed
            return
        try:
            lane = self._lane(self.dispatcher_lanes, msg.lane, "dispatcher")
        except OSError:
            self._write(client, msg.data)
            self.send_ordered(self.supervisor, connection.ConsumersLost([msg.consumer_id], "subscription_lost"),
                              "shard")
            return
        self.consumers[msg.consumer_id] = (msg.connection_id, lane)
        if msg.rejoins:
            self.rejoining.add(msg.consumer_id)
        client.session.consumers.add(msg.consumer_id)
        self._write(client, msg.data)
        lane.send([LaneOp.ROUTED, msg.consumer_id])
        if msg.regrant and self.credits.get(msg.consumer_id, 0) > 0:
            lane.send([LaneOp.FLOW, msg.consumer_id, self.credits[msg.consumer_id]])

    def on_UnrouteConsumer(self, msg, sender):
        self.consumers.pop(msg.consumer_id, None)
        self.closing_routes.pop(("consumer", msg.consumer_id), None)
        client = self.clients.get(msg.connection_id)
        if msg.reattaching:   # its flow frames count (credits) and go nowhere until re-routed
            if client is not None and client.state == "open":
                client.session.consumers.add(msg.consumer_id)
            return
        self.credits.pop(msg.consumer_id, None)
        self.rejoining.discard(msg.consumer_id)
        if client is not None:
            client.session.consumer_ended(msg.consumer_id, msg.reason or "closed")
            self._write(client, msg.data)

    # --- writing ----------------------------------------------------------------------------------
    def _write(self, client, data):
        if data and client.state == "open":
            client.session.write(data)
            self._flush(client)
        elif data and client.state == "answering":
            self._write_answer(client, data)

    def _flush(self, client):
        if client.state == "closed":
            return
        if client.tls is not None:
            self._flush_tls(client)
            return
        outbox = client.session.outbox
        while outbox:
            try:
                sent = client.sock.send(outbox)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                outbox.clear()
                if client.state != "lingering":
                    self._closed(client, socket_end_reason(exc))
                else:
                    self._finish(client)
                return
            client.session.sent(sent)
        self._flushed(client)

    def _flushed(self, client):
        if client.state == "lingering":
            client.parked.clear()   # (never written after the close)
            self._flushed_lingering(client)
            return
        outbox = client.session.outbox
        limit = self.session_config.max_pending_bytes
        if len(outbox) > limit:
            if len(outbox) > client.allowance:   # a client that does not read
                self._handle_events(client, client.session.check_outbox(), {})
                return
        elif client.allowance:
            client.allowance = 0
        if client.parked:   # what fits now goes to the outbox, in order; the socket's OUT writes it
            parked = client.parked
            while parked and (not outbox or len(outbox) + len(parked[0]) <= limit):
                data = parked.popleft()
                if len(data) > limit:
                    client.allowance = len(data)
                client.session.write(data)
        if client.deferred_acks and not client.parked and len(outbox) < self.high_water:
            for lane, consumer_id in client.deferred_acks:
                lane.send([LaneOp.DELIVER_ACK, consumer_id])
            client.deferred_acks.clear()
        self._update_mask(client)

    def _flush_tls(self, client):
        """Encrypt the outbox a chunk at a time, as the socket takes the ciphertext: what the client
        has not read yet stays plaintext in the outbox, measured as for plain TCP."""
        tls, outbox = client.tls, client.session.outbox
        while True:
            if not tls.outgoing:
                if not outbox or not tls.established:
                    break
                chunk = outbox[:TLS_CHUNK]
                client.session.sent(len(chunk))
                tls.send(chunk)
            try:
                sent = client.sock.send(tls.outgoing)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                outbox.clear()
                tls.outgoing.clear()
                if client.state != "lingering":
                    self._closed(client, socket_end_reason(exc))
                else:
                    self._finish(client)
                return
            del tls.outgoing[:sent]
        self._flushed(client)

    def _update_mask(self, client):
        if client.state != "closed":
            mask = (IN if client.reading or client.state == "lingering" else 0) | \
                   (OUT if client.session.outbox or (client.tls is not None and client.tls.outgoing) else 0)
            self.reactor.set_mask(client.fd, mask)

    # --- timers: one heap for every connection's heartbeat and linger -----------------------------
    def _timer(self, due, kind, connection_id):
        self.timer_seq += 1
        heapq.heappush(self.timers, (due, self.timer_seq, kind, connection_id))
        if not self.wakeups or due < min(self.wakeups) - 0.005:
            self.wakeups.add(due)
            self.wakeupAfter(timedelta(seconds=max(0.0, due - time.monotonic())), payload=due)

    def on_WakeupMessage(self, msg, sender):
        self.wakeups.discard(msg.payload)
        now = time.monotonic()
        again = []   # timers set while handling these: armed after, or one due now would spin here
        while self.timers and self.timers[0][0] <= now + 0.001:
            _, _, kind, connection_id = heapq.heappop(self.timers)
            if kind == "load":
                self._report_load()
                continue
            client = self.clients.get(connection_id)
            if client is None:
                continue
            if kind == "linger":
                self._finish(client)
            elif kind == "answered":
                if client.state == "answering" and client.answer_by <= now + 0.001:
                    self._closed(client, client.closing)
            elif client.state == "open" and not client.reading and client.session.hello_done:
                # paused by us (backpressure): not the client's silence; it hears we live
                due = client.session.paused(now)
                self._flush(client)
                again.append((now + due, connection_id))
            elif client.state == "open":
                events, due = client.session.check_heartbeat(now)
                self._handle_events(client, events, {})
                self._flush(client)
                if due is not None and client.state == "open":
                    again.append((now + due, connection_id))
        for due, connection_id in again:
            self._timer(due, "heartbeat", connection_id)
        if self.timers and (not self.wakeups or self.timers[0][0] < min(self.wakeups) - 0.005):
            due = self.timers[0][0]
            self.wakeups.add(due)
            self.wakeupAfter(timedelta(seconds=max(0.0, due - now)), payload=due)

    # --- closing --------------------------------------------------------------------------------
    def _answer_first(self, client, reason):
        """A fatal error in what the client sent (its frame held back: Session.hold_fatal). Nothing
        more is read and its consumers are detached now, as at any close; the error frame and the
        close (_closed) wait until every request read before it is answered (receipts, acks with a
        rid, the ConnectionActor's answers: _answers_due), for ANSWER_FIRST_S at most."""
        connection_id = client.session.id
        client.state, client.closing, client.reading = "answering", reason, False
        if client.asked:   # behind its requests, on their channel
            self.send_ordered(self.supervisor, connection.AnswerFirst(connection_id), "shard")
        detected = time.time()
        for consumer_id in client.session.consumers:   # (their acks in flight are still answered)
            self.credits.pop(consumer_id, None)
            route = self.consumers.pop(consumer_id, None)
            if route is not None:
                route[1].send([LaneOp.DETACH, consumer_id, detected, connection_id])
        if not self._answers_due(client):
            self._closed(client, reason)
            return
        client.answer_by = time.monotonic() + ANSWER_FIRST_S
        self._timer(client.answer_by, "answered", connection_id)
        self._update_mask(client)

    def _answers_due(self, client):
        """Whether a request the client sent before its fatal error still waits for its answer."""
        if client.asked:   # until RequestsAnswered
            return True
        connection_id = client.session.id
        for producer_id in client.session.producers:
            producer = self.producers.get(producer_id)
            if producer is not None and (producer.in_flight or producer.sends):
                return True
        return any(p.connection_id == connection_id and p.in_flight for p in self.closing_producers.values()) \
            or any(w[0] == connection_id and w[2] for w in self.acks_waiting.values())

    def _write_answer(self, client, data):
        """Written ahead of the held error frame. Once nothing more is due, or the outbox has
        grown past max_pending_bytes, the close follows: soon, not from here (the caller may be
        in the middle of its bookkeeping)."""
        client.session.write(data)
        self._flush(client)
        now = time.monotonic()
        if client.state == "answering" and client.answer_by > now and (
                len(client.session.outbox) > self.session_config.max_pending_bytes
                or not self._answers_due(client)):
            client.answer_by = now
            self._timer(now, "answered", client.session.id)

    def on_RequestsAnswered(self, msg, sender):
        client = self.clients.get(msg.connection_id)
        if client is not None and client.state == "answering":
            client.asked = False
            if not self._answers_due(client):
                self._closed(client, client.closing)

    def _closed(self, client, reason):
        """Tell the supervisor at once, then let the socket linger briefly so that the last frames
        (an error, say) reach the client before the close instead of being cut off by a reset."""
        if client.state != "open" and client.state != "answering":
            return
        if client.state == "answering":   # whatever ended the wait, the error it was for says why
            reason = client.closing
        connection_id = client.session.id
        client.session.open = False
        client.session.release_fatal()   # (a held error frame goes last)
        # The dispatchers hear it first, over their lanes, and hand over at once (failover); the
        # paperwork comes after, and must not take the CPU the takeover needs.
        detected = time.time()
        for consumer_id in client.session.consumers:
            self.acks_waiting.pop(consumer_id, None)   # nobody left to answer
            self.credits.pop(consumer_id, None)
            self.rejoining.discard(consumer_id)
            route = self.consumers.pop(consumer_id, None)
            if route is not None:
                route[1].send([LaneOp.DETACH, consumer_id, detected, connection_id])
        # Every log record is a Thespian message to the logger process: a burst of 10,000 ordinary
        # closes must not cost 10,000 of them. Closes for a reason other than EOF stay visible.
        (log.debug if reason in ("eof", STOPPING) else log.info)("connection %s closed: %s", connection_id, reason,
                                                     extra={"connection": connection_id})
        cause = close_cause(reason)
        self.disconnects[cause] += 1
        # decided before the DETACHes went: watchers see the close before what it caused
        if cause == "slow_consumer":
            emit(self, self.events, "slow_consumer", detected, connection=connection_id)
        emit(self, self.events, "connection_closed", detected, connection=connection_id, cause=cause)
        # lazy: it goes within LAZY_S, after the takeover
        self.send_ordered(self.supervisor, connection.ConnectionClosed(connection_id, reason), "shard", lazy=True)
        for producer_id in list(client.session.producers):
            producer = self._drop_producer(producer_id)
            if producer is not None and not producer.lane.closed:
                # the topic frees the producer's place now, not when the lazy ConnectionClosed
                # has come round through the ConnectionActor (a new exclusive producer got
                # PRODUCER_BUSY meanwhile)
                producer.lane.send([LaneOp.PRODUCER_GONE, producer_id])
        for lane, consumer_id in client.deferred_acks:
            lane.send([LaneOp.DELIVER_ACK, consumer_id])
        client.deferred_acks.clear()
        for key, closing in list(self.closing_routes.items()):   # no CloseDecided comes for a closed one
            if closing.connection_id == connection_id:
                del self.closing_routes[key]
        client.state = "lingering"
        client.reading = True
        # A client that does not read gets longer to take its last frames: as long as a silent one
        self._timer(time.monotonic() + max(LINGER_S, 2 * client.session.heartbeat_s
                                           if reason.startswith(E.SLOW_CONSUMER) else 0), "linger",
                    connection_id)
        if client.tls is not None:
            self._seal_tls(client)
        self._flush(client)

    def _flushed_lingering(self, client):
        """Once the last frames are on the wire, say EOF; until then wait for the socket."""
        unsent = client.session.outbox or (client.tls is not None and client.tls.outgoing)
        if not unsent and not client.write_shut:
            client.write_shut = True
            try:
                client.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._finish(client)
                return
        self._update_mask(client)

    @staticmethod
    def _seal_tls(client):
        """A TLS connection closing: its last frames and our close_notify, as ciphertext."""
        outbox = client.session.outbox
        try:
            if client.tls.established:
                client.tls.send(outbox)
                client.tls.close()
        except ssl.SSLError:
            pass   # TLS broke: nothing more can be said in it
        client.session.sent(len(outbox))

    def _flush_lingering(self, client):
        outbox = client.session.outbox
        if client.tls is not None:
            self._seal_tls(client)
            outbox = client.tls.outgoing
        try:
            while outbox:
                sent = client.sock.send(outbox)
                del outbox[:sent]
        except OSError:
            outbox.clear()

    def _drain_lingering(self, client):
        got = 0
        try:
            while got < MAX_READ_PER_EVENT:   # a client that keeps writing must not starve the rest
                data = client.sock.recv(READ_SIZE)
                if not data:
                    break
                got += len(data)
            else:
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._finish(client)   # EOF: the client has seen everything

    def _finish(self, client):
        if client.state == "closed":
            return
        client.state = "closed"
        self.reactor.remove(client.fd)
        self.clients.pop(client.session.id, None)
        self.finished[client.address] += 1
        try:
            client.sock.close()
        except OSError:
            pass
        self._load_changed()

    def on_RecountHost(self, msg, sender):
        """The listener would refuse a connection from this host (max_connections_per_address; or
        from any, host None: max_connections), maybe counting one that has just closed: those of
        its connections that have hung up, their EOF not read yet, are read to their end now, and
        the count goes to the listener at once."""
        for client in [c for c in self.clients.values() if msg.host is None or c.address == msg.host]:
            for _ in range(64):   # a read takes at most MAX_READ_PER_EVENT
                if client.state == "closed" or not hung_up(client.sock):
                    break
                self._readable(client)
        self._report_load(recount=msg.token)

    def on_StopClients(self, msg, sender):
        """The broker is stopping: every client connection ends now, on the usual path (its
        last frames flushed, then EOF), while the topics are still there (listener.StopClients)."""
        closed = 0
        for client in list(self.clients.values()):
            if client.state == "open":
                self._closed(client, STOPPING)
                closed += 1
            elif client.state == "answering":   # its answers so far, then its error
                self._closed(client, client.closing)
        log.info("shard %s: %d client connections closed: %s", self.index, closed, STOPPING)
        self.send(self.supervisor, listener.ClientsStopped())

    def on_ActorExitRequest(self, msg, sender):
        self.exiting = True
        for client in list(self.clients.values()):
            if client.state == "open" or client.state == "answering":
                client.session.release_fatal()
                self._flush_lingering(client)
            client.state = "lingering"
            self._finish(client)
        if self.hub is not None:
            self.hub.close()
        self.reactor.close()


def hung_up(sock):
    """Has the peer closed its side (FIN or reset), whatever data is still unread before that?
    POLLRDHUP tells, without reading, where a peek would only see the data first."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


def socket_end_reason(exc):
    """The close reason for a socket call that failed with `exc`. A peer that reset the connection
    (a client killed with unread data on its socket, or closed it so) ended it like an EOF."""
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "eof"
    return f"socket error: {exc}"


def close_cause(reason):
    """The `cause` of a connection_closed event (docs/protocol.md, "Events") for a close reason."""
    if reason == "eof":
        return "eof"
    if reason.startswith("heartbeat"):
        return "heartbeat"
    if reason.startswith(E.SLOW_CONSUMER):
        return "slow_consumer"
    if reason == STOPPING:
        return "shutdown"
    return "error"
