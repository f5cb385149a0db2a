"""ConnectionActor: one per client connection; the design card's ConsumerConnection.

It supervises the connection's TcpTransportActor, handles control and admin ops, and holds the
connection's producers and consumers. When the transport reports the socket's end (a
ConnectionClosed message, or the ChildActorExited Thespian sends when it exits, often twice) it
detaches every producer and consumer at once, by messages: no flag, no lock, no second packet.
"""
import os
from dataclasses import dataclass
from datetime import timedelta
from fnmatch import fnmatchcase
from typing import Any

from actorbroker.actors import broker, subscription, topic
from actorbroker.actors.base import BrokerActor, log
from actorbroker.actors.config import DISPATCH_MODES
from actorbroker.transport import errors as E
from actorbroker.transport.codec import encode_frame
from actorbroker.transport.messages import (
    AdoptSocket, Outbound, RouteConsumer, RouteProducer, UnrouteConsumer, UnrouteProducer)
from actorbroker.transport.tcp_actor import error_frame, is_uint

SUBSCRIPTION_TYPES = ("exclusive", "shared", "failover", "key_shared")
SUBSCRIPTION_NAME_MAX = 255
DRAIN_TIMEOUT = timedelta(seconds=30)


@dataclass(frozen=True)
class StartConnection:
    fd: int
    listen_fd: int
    connection_id: int
    config: Any
    broker: Any


@dataclass(frozen=True)
class ProducerOpened:
    rid: int
    producer_id: int
    topic: str
    topic_address: Any
    dispatch: str
    name: str


@dataclass(frozen=True)
class ConsumerOpened:
    rid: int
    consumer_id: int
    subscription: Any   # SubscriptionActor address
    dispatcher: Any     # DispatcherActor address
    dispatch: str
    active: Any         # bool for failover subscriptions, else None


@dataclass(frozen=True)
class ActiveChanged:
    """Failover: this consumer became the active one, or stopped being it."""
    consumer_id: int
    active: bool


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
class ProducerEnded:
    producer_id: int
    reason: str


@dataclass(frozen=True)
class ConsumerEnded:
    consumer_id: int
    reason: str


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


