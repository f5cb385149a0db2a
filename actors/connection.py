"""ConnectionActor: one per connection shard; the design card's ConsumerConnection.

It supervises one ShardActor (restart rule: permanent; a new shard takes over the same handoff
socket), handles the control and admin ops of every connection of that shard, and holds each
connection's producers and consumers. When the shard reports a connection's end
(ConnectionClosed) it detaches that connection's producers and consumers at once, by messages; when
the shard itself dies (ChildActorExited, often twice) it does the same for every connection of the
shard. No flag, no lock, no second packet.

Requests it sends on carry `rid` as a tag (connection id, rid): the answers find their connection.
"""
import dataclasses
import os
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from fnmatch import fnmatchcase
from typing import Any

from thespian.actors import ActorExitRequest

from actorbroker.actors import broker, cluster, events, shard, subscription, topic
from actorbroker.actors.base import BrokerActor, log
from actorbroker.actors.lifecycle import emit
from actorbroker.transport import errors as E, validate
from actorbroker.transport.codec import encode_frame, encode_reply
from actorbroker.transport.session import error_frame

GIVE_UP_MEMORY_S = 600   # how long a late answer to a request given up on is recognised and dropped
# Cluster: a producer or consumer of a non_reliable topic whose node was lost is opened again on
# the topic's new node, silently, retried this often for this long; then it ends with `closed`.
REATTACH_RETRY_S = 0.25
# Requests of one connection waiting for another actor's answer (most go through the root): beyond,
# OVERLOADED. A client pipelining thousands of admin requests must not queue them all at the root,
# which every other connection's producer and subscribe need too.
MAX_REQUESTS_IN_FLIGHT = 1024
CLOSE_OPS = frozenset({"close_producer", "close_consumer", "unsubscribe"})
# Requests of one connection passed on to the root at once; later ones wait here, in order, and
# those still waiting when the connection closes are dropped. The root serves every connection in
# the order requests reach it: a client pipelining a thousand `stats` puts 16 ahead of another
# client's `producer`, not a thousand. And a `producer` or `subscribe` may start a topic's or a
# subscription's processes: a client that pipelines hundreds of subscribes and hangs up leaves at
# most 16 behind, not minutes of process start-ups nobody waits for.
MAX_PASSED_ON = 16
# A new shard says it runs (ShardStarted) within this, or it is replaced: generous, as a process
# start takes seconds on a loaded machine, and replacing a slow one would only add to the load.
SHARD_START_DEADLINE = timedelta(seconds=10)
REATTACH_FOR_S = 10.0


@dataclass(frozen=True)
class StartConnections:
    handoff_fd: int      # our end of the listener's handoff socket, passed on to the shard
    close_fds: tuple     # inherited through the listener's fork; not ours
    index: int
    config: Any
    broker: Any
    listener: Any        # told of the shard's load


# --- from the shard ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientHello:
    """A connection completed hello; `permissions` are its token's (None: auth is off)."""
    connection_id: int
    client: str
    permissions: Any


@dataclass(frozen=True)
class ClientRequest:
    """A control or admin frame of a connection."""
    connection_id: int
    frame: dict


@dataclass(frozen=True)
class ConnectionClosed:
    """The socket is gone (EOF, error, heartbeat timeout, protocol error): clean up now."""
    connection_id: int
    reason: str


@dataclass(frozen=True)
class AnswerFirst:
    """The connection failed on what its client sent (a fatal protocol error) and reads no more
    requests: its shard holds the error frame until the requests read before it are answered.
    Answered by shard.RequestsAnswered, behind the answers, once none of it waits here any more."""
    connection_id: int


@dataclass(frozen=True)
class ConsumersLost:
    """The shard lost these consumers' lane (their dispatcher is gone) or was told they ended."""
    consumer_ids: list
    reason: str


@dataclass(frozen=True)
class ShardStarted:
    """A shard took its StartShard: it runs. One that does not say so within SHARD_START_DEADLINE
    is replaced (a shard killed within milliseconds of its start is not reported by Thespian)."""
    ident: str


@dataclass(frozen=True)
class ProducersLost:
    producer_ids: list
    reason: str


# --- from the topics, subscriptions and dispatchers ---------------------------------------------


@dataclass(frozen=True)
class ProducerOpened:
    rid: Any            # (connection id, rid)
    producer_id: int
    topic: str
    topic_address: Any
    lane: Any           # the topic's LaneAddress
    dispatch: str
    name: str
    node: str = ""      # the cluster node of the topic ("" on a single broker)


@dataclass(frozen=True)
class ConsumerOpened:
    rid: Any            # (connection id, rid)
    consumer_id: int
    subscription: Any   # SubscriptionActor address
    topic: Any          # TopicActor address
    lane: Any           # the DispatcherActor's LaneAddress
    dispatch: str
    active: Any         # bool for failover subscriptions, else None
    node: str = ""      # the cluster node of the topic ("" on a single broker)
    # (topic, subscription, consumer name): for its consumer_detached should its process die
    names: tuple = ()


@dataclass(frozen=True)
class ProducersCheck:
    """From a topic, a moment after its ProducerOpened: nothing to do here. Only whether it
    arrives matters (a ConnectionActor killed with that answer fails the send, and the topic
    drops the producers it owned: nothing else would, see TopicActor._check_producers)."""
    producer_ids: tuple


@dataclass(frozen=True)
class ProbeConsumer:
    """From a dispatcher, after its ConsumerOpened on the same channel: an exclusive subscribe met
    this consumer; is its connection still up? Passed on to the shard (shard.ProbeRoute), which
    answers the dispatcher over its lane."""
    consumer_id: int
    token: int
    lane: Any           # the DispatcherActor's LaneAddress


