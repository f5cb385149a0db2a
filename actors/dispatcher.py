"""DispatcherActor: one per subscription; the data side of it.

It holds the subscription's backlog and its consumers' credits (through the policy of the
subscription's type) and pushes batches straight to each consumer's TcpTransportActor. At most
DELIVER_WINDOW batches are in flight to one transport; the transport acks each once it has
buffered it, so a slow client holds messages here, in the bounded backlog, not in Thespian's queue.
"""
from dataclasses import dataclass
from typing import Any

from actors import connection, topic
from actors.base import BrokerActor
from actors.policies import ConsumerState, make_policy
from transport.messages import Deliver


@dataclass(frozen=True)
class InitDispatcher:
    topic: str
    name: str
    type: str
    dispatch: str
    config: Any


@dataclass(frozen=True)
class Dispatch:
    """New records from the topic."""
    records: list


@dataclass(frozen=True)
class AddConsumer:
    consumer_id: int
    name: str
    transport: Any
    reply_to: Any     # the ConnectionActor, told ConsumerOpened
    rid: int
    replaces: Any     # consumer id taken over, or None


@dataclass(frozen=True)
class RemoveConsumer:
    consumer_id: int


@dataclass(frozen=True)
class CloseAll:
    """Tell every consumer it is closed for `reason`, then send `then_tell_topic` to the topic."""
    reason: str
    then_tell_topic: Any


@dataclass(frozen=True)
class Flow:
    consumer_id: int
    credits: int


@dataclass(frozen=True)
class Ack:
    consumer_id: int
    ids: list


@dataclass(frozen=True)
class Nack:
    consumer_id: int
    ids: list
    delay_ms: int


@dataclass(frozen=True)
class DeliverAck:
    consumer_id: int


@dataclass(frozen=True)
class DispatcherStatsRequest:
    token: int
    topic_pending: int   # records the topic holds for us, not sent yet


class DispatcherActor(BrokerActor):
    init_message = InitDispatcher

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.topic = None
        self.name = self.type = self.dispatch = None
        self.policy = None
        self.msgs_out = 0
        self.dropped = 0

    def on_InitDispatcher(self, msg, sender):
        self.topic = sender
        self.name, self.type, self.dispatch = msg.name, msg.type, msg.dispatch
        self.policy = make_policy(msg.type, msg.config.max_backlog)

    def on_Dispatch(self, msg, sender):
        self.policy.enqueue(msg.records)
        self.send(sender, topic.DispatchAck(self.name))
        self._pump()
        self.dropped += self.policy.trim()  # non_reliable: what no credit can take, within bounds

    # --- membership, told by the SubscriptionActor -----------------------------------------------
    def on_AddConsumer(self, msg, sender):
        before = self._active_flags()
        if msg.replaces is not None:
            self._close(msg.replaces, "replaced")
        self.policy.add(ConsumerState(msg.consumer_id, msg.name, msg.transport, msg.reply_to))
        # Opened and every later ActiveChanged of a consumer share one ordered channel, so the
        # client sees `subscribed` and the initial `active` before any change of it.
        self.send_ordered(msg.reply_to, connection.ConsumerOpened(
            msg.rid, msg.consumer_id, sender, self.myAddress, self.dispatch,
            self.policy.is_active(msg.consumer_id)), ("consumer", msg.consumer_id))
        self._announce_active(before, skip=msg.consumer_id)
        self._pump()

    def on_RemoveConsumer(self, msg, sender):
        before = self._active_flags()
        self._forget(msg.consumer_id)
        self._announce_active(before)
        self._pump()

    def on_CloseAll(self, msg, sender):
        for consumer_id in list(self.policy.consumers):
            self._close(consumer_id, msg.reason)
        self.send(self.topic, msg.then_tell_topic)

    def _close(self, consumer_id, reason):
        consumer = self.policy.consumers.get(consumer_id)
        if consumer is not None:
            self.send_ordered(consumer.owner, connection.ConsumerEnded(consumer_id, reason),
                              ("consumer", consumer_id))
            self._forget(consumer_id)

    def _forget(self, consumer_id):
        consumer = self.policy.remove(consumer_id)
        if consumer is not None:
            self.forget_ordered(consumer_id)
            self.forget_ordered(("consumer", consumer_id))

    def _active_flags(self):
        return {cid: self.policy.is_active(cid) for cid in self.policy.consumers}

    def _announce_active(self, before, skip=None):
        """Failover: push `active` to every consumer whose state changed."""
        for consumer in self.policy.consumers.values():
            now = self.policy.is_active(consumer.id)
            if now is None or consumer.id == skip or before.get(consumer.id) == now:
                continue
            self.send_ordered(consumer.owner, connection.ActiveChanged(consumer.id, now),
                              ("consumer", consumer.id))

    # --- from the consumers' transports ---------------------------------------------------------
    def on_Flow(self, msg, sender):
        consumer = self.policy.consumers.get(msg.consumer_id)
        if consumer is not None:
            consumer.credits += msg.credits
            self._pump()

    def on_Ack(self, msg, sender):
        pass  # non_reliable: nothing is kept for redelivery, so there is nothing to release

    def on_Nack(self, msg, sender):
        pass  # non_reliable: nothing is redelivered

    def on_DeliverAck(self, msg, sender):
        consumer = self.policy.consumers.get(msg.consumer_id)
        if consumer is not None:
            consumer.in_flight -= 1
            self._pump()

    def _pump(self):
        for consumer, records in self.policy.take():
            consumer.in_flight += 1
            consumer.msgs_out += len(records)
            self.msgs_out += len(records)
            self.send_ordered(consumer.transport, Deliver(consumer.id, [blob for _, _, blob in records]),
                              stream=consumer.id)

    # --- stats ----------------------------------------------------------------------------------
    def on_DispatcherStatsRequest(self, msg, sender):
        consumers = [{"consumer": c.id, "name": c.name,
                      "active": self.policy.is_active(c.id) is not False,
                      "credits": c.credits, "unacked": 0, "msgs_out": c.msgs_out}
                     for c in self.policy.consumers.values()]
        self.send(sender, topic.DispatcherStats(msg.token, {
            "name": self.name, "type": self.type,
            "backlog": self.policy.backlog_size() + msg.topic_pending,
            "msgs_out": self.msgs_out, "dropped": self.dropped, "redelivered": 0,
            "consumers": consumers}))