class ConnectionActor(BrokerActor):
    process_name = "ab-conn"
    init_message = StartConnection

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.config = None
        self.broker = None
        self.transport = None
        self.connection_id = None
        self.permissions = None
        self.producers = {}    # producer id -> topic address
        self.consumers = {}    # consumer id -> subscription address
        self.pending = set()   # rids of open/subscribe requests not answered yet
        self.closed = False
        self.transport_exited = False

    # --- set-up ---------------------------------------------------------------------------------
    def on_StartConnection(self, msg, sender):
        self.config = msg.config
        self.broker = msg.broker
        self.connection_id = msg.connection_id
        os.close(msg.listen_fd)  # inherited from the listener's fork; not ours
        self.transport = self.createActor("actorbroker.transport.tcp_actor.TcpTransportActor")
        self._to_transport(AdoptSocket(msg.fd, msg.connection_id, msg.config))
        os.close(msg.fd)         # the transport's fork has its own copy now

    def on_ClientHello(self, msg, sender):
        self.permissions = msg.permissions

    # --- the end of the connection is the cleanup signal -----------------------------------------
    def on_ConnectionClosed(self, msg, sender):
        self._cleanup(msg.reason)

    def on_ChildActorExited(self, msg, sender):
        if msg.childAddress == self.transport:
            self.transport_exited = True
            self._cleanup("transport exited")
            self._exit_when_drained()

    def _cleanup(self, reason):
        if self.closed:
            return
        self.closed = True
        for producer_id, topic_address in self.producers.items():
            self.send(topic_address, topic.CloseProducer(producer_id, None, None))
        for consumer_id, subscription_address in self.consumers.items():
            self.send(subscription_address, subscription.DetachConsumer(consumer_id, None, None))
        log.info("connection %s: cleaned up %d producers, %d consumers (%s)", self.connection_id,
                 len(self.producers), len(self.consumers), reason)
        self.producers.clear()
        self.consumers.clear()
        self.wakeupAfter(DRAIN_TIMEOUT)
        self._exit_when_drained()

    def _exit_when_drained(self):
        # Stay while an open request is in flight (it may yet attach a consumer, to detach at
        # once) and while the transport lingers to deliver its last frames.
        if self.closed and not self.pending and self.transport_exited:
            self.exit_self()

    def on_WakeupMessage(self, msg, sender):
        if self.closed:
            self.exit_self()

    # --- control and admin requests ---------------------------------------------------------------
    def on_ClientRequest(self, msg, sender):
        frame = msg.frame
        rid = frame["rid"]
        if self.closed:
            return
        try:
            getattr(self, "_op_" + frame["op"])(frame, rid)
        except BadRequest as exc:
            self._reply(error_frame(exc.code, exc.message, rid))
        except Exception:
            log.exception("connection %s: op %r failed", self.connection_id, frame.get("op"))
            self._reply(error_frame(E.INTERNAL, "internal error (logged on the broker)", rid))

    def _op_producer(self, frame, rid):
        name = self._topic(frame, "produce")
        producer_name = self._optional(frame, "name", str)
        dispatch = self._choice(frame, "dispatch", DISPATCH_MODES)
        access = self._choice(frame, "access", ("shared", "exclusive")) or "shared"
        self.pending.add(rid)
        self.send(self.broker, broker.TopicRequest(
            name, dispatch or self.config.default_dispatch,
            topic.OpenProducer(rid, self.myAddress, 0, producer_name, access)))

    def _op_close_producer(self, frame, rid):
        producer_id = self._known(frame, "producer", self.producers, E.UNKNOWN_PRODUCER)
        topic_address = self.producers.pop(producer_id)
        self.send(topic_address, topic.CloseProducer(producer_id, rid, self.myAddress))

    def _op_subscribe(self, frame, rid):
        name = self._topic(frame, "consume")
        sub_name = frame.get("subscription")
        if not isinstance(sub_name, str) or not sub_name or len(sub_name) > SUBSCRIPTION_NAME_MAX:
            raise BadRequest(E.BAD_REQUEST, "'subscription' must be a non-empty str")
        sub_type = self._choice(frame, "type", SUBSCRIPTION_TYPES)
        if sub_type is None:
            raise BadRequest(E.BAD_REQUEST, f"'type' must be one of {', '.join(SUBSCRIPTION_TYPES)}")
        consumer_name = frame.get("consumer")
        if not isinstance(consumer_name, str) or not consumer_name:
            raise BadRequest(E.BAD_REQUEST, "'consumer' must be a non-empty str")
        start = self._choice(frame, "start", ("latest", "earliest")) or "latest"
        dispatch = self._choice(frame, "dispatch", DISPATCH_MODES)
        options = {}
        for field in ("max_unacked", "ack_timeout_ms", "max_redeliveries"):
            value = frame.get(field)
            if value is not None and not is_uint(value):
                raise BadRequest(E.BAD_REQUEST, f"'{field}' must be an int >= 0")
            options[field] = value
        dead_letter = frame.get("dead_letter_topic")
        if dead_letter is not None and not isinstance(dead_letter, str):
            raise BadRequest(E.BAD_REQUEST, "'dead_letter_topic' must be a str")
        if dead_letter is not None and not broker.valid_topic(dead_letter):
            raise BadRequest(E.BAD_TOPIC, f"bad dead_letter_topic {dead_letter!r}")
        options["dead_letter_topic"] = dead_letter
        self.pending.add(rid)
        self.send(self.broker, broker.TopicRequest(
            name, dispatch or self.config.default_dispatch,
            topic.Subscribe(rid, self.myAddress, self.transport, 0, sub_name, sub_type,
                            consumer_name, start, options)))

    def _op_close_consumer(self, frame, rid):
        consumer_id = self._known(frame, "consumer", self.consumers, E.UNKNOWN_CONSUMER)
        self.send(self.consumers.pop(consumer_id),
                  subscription.DetachConsumer(consumer_id, rid, self.myAddress))

    def _op_unsubscribe(self, frame, rid):
        consumer_id = self._known(frame, "consumer", self.consumers, E.UNKNOWN_CONSUMER)
        self.send(self.consumers.pop(consumer_id),
                  subscription.Unsubscribe(consumer_id, rid, self.myAddress))

    def _op_topics(self, frame, rid):
        self._require_admin()
        self.send(self.broker, broker.ListTopics(rid, self.myAddress))

    def _op_stats(self, frame, rid):
        self._require_admin()
        name = self._topic(frame, None)
        self.send(self.broker, broker.TopicRequest(name, None, topic.StatsRequest(rid, self.myAddress)))

    def _op_delete_topic(self, frame, rid):
        self._require_admin()
        name = self._topic(frame, None)
        self.send(self.broker, broker.DeleteTopic(rid, name, self.myAddress))

    # --- field checks -----------------------------------------------------------------------------
    def _topic(self, frame, action):
        name = frame.get("topic")
        if not isinstance(name, str):
            raise BadRequest(E.BAD_REQUEST, "'topic' must be a str")
        if not broker.valid_topic(name):
            raise BadRequest(E.BAD_TOPIC, f"bad topic name {name!r}: expected /namespace/name")
        if action and not allowed(self.permissions, action, name):
            raise BadRequest(E.NOT_AUTHORIZED, f"token may not {action} on {name}")
        return name

    def _require_admin(self):
        if not allowed(self.permissions, "admin", ""):
            raise BadRequest(E.NOT_AUTHORIZED, "admin permission needed")

    @staticmethod
    def _optional(frame, field, kind):
        value = frame.get(field)
        if value is not None and not isinstance(value, kind):
            raise BadRequest(E.BAD_REQUEST, f"'{field}' must be a {kind.__name__}")
        return value

    @staticmethod
    def _choice(frame, field, choices):
        value = frame.get(field)
        if value is not None and value not in choices:
            raise BadRequest(E.BAD_REQUEST, f"'{field}' must be one of {', '.join(choices)}")
        return value

    @staticmethod
    def _known(frame, field, table, code):
        value = frame.get(field)
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadRequest(E.BAD_REQUEST, f"'{field}' must be an int")
        if value not in table:
            raise BadRequest(code, f"{field} {value} is not open on this connection")
        return value

    # --- answers from the broker's actors ---------------------------------------------------------
    def on_ProducerOpened(self, msg, sender):
        self.pending.discard(msg.rid)
        if self.closed:  # the client left while this was in flight
            self.send(msg.topic_address, topic.CloseProducer(msg.producer_id, None, None))
            self._exit_when_drained()
            return
        self.producers[msg.producer_id] = msg.topic_address
        self._to_transport(RouteProducer(
            msg.producer_id, msg.topic_address, msg.name,
            encode_frame({"op": "producer_ok", "rid": msg.rid, "producer": msg.producer_id,
                          "topic": msg.topic, "dispatch": msg.dispatch})))

    def on_ConsumerOpened(self, msg, sender):
        self.pending.discard(msg.rid)
        if self.closed:
            self.send(msg.subscription, subscription.DetachConsumer(msg.consumer_id, None, None))
            self._exit_when_drained()
            return
        self.consumers[msg.consumer_id] = msg.subscription
        data = encode_frame({"op": "subscribed", "rid": msg.rid, "consumer": msg.consumer_id,
                             "dispatch": msg.dispatch})
        if msg.active is not None:
            data += encode_frame({"op": "active", "consumer": msg.consumer_id, "active": msg.active})
        self._to_transport(RouteConsumer(msg.consumer_id, msg.dispatcher, data))

    def on_ActiveChanged(self, msg, sender):
        if msg.consumer_id in self.consumers and not self.closed:
            self._reply(encode_frame({"op": "active", "consumer": msg.consumer_id, "active": msg.active}))

    def on_RequestDone(self, msg, sender):
        self.pending.discard(msg.rid)
        if not self.closed:
            self._reply(encode_frame(msg.frame))
        self._exit_when_drained()

    def on_RequestFailed(self, msg, sender):
        self.pending.discard(msg.rid)
        if not self.closed:
            self._reply(error_frame(msg.code, msg.message, msg.rid))
        self._exit_when_drained()

    def on_ProducerEnded(self, msg, sender):
        if self.producers.pop(msg.producer_id, None) is not None and not self.closed:
            self._to_transport(UnrouteProducer(msg.producer_id, encode_frame(
                {"op": "closed", "producer": msg.producer_id, "reason": msg.reason})))

    def on_ConsumerEnded(self, msg, sender):
        if self.consumers.pop(msg.consumer_id, None) is not None and not self.closed:
            self._to_transport(UnrouteConsumer(msg.consumer_id, encode_frame(
                {"op": "closed", "consumer": msg.consumer_id, "reason": msg.reason})))

    def _reply(self, data):
        self._to_transport(Outbound(data))

    def _to_transport(self, msg):
        # one ordered channel: replies, routes and pushes reach the client in the order sent
        self.send_ordered(self.transport, msg, "connection")