@dataclass(frozen=True)
class RequestDone:
    rid: Any
    frame: Any


@dataclass(frozen=True)
class RequestFailed:
    rid: Any
    code: str
    message: str


@dataclass(frozen=True)
class RequestLost:
    """An actor that passed this request on learnt that the one it went to died, maybe before
    answering: answered here (an error saying to send it again) unless answered already; an
    answer that still comes is dropped, and what it opened is closed."""
    rid: Any
    why: str


@dataclass(frozen=True)
class RequestForwarded:
    """The root sent the request `rid` to the cluster member `node`, which answers it directly:
    if that member is lost first, the request is answered here (TOPIC_UNAVAILABLE)."""
    rid: Any
    node: str


@dataclass(frozen=True)
class ProducerEnded:
    producer_id: int
    reason: str
    node: str = ""


@dataclass(frozen=True)
class ConsumerEnded:
    consumer_id: int
    reason: str
    node: str = ""


class BadRequest(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def allowed(permissions, action, topic_name):
    """Auth off (None), 'admin', or a matching 'produce:PATTERN' / 'consume:PATTERN'."""
    if permissions is None or "admin" in permissions:
        return True
    if action == "admin":
        return False
    return any(p.startswith(action + ":") and fnmatchcase(topic_name, p.split(":", 1)[1])
               for p in permissions)


class _Connection:
    """What this actor knows of one client connection."""
    __slots__ = ("permissions", "producers", "consumers", "pending", "closed", "watching", "in_flight", "held")

    def __init__(self, permissions=None):
        self.permissions = permissions
        self.producers = {}    # producer id -> topic address
        self.consumers = {}    # consumer id -> subscription address
        self.pending = {}      # tags of requests not answered yet -> "producers"/"consumers" (opening), "request"
        self.closed = False
        self.watching = False  # its pattern, once it asked for the event stream (the EventsActor has it)
        self.in_flight = set()  # tags of requests passed on to the root, not answered yet
        self.held = {}         # tag -> (op, message to the root) of those waiting their turn, in order


@dataclass
class Rejoin:
    """A producer or consumer of a non_reliable topic on another node, kept so that it can be
    opened again, under the same id, wherever the topic is placed once that node is lost."""
    kind: str              # "producer" or "consumer"
    connection_id: Any
    topic: str
    request: Any           # the producer/subscribe request it was opened with
    name: str = ""         # a producer's name
    until: Any = None      # re-attaching until this monotonic time; None: attached


class ConnectionActor(BrokerActor):
    process_name = "ab-conn"
    init_message = StartConnections

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.config = None
        self.broker = None
        self.index = 0
        self.handoff_fd = None
        self.shard = None
        self.shard_ident = None
        self.listener = None
        self.connections = {}        # connection id -> _Connection
        self.producer_conn = {}      # producer id -> connection id
        self.consumer_conn = {}      # consumer id -> connection id
        self.consumer_topic = {}     # consumer id -> topic address
        self.consumer_names = {}     # consumer id -> (topic, subscription, consumer name)
        self.node_of = {}            # producer or consumer id -> cluster node of its topic
        # str(address) -> the ordered stream to that actor. A topic or subscription created anew
        # may get the port, so the address, of one that died: its stream must start from zero,
        # so the key names the incarnation too (by its lane, unique to it). A stream lives while
        # a producer or consumer of ours is on that actor (stream_users); then it ends
        # (forget_ordered: the actor forgets it too), and one opened later there is a new one.
        self.streams = {}
        self.stream_users = {}       # str(address) -> producers and consumers of ours there
        self.stream_serial = 0
        self.exiting = False
        self.shards_lost = 0         # connections ended because their shard died
        self.forwarded = {}          # tag of a request another node answers -> that node
        self.given_up = {}           # tag answered here when its node was lost -> when: late answers dropped
        self.opening = {}            # cluster: tag of a producer/subscribe request -> (topic, request)
        # cluster, non_reliable topics on another node: producer/consumer id -> Rejoin; re-opened
        # wherever the topic is placed next if that node is lost
        self.rejoin = {}
        self.reattaches = 0
        self.stop_asker = None       # the listener, while our shard closes its clients (StopClients)
        self._last_opening = None    # what _answered found in self.opening for the tag it was given
        self._was_pending = False    # and whether that request was waiting for its answer
        self.asked_at = {}           # tag of a request passed on to the actors -> (when, op), oldest first
        self.closing = {}            # consumer id -> tag of its close_consumer or unsubscribe, unanswered
        self.closing_tags = {}       # and back
        self.deadline_check = False  # a wakeup is set to answer requests past their deadline
        self.answer_first = set()    # connections whose shard waits for their last answers (AnswerFirst)

    # --- set-up and the shard's supervision -------------------------------------------------------
    def on_StartConnections(self, msg, sender):
        self.config, self.broker, self.index = msg.config, msg.broker, msg.index
        self.listener = msg.listener
        for fd in msg.close_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.handoff_fd = msg.handoff_fd   # kept open: a restarted shard inherits it again
        self._start_shard()
        self.start_reports(self.config.metrics)

    def metrics_snapshot(self, counters, gauges, histograms):
        counters[("actorbroker_disconnects", ("shard_lost",))] = self.shards_lost

    def _start_shard(self):
        self.shard_ident = cluster.shard_ident(self.index, uuid.uuid4().hex[:12], self.config.node)
        self.shard = self.createActor("actorbroker.actors.shard.ShardActor")
        self.shard_started = False
        self.forget_ordered("shard", end=False)   # (the shard before is gone)
        self.send_ordered(self.shard, shard.StartShard(self.handoff_fd, self.index, self.shard_ident,
                                                       self.config, self.listener), "shard")
        self.wakeupAfter(SHARD_START_DEADLINE, payload=("shard-start", self.shard_ident))

    def on_ShardStarted(self, msg, sender):
        if msg.ident == self.shard_ident:
            self.shard_started = True

    def _shard_start_overdue(self, ident):
        """A shard killed within milliseconds of its start is not reported by Thespian (no
        ChildActorExited): this slot then served nobody for good (half of the new clients got no
        answer to hello). Not started by the deadline: end it, whatever it is doing, and start
        another."""
        if ident != self.shard_ident or self.shard_started or self.exiting:
            return
        log.warning("shard %d did not start within %d s (killed as it started?): a new shard starts",
                    self.index, SHARD_START_DEADLINE.total_seconds())
        self.send(self.shard, ActorExitRequest())
        self._shard_lost()

    def on_ChildActorExited(self, msg, sender):
        if msg.childAddress != self.shard:
            return
        self._shard_lost()

    def _shard_lost(self):
        # Delivered once or twice; after the first, self.shard is the new shard.
        (log.info if self.exiting else log.warning)(
            "shard %d exited; its %d connections are cleaned up%s", self.index, len(self.connections),
            "" if self.exiting else ", a new shard starts")
        for connection_id in list(self.connections):
            if not self.connections[connection_id].closed:
                self.shards_lost += not self.exiting
                emit(self, self.config.events, "connection_closed", connection=connection_id,
                            cause="shutdown" if self.exiting else "shard_lost")
            self._cleanup(connection_id, "shard lost")
        if not self.exiting:
            self._start_shard()

    def on_StopClients(self, msg, sender):
        self.stop_asker = sender
        self._to_shard(msg)

    def on_ClientsStopped(self, msg, sender):
        if self.stop_asker is not None:
            self.send(self.stop_asker, msg)
            self.stop_asker = None

    def on_ActorExitRequest(self, msg, sender):
        self.exiting = True
        for connection_id in list(self.connections):
            if not self.connections[connection_id].closed:
                emit(self, self.config.events, "connection_closed", connection=connection_id,
                            cause="shutdown")
            self._cleanup(connection_id, "broker stopping")

    # --- the end of a connection is the cleanup signal --------------------------------------------
    def on_ClientHello(self, msg, sender):
        self.connections[msg.connection_id] = _Connection(msg.permissions)

    def on_AnswerFirst(self, msg, sender):
        self.answer_first.add(msg.connection_id)   # (told after this message: _base_handle)

    def _base_handle(self, msg, sender):
        super()._base_handle(msg, sender)
        if self.answer_first:
            self._tell_answered()

    def _tell_answered(self):
        """The connections of answer_first none of whose requests waits here any more: their shard
        hears it now, on the channel of the answers (which are on their way already), behind them."""
        for connection_id in list(self.answer_first):
            conn = self.connections.get(connection_id)
            if conn is None or conn.closed or all(_reattach_tag(tag) for tag in conn.pending):
                self.answer_first.discard(connection_id)
                self._to_shard(shard.RequestsAnswered(connection_id))

    def on_ConnectionClosed(self, msg, sender):
        self._cleanup(msg.connection_id, msg.reason)

    def _cleanup(self, connection_id, reason):
        conn = self.connections.get(connection_id)
        if conn is None or conn.closed:
            return
        conn.closed = True
        if self.rejoin:
            for ident in [i for i, entry in self.rejoin.items() if entry.connection_id == connection_id]:
                del self.rejoin[ident]
        if conn.watching:
            self.send_ordered(self.config.events, events.Unwatch(connection_id, None, self.shard), "events")
        for producer_id, topic_address in conn.producers.items():
            self.producer_conn.pop(producer_id, None)
            self.node_of.pop(producer_id, None)
            self.send_ordered(topic_address, topic.CloseProducer(producer_id, None, None), self._stream(topic_address))
            self._stream_user_gone(topic_address)
        for consumer_id, subscription_address in conn.consumers.items():
            self._forget_consumer(consumer_id)
            self.send_ordered(subscription_address, subscription.DetachConsumer(consumer_id, None, None),
                              self._stream(subscription_address))
            self._stream_user_gone(subscription_address)
        log.debug("connection %s: cleaned up %d producers, %d consumers (%s)", connection_id,
                  len(conn.producers), len(conn.consumers), reason, extra={"connection": connection_id})
        conn.producers.clear()
        conn.consumers.clear()
        for tag in conn.held:   # never passed on: nobody waits for them now
            conn.pending.pop(tag, None)
            self.opening.pop(tag, None)
        conn.held.clear()
        self._forget_when_drained(connection_id)

    def _forget_when_drained(self, connection_id):
        # Stay while an open request is in flight: it may yet attach a consumer, to detach at once.
        conn = self.connections.get(connection_id)
        if conn is not None and conn.closed and not conn.pending:
            del self.connections[connection_id]

    def on_ConsumersLost(self, msg, sender):
        for consumer_id in msg.consumer_ids:
            if msg.reason == "topic_lost" and consumer_id in self.consumer_topic:
                self.send_ordered(self.broker, broker.TopicLost(self.consumer_topic[consumer_id]), "root")
            if consumer_id in self.rejoin and msg.reason in ("topic_lost", "subscription_lost"):
                self._reattach(consumer_id)
            else:
                # its dispatcher died (or its topic, or the lane to them): no consumer_detached
                # came from there, so it comes from here
                names = self.consumer_names.get(consumer_id)
                if self._end_consumer(consumer_id, msg.reason, detach=True) and names:
                    emit(self, self.config.events, "consumer_detached", topic=names[0], subscription=names[1],
                         consumer=consumer_id, consumer_name=names[2], cause=msg.reason)

    def on_ProducersLost(self, msg, sender):
        for producer_id in msg.producer_ids:
            if msg.reason == "topic_lost":
                conn = self.connections.get(self.producer_conn.get(producer_id))
                if conn is not None and producer_id in conn.producers:
                    self.send_ordered(self.broker, broker.TopicLost(conn.producers[producer_id]), "root")
            if producer_id in self.rejoin and msg.reason == "topic_lost":
                self._reattach(producer_id)
            else:
                self._end_producer(producer_id, msg.reason, close=True)

    # --- cluster: re-attaching to a re-homed non_reliable topic -----------------------------------
    def _reattach(self, ident):
        """Its topic's node is gone (lane EOF, or declared lost): open it again by the same id
        wherever the topic is placed now. The client sees a gap, nothing else."""
        entry = self.rejoin.get(ident)
        conn = self.connections.get(entry.connection_id) if entry else None
        if conn is None or conn.closed:
            self.rejoin.pop(ident, None)
            return
        kind, connection_id = entry.kind, entry.connection_id
        if entry.until is None:   # attached until now: detach here, keep it for the client
            entry.until = time.monotonic() + REATTACH_FOR_S
            self.node_of.pop(ident, None)
            if kind == "consumer":
                self._stream_user_gone(conn.consumers.pop(ident, None))
                self.consumer_topic.pop(ident, None)
                self._to_shard(shard.UnrouteConsumer(connection_id, ident, reattaching=True))
            else:
                self._stream_user_gone(conn.producers.pop(ident, None))
                # (its topic's node is gone: what it sent there is refused now, never receipted)
                self._to_shard(shard.UnrouteProducer(connection_id, ident, reattaching=True, name=entry.name,
                                                     lost=True))
        if any(_reattach_tag(t) and t[1][1] == ident for t in conn.pending):
            return   # asked already
        self.reattaches += 1   # a tag per attempt: an attempt given up on must not shadow the next
        tag = (connection_id, ("reattach", ident, self.reattaches))
        conn.pending[tag] = kind + "s"
        self.send_ordered(self.broker, broker.TopicRequest(
            entry.topic, "non_reliable", dataclasses.replace(entry.request, rid=tag, new_id=ident)), "root")

    def _reattach_failed(self, ident):
        entry = self.rejoin.get(ident)
        if entry is None or entry.until is None:
            return
        if time.monotonic() < entry.until:   # its new node may not be known everywhere yet
            self.wakeupAfter(timedelta(seconds=REATTACH_RETRY_S), payload=("reattach", ident))
            return
        log.warning("%s %s could not be re-attached within %.0f s; ending it", entry.kind, ident, REATTACH_FOR_S)
        if entry.kind == "consumer":
            self._end_consumer(ident, "node_lost", detach=False)
        else:
            self._end_producer(ident, "node_lost", close=False)

    def on_WakeupMessage(self, msg, sender):
        if isinstance(msg.payload, tuple) and msg.payload[0] == "reattach":
            self._reattach(msg.payload[1])
        elif isinstance(msg.payload, tuple) and msg.payload[0] == "shard-start":
            self._shard_start_overdue(msg.payload[1])
        elif msg.payload == "deadline":
            self.deadline_check = False
            self._answer_overdue()

    # --- requests nobody answered -----------------------------------------------------------------
    def _asked(self, tag, op):
        self.asked_at[tag] = (time.monotonic(), op)
        if not self.deadline_check:
            self.deadline_check = True
            self.wakeupAfter(timedelta(seconds=self._deadline_s() / 10), payload="deadline")

    def _deadline_s(self):
        # A request passed on to the broker's actors that none of them answered this long after
        # (the one holding it died with it) is answered here: never left unanswered. The default
        # (30 s) is far above what a loaded broker takes (1,000 subscribes in flight: seconds).
        return self.config.request_deadline_ms / 1000.0

    def _answer_overdue(self):
        now = time.monotonic()
        deadline = self._deadline_s()
        for tag in [t for t, when in self.given_up.items() if now - when > GIVE_UP_MEMORY_S]:
            del self.given_up[tag]
        for tag, (when, op) in list(self.asked_at.items()):
            if now - when < deadline:
                break   # the rest are younger
            log.warning("connection %s: %s request %s got no answer from the broker's actors within "
                        "%g s; answering it here", tag[0], op, tag[1], deadline, extra={"connection": tag[0]})
            self._give_up(tag, op, f"no answer from the broker's actors within {deadline:g} s "
                                   "(the one handling it may have died); it may or may not have taken effect")
        if self.asked_at and not self.deadline_check:
            self.deadline_check = True
            self.wakeupAfter(timedelta(seconds=self._deadline_s() / 10), payload="deadline")

    def _give_up(self, tag, op, why):
        """Answer a request here that its actor will not: `ok` to a close_consumer (the consumer is
        this connection's no longer either way), an error to the rest; an answer that still comes
        is dropped (and what it opened, closed)."""
        connection_id, conn = self._answered(tag)
        self.given_up[tag] = time.monotonic()
        if conn is None:
            return
        if not conn.closed:
            self._write(connection_id, encode_frame({"op": "ok", "rid": tag[1]})
                        if op in ("close_consumer", "close_producer")
                        else error_frame(E.INTERNAL, f"{why}; send it again", tag[1]))
        self._forget_when_drained(connection_id)

    def on_RequestLost(self, msg, sender):
        if msg.rid in self.asked_at:
            self._give_up(msg.rid, self.asked_at[msg.rid][1], msg.why)

    def undeliverable(self, address, msgs):
        """Sent to an actor that had died: a close or unsubscribe is answered now."""
        for msg in msgs:
            tag = getattr(msg, "rid", None)
            if isinstance(msg, (subscription.DetachConsumer, topic.CloseProducer)) and tag in self.asked_at:
                self._give_up(tag, "close_consumer", "")   # ok: it is this connection's no longer
            elif isinstance(msg, subscription.Unsubscribe) and tag in self.asked_at:
                self._give_up(tag, "unsubscribe", "the subscription's actor was lost before it could "
                                                  "unsubscribe; it may be restarted from its cursor")

    # --- control and admin requests ---------------------------------------------------------------
    def on_ClientRequest(self, msg, sender):
        conn = self.connections.get(msg.connection_id)
        if conn is None or conn.closed:
            return
        rid = msg.frame.get("rid") if isinstance(msg.frame, dict) else None
        rid = rid if validate.is_uint(rid) else None
        refused = True   # before its handler ran: the request had no effect here
        try:
            frame = validate.control(msg.frame)   # the shard checked it; trust no message all the same
            if len(conn.pending) >= MAX_REQUESTS_IN_FLIGHT:
                raise BadRequest(E.OVERLOADED, f"this connection has {len(conn.pending)} requests waiting "
                                               f"for an answer (at most {MAX_REQUESTS_IN_FLIGHT}); try again later")
            tag = (msg.connection_id, rid)
            if rid is not None and tag in conn.pending:
                # counted once, it would pass the limits above and below as often as it is reused
                raise BadRequest(E.BAD_REQUEST, f"rid {rid} is already used by a request of this connection "
                                                "waiting for its answer; a rid must be unique among those")
            refused = False   # (a handler that raises has found it not this connection's, or failed)
            getattr(self, "_op_" + frame["op"])(conn, msg.connection_id, frame, tag)
            if tag in conn.pending and tag not in conn.held:
                self._asked(tag, frame["op"])
        except (BadRequest, validate.Invalid) as exc:
            self._write(msg.connection_id, error_frame(exc.code, exc.message, rid))
        except Exception:
            log.exception("connection %s: op %r failed", msg.connection_id, msg.frame.get("op"),
                          extra={"connection": msg.connection_id})
            self._write(msg.connection_id, error_frame(E.INTERNAL, "internal error (logged on the broker)", rid))
        op = msg.frame.get("op") if isinstance(msg.frame, dict) else None
        if op in CLOSE_OPS:   # the shard stopped routing it when it read the request
            ident = msg.frame.get("producer" if op == "close_producer" else "consumer")
            if type(ident) is int:
                self._to_shard(shard.CloseDecided(msg.connection_id, op, ident, refused))

    def _op_producer(self, conn, connection_id, frame, tag):
        name = self._authorized(conn, frame["topic"], "produce")
        self._within_limit(conn, "producers", self.config.max_producers_per_connection)
        request = topic.OpenProducer(tag, self.myAddress, 0, frame["name"], frame["access"], self.shard_ident)
        if self.config.node:
            self.opening[tag] = (name, request)
        self._pass_on(conn, tag, "producer", broker.TopicRequest(
            name, frame["dispatch"] or self.config.default_dispatch, request))

    def _op_close_producer(self, conn, connection_id, frame, tag):
        producer_id = self._known(frame, "producer", conn.producers, E.UNKNOWN_PRODUCER)
        topic_address = conn.producers.pop(producer_id)
        self.producer_conn.pop(producer_id, None)
        self.rejoin.pop(producer_id, None)
        conn.pending[tag] = "request"
        self.send_ordered(topic_address, topic.CloseProducer(producer_id, tag, self.myAddress),
                          self._stream(topic_address))
        self._stream_user_gone(topic_address)

    def _op_subscribe(self, conn, connection_id, frame, tag):
        name = self._authorized(conn, frame["topic"], "consume")
        if frame["dead_letter_topic"] is not None:
            # the broker writes there on this client's behalf: it needs the right to produce there
            self._authorized(conn, frame["dead_letter_topic"], "produce")
        options = {field: frame[field] for field in ("max_unacked", "ack_timeout_ms", "max_redeliveries",
                                                     "dead_letter_topic")}
        self._within_limit(conn, "consumers", self.config.max_consumers_per_connection)
        request = topic.Subscribe(tag, self.myAddress, self.shard_ident, 0, frame["subscription"], frame["type"],
                                  frame["consumer"], frame["start"], options)
        if self.config.node:
            self.opening[tag] = (name, request)
        self._pass_on(conn, tag, "subscribe", broker.TopicRequest(
            name, frame["dispatch"] or self.config.default_dispatch, request))

    def _pass_on(self, conn, tag, op, request):
        """Pass a request on to the root, or hold it while MAX_PASSED_ON of the connection's are
        being handled."""
        conn.pending[tag] = "consumers" if op == "subscribe" else "producers" if op == "producer" else "request"
        if len(conn.in_flight) >= MAX_PASSED_ON or conn.held:
            conn.held[tag] = (op, request)
            return
        conn.in_flight.add(tag)
        self.send_ordered(self.broker, request, "root")

    def _release_held(self, conn):
        while conn.held and len(conn.in_flight) < MAX_PASSED_ON and not conn.closed:
            tag = next(iter(conn.held))
            op, request = conn.held.pop(tag)
            conn.in_flight.add(tag)
            self.send_ordered(self.broker, request, "root")
            self._asked(tag, op)

    def _op_close_consumer(self, conn, connection_id, frame, tag):
        consumer_id, subscription_address = self._release_consumer(conn, frame)
        conn.pending[tag] = "request"
        self.closing[consumer_id], self.closing_tags[tag] = tag, consumer_id
        self.send_ordered(subscription_address, subscription.DetachConsumer(consumer_id, tag, self.myAddress),
                          self._stream(subscription_address))
        self._stream_user_gone(subscription_address)

    def _op_unsubscribe(self, conn, connection_id, frame, tag):
        consumer_id, subscription_address = self._release_consumer(conn, frame)
        conn.pending[tag] = "request"
        self.closing[consumer_id], self.closing_tags[tag] = tag, consumer_id
        self.send_ordered(subscription_address, subscription.Unsubscribe(consumer_id, tag, self.myAddress),
                          self._stream(subscription_address))
        self._stream_user_gone(subscription_address)

    def _release_consumer(self, conn, frame):
        """The consumer a close/unsubscribe names, no longer this connection's."""
        consumer_id = self._known(frame, "consumer", conn.consumers, E.UNKNOWN_CONSUMER)
        self._forget_consumer(consumer_id)
        return consumer_id, conn.consumers.pop(consumer_id)

    def _new_stream(self, address, lane):
        """A producer or consumer of ours is on the actor at `address` now (its lane: `lane`)."""
        where = str(address)
        old = self.streams.get(where)
        if old is None or old[2] != repr(lane):
            if old is not None:   # a new incarnation at that address: the old one is gone
                self.forget_ordered(old)
            self.stream_serial += 1
            self.streams[where] = ("to", where, repr(lane), self.stream_serial)
        self.stream_users[where] = self.stream_users.get(where, 0) + 1

    def _stream_user_gone(self, address):
        """One producer or consumer of ours fewer on `address` (after what was sent for it):
        with none left, its stream ends, here and at that actor (which may be gone already)."""
        if address is None:
            return
        where = str(address)
        left = self.stream_users.get(where, 0) - 1
        if left > 0:
            self.stream_users[where] = left
            return
        self.stream_users.pop(where, None)
        stream = self.streams.pop(where, None)
        if stream is not None:
            self.forget_ordered(stream)

    def _stream(self, address):
        return self.streams.get(str(address), ("to", str(address)))

    def _forget_consumer(self, consumer_id):
        """Drop the consumer's indexes; returns the connection id it had."""
        self.rejoin.pop(consumer_id, None)
        self.consumer_topic.pop(consumer_id, None)
        self.consumer_names.pop(consumer_id, None)
        self.node_of.pop(consumer_id, None)
        return self.consumer_conn.pop(consumer_id, None)

    def _op_topics(self, conn, connection_id, frame, tag):
        self._require_admin(conn)
        self._pass_on(conn, tag, "topics", broker.ListTopics(tag, self.myAddress))

    def _op_stats(self, conn, connection_id, frame, tag):
        self._require_admin(conn)
        # (it may go to another node: RequestForwarded)
        self._pass_on(conn, tag, "stats", broker.TopicRequest(frame["topic"], None, topic.StatsRequest(tag, self.myAddress)))

    def _op_lookup(self, conn, connection_id, frame, tag):
        self._require_admin(conn)
        self._pass_on(conn, tag, "lookup", broker.Lookup(tag, frame["topic"], self.myAddress))

    def _op_cluster(self, conn, connection_id, frame, tag):
        self._require_admin(conn)
        self._pass_on(conn, tag, "cluster", broker.ClusterStatus(tag, self.myAddress))

    def operability_children(self):
        return [self.shard] if self.shard is not None else []

    def on_OperabilityMoved(self, msg, sender):
        events_moved = self.config is not None and msg.events != self.config.events
        super().on_OperabilityMoved(msg, sender)
        if events_moved:   # the watchers' registrations died with the old EventsActor
            for connection_id, conn in self.connections.items():
                if conn.watching:
                    self.send_ordered(self.config.events, events.Watch(connection_id, None, conn.watching,
                                                                       self.shard), "events")

    def _op_watch(self, conn, connection_id, frame, tag):
        self._require_admin(conn)
        conn.watching = frame["topics"]   # the EventsActor answers `ok`, ahead of the events, in order
        self.send_ordered(self.config.events, events.Watch(connection_id, tag[1], frame["topics"], self.shard),
                          "events")

    def _op_unwatch(self, conn, connection_id, frame, tag):
        self._require_admin(conn)
        conn.watching = False
        self.send_ordered(self.config.events, events.Unwatch(connection_id, tag[1], self.shard), "events")
    def _op_broker_stats(self, conn, connection_id, frame, tag):
        self._require_admin(conn)
        self._pass_on(conn, tag, "broker_stats", broker.BrokerStatsRequest(tag, self.myAddress))

    def _op_delete_topic(self, conn, connection_id, frame, tag):
        self._require_admin(conn)
        self._pass_on(conn, tag, "delete_topic", broker.DeleteTopic(tag, frame["topic"], self.myAddress))

    # --- permissions and ids (the shapes were checked by transport/validate.py) --------------------
    @staticmethod
    def _authorized(conn, name, action):
        if not allowed(conn.permissions, action, name):
            raise BadRequest(E.NOT_AUTHORIZED, f"token may not {action} on {name}")
        return name

    @staticmethod
    def _within_limit(conn, kind, limit):
        """Open and opening producers (or consumers) of the connection stay within the limit."""
        count = len(getattr(conn, kind)) + sum(1 for k in conn.pending.values() if k == kind)
        if count >= limit:
            raise BadRequest(E.OVERLOADED, f"this connection has {count} {kind} open "
                                           f"(max_{kind}_per_connection {limit}); close one first")

    @staticmethod
    def _require_admin(conn):
        if not allowed(conn.permissions, "admin", ""):
            raise BadRequest(E.NOT_AUTHORIZED, "admin permission needed")

    @staticmethod
    def _known(frame, field, table, code):
        value = frame[field]
        if value not in table:
            raise BadRequest(code, f"{field} {value} is not open on this connection")
        return value

    # --- answers from the broker's actors ---------------------------------------------------------
    def _answered(self, tag):
        """The connection a request came from, if it is still open; forgets the request. None
        too for an answer that comes after the request was given up (its node was lost)."""
        self.forwarded.pop(tag, None)
        self.asked_at.pop(tag, None)
        if self.closing_tags:
            self.closing.pop(self.closing_tags.pop(tag, None), None)
        self._last_opening = opening = self.opening.pop(tag, None) if self.opening else None
        if self.given_up and self.given_up.pop(tag, None) is not None:
            return None, None
        connection_id, _ = tag
        conn = self.connections.get(connection_id)
        if conn is None:
            return None, None
        self._was_pending = conn.pending.pop(tag, None) is not None
        if tag in conn.in_flight:
            conn.in_flight.discard(tag)
            if conn.held:
                self._release_held(conn)
        return connection_id, conn

    def on_RequestForwarded(self, msg, sender):
        conn = self.connections.get(msg.rid[0])
        if conn is not None and msg.rid in conn.pending:   # (not if its answer came first)
            self.forwarded[msg.rid] = msg.node

    def _give_up_on(self, node):
        """Answer the requests that the lost member `node` was to answer: it never will."""
        now = time.monotonic()
        for tag, when in list(self.given_up.items()):
            if now - when > GIVE_UP_MEMORY_S:
                del self.given_up[tag]
        for tag in [t for t, n in self.forwarded.items() if n == node]:
            connection_id, conn = self._answered(tag)
            self.given_up[tag] = now
            if _reattach_tag(tag):
                self._reattach_failed(tag[1][1])
                continue
            if conn is None:
                continue
            if not conn.closed:
                self._write(connection_id, error_frame(E.TOPIC_UNAVAILABLE, (
                    f"node {node} was lost before it answered this request; send it again"), tag[1]))
            self._forget_when_drained(connection_id)

    def on_ProducerOpened(self, msg, sender):
        connection_id, conn = self._answered(msg.rid)
        opening, again = self._last_opening, _reattach_tag(msg.rid)
        if conn is not None and not self._was_pending and not again:   # answered already
            if msg.producer_id not in conn.producers:
                self.send(msg.topic_address, topic.CloseProducer(msg.producer_id, None, None))
            return
        if conn is None or conn.closed or (again and msg.producer_id not in self.rejoin):
            # the client left while this was in flight, or it was given up
            self.send(msg.topic_address, topic.CloseProducer(msg.producer_id, None, None))
            if conn is not None:
                self._forget_when_drained(connection_id)
            return
        self._stream_user_gone(conn.producers.get(msg.producer_id))   # (none: ids are new)
        conn.producers[msg.producer_id] = msg.topic_address
        self.producer_conn[msg.producer_id] = connection_id
        if msg.node:
            self.node_of[msg.producer_id] = msg.node
        self._new_stream(msg.topic_address, msg.lane)
        if again:   # re-attached after its node was lost: the client sees nothing of it
            self.rejoin[msg.producer_id].until = None
            log.info("producer %s re-attached to topic %s on node %s", msg.producer_id, msg.topic, msg.node)
            self._to_shard(shard.RouteProducer(connection_id, msg.producer_id, msg.lane, msg.name, b"", rejoins=True))
            return
        if opening is not None and msg.node and msg.dispatch == "non_reliable":
            self.rejoin[msg.producer_id] = Rejoin("producer", connection_id, opening[0], opening[1], msg.name)
        self._to_shard(shard.RouteProducer(
            connection_id, msg.producer_id, msg.lane, msg.name,
            encode_frame({"op": "producer_ok", "rid": msg.rid[1], "producer": msg.producer_id,
                          "topic": msg.topic, "dispatch": msg.dispatch}), rejoins=msg.producer_id in self.rejoin))

    def on_ConsumerOpened(self, msg, sender):
        connection_id, conn = self._answered(msg.rid)
        opening, again = self._last_opening, _reattach_tag(msg.rid)
        if conn is not None and not self._was_pending and not again:
            # answered already: the same subscribe handled twice (a topic re-handles one it
            # passed to a subscription process that died, which may have attached it first)
            if msg.consumer_id not in conn.consumers:   # attached anew after it had ended: undo
                self.send(msg.subscription, subscription.DetachConsumer(msg.consumer_id, None, None))
            return
        if conn is None or conn.closed or (again and msg.consumer_id not in self.rejoin):
            self.send(msg.subscription, subscription.DetachConsumer(msg.consumer_id, None, None))
            if conn is not None:
                self._forget_when_drained(connection_id)
            return
        self._stream_user_gone(conn.consumers.get(msg.consumer_id))
        conn.consumers[msg.consumer_id] = msg.subscription
        self._new_stream(msg.subscription, msg.lane)
        self.consumer_conn[msg.consumer_id] = connection_id
        if msg.node:
            self.node_of[msg.consumer_id] = msg.node
        self.consumer_topic[msg.consumer_id] = msg.topic
        self.consumer_names[msg.consumer_id] = msg.names
        data = b""
        if again:   # re-attached after its node was lost: the client sees nothing of it
            self.rejoin[msg.consumer_id].until = None
            log.info("consumer %s re-attached on node %s", msg.consumer_id, msg.node)
        else:
            if opening is not None and msg.node and msg.dispatch == "non_reliable":
                self.rejoin[msg.consumer_id] = Rejoin("consumer", connection_id, opening[0], opening[1])
            data = encode_frame({"op": "subscribed", "rid": msg.rid[1], "consumer": msg.consumer_id,
                                 "dispatch": msg.dispatch})
        if msg.active is not None:
            data += encode_frame({"op": "active", "consumer": msg.consumer_id, "active": msg.active})
        self._to_shard(shard.RouteConsumer(connection_id, msg.consumer_id, msg.lane, data, regrant=again,
                                           rejoins=msg.consumer_id in self.rejoin))

    def on_ProducersCheck(self, msg, sender):
        pass   # arriving is the answer (ProducersCheck)

    def on_ProbeConsumer(self, msg, sender):
        # Behind the RouteConsumer of its ConsumerOpened (one channel to the shard). Not attached
        # here (any more): its client hung up before the answer, or since.
        connection_id = self.consumer_conn.get(msg.consumer_id)
        conn = self.connections.get(connection_id) if connection_id is not None else None
        self._to_shard(shard.ProbeRoute(msg.consumer_id, msg.token, msg.lane, conn is None or conn.closed))

    def _stale(self, ident, node):
        """From the node that held the topic before the producer or consumer was re-attached
        elsewhere (a stopped node, back and ending its copy): not about the one attached now."""
        entry = self.rejoin.get(ident) if node else None
        return entry is not None and (entry.until is not None or self.node_of.get(ident) != node)

    def on_RequestDone(self, msg, sender):
        connection_id, conn = self._answered(msg.rid)
        if conn is None or not self._was_pending:   # (answered already: given up, or a duplicate)
            return
        if not conn.closed:   # (topics, stats: cut to max_frame, as pushes are; docs/protocol.md)
            self._write(connection_id, encode_reply(dict(msg.frame, rid=msg.rid[1]), self.config.max_frame))
        self._forget_when_drained(connection_id)

    def on_RequestFailed(self, msg, sender):
        connection_id, conn = self._answered(msg.rid)
        if _reattach_tag(msg.rid):
            self._reattach_failed(msg.rid[1][1])
            return
        if conn is None or not self._was_pending:
            return
        if not conn.closed:
            self._write(connection_id, error_frame(msg.code, msg.message, msg.rid[1]))
        self._forget_when_drained(connection_id)

    def on_ProducerEnded(self, msg, sender):
        if self._stale(msg.producer_id, msg.node):
            return
        if msg.reason == topic.TOPIC_MOVED:   # a fenced node's copy: to the topic's new one
            if msg.producer_id in self.rejoin:
                self._reattach(msg.producer_id)
                return
            self._end_producer(msg.producer_id, "topic_lost", close=False)
            return
        self._end_producer(msg.producer_id, msg.reason, close=False)

    def on_ConsumerEnded(self, msg, sender):
        if self._stale(msg.consumer_id, msg.node):
            return
        if msg.reason == topic.TOPIC_MOVED:
            if msg.consumer_id in self.rejoin:
                self._reattach(msg.consumer_id)
                return
            self._end_consumer(msg.consumer_id, "topic_lost", detach=False)
            return
        self._end_consumer(msg.consumer_id, msg.reason, detach=False)

    def on_NodeLost(self, msg, sender):
        """A cluster member was declared lost: what is attached to its topics ends now, even if
        no lane told us (a partition keeps sockets open); the client may open them again."""
        self._give_up_on(msg.node)
        for ident in [i for i, node in self.node_of.items() if node == msg.node]:
            if ident in self.rejoin:
                self._reattach(ident)
                continue
            if ident in self.producer_conn:
                self._end_producer(ident, "node_lost", close=False, lost=True)
            if ident in self.consumer_conn:
                self._end_consumer(ident, "node_lost", detach=False)

    def _end_producer(self, producer_id, reason, close, lost=False):
        self.node_of.pop(producer_id, None)
        self.rejoin.pop(producer_id, None)
        connection_id = self.producer_conn.pop(producer_id, None)
        conn = self.connections.get(connection_id)
        if conn is None:
            return
        topic_address = conn.producers.pop(producer_id, None)
        if close and topic_address is not None:   # the topic may live on: say so (idempotent)
            self.send_ordered(topic_address, topic.CloseProducer(producer_id, None, None), self._stream(topic_address))
        self._stream_user_gone(topic_address)
        if not conn.closed:
            self._to_shard(shard.UnrouteProducer(connection_id, producer_id, encode_frame(
                {"op": "closed", "producer": producer_id, "reason": reason}), lost=lost))

    def _end_consumer(self, consumer_id, reason, detach):
        closing = self.closing.get(consumer_id)
        if closing is not None:
            # its close or unsubscribe was on its way to a subscription that ended it meanwhile
            # (and may be gone, the request with it): the consumer is closed, so that is the answer
            op = self.asked_at.get(closing, (0, "close_consumer"))[1]
            done = op == "close_consumer" or reason in ("unsubscribed", "topic_deleted")
            self._give_up(closing, "close_consumer" if done else op,   # (ok, or this error)
                          f"the subscription ended ({reason}) before the unsubscribe was done")
        connection_id = self._forget_consumer(consumer_id)
        conn = self.connections.get(connection_id)
        if conn is None:
            return False
        subscription_address = conn.consumers.pop(consumer_id, None)
        if detach and subscription_address is not None:
            self.send_ordered(subscription_address, subscription.DetachConsumer(consumer_id, None, None),
                              self._stream(subscription_address))
        self._stream_user_gone(subscription_address)
        if not conn.closed:
            self._to_shard(shard.UnrouteConsumer(connection_id, consumer_id, encode_frame(
                {"op": "closed", "consumer": consumer_id, "reason": reason}), reason=reason))
        return subscription_address is not None

    def _write(self, connection_id, data):
        self._to_shard(shard.Outbound(connection_id, data))

    def _to_shard(self, msg):
        # one ordered channel: replies, routes and pushes reach the client in the order sent
        self.send_ordered(self.shard, msg, "shard")


def _reattach_tag(tag):
    """The tag of a request this actor made itself to re-attach a producer or consumer."""
    return isinstance(tag, tuple) and len(tag) == 2 and isinstance(tag[1], tuple)
