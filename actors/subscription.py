"""SubscriptionActor: one per subscription; owns its membership (who is attached, under which
consumer name) and the rules of attaching: type, exclusivity, takeover by the same name.
The data path does not pass through it: it tells its Dispatcher who to deliver to."""
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from thespian.actors import ActorAddress

from actorbroker.actors import connection, dispatcher, topic
from actorbroker.actors.base import BrokerActor, log
from actorbroker.transport import errors as E


@dataclass(frozen=True)
class InitSubscription:
    topic: str
    name: str
    type: str
    dispatch: str
    dispatcher: Any
    incarnation: int = 0


@dataclass(frozen=True)
class SubscriptionReady:
    """To the topic: this subscription's actor took its InitSubscription (it runs)."""
    name: str
    incarnation: int


@dataclass(frozen=True)
class DetachConsumer:
    consumer_id: int
    rid: Any          # None when the connection ended
    reply_to: Any


@dataclass(frozen=True)
class Unsubscribe:
    consumer_id: int
    rid: int
    reply_to: Any


@dataclass(frozen=True)
class MembersLost:
    """From the dispatcher: these consumers' shard is gone; they are no longer attached."""
    consumer_ids: list


@dataclass(frozen=True)
class EndAll:
    reason: str


@dataclass(frozen=True)
class HolderProbed:
    """From the dispatcher: the shard of an exclusive holder has looked at its connection (and
    closed it if the client had hung up: its MembersLost came first, on the same channel)."""
    token: int


# An exclusive holder's shard answers a probe within a lane round trip; if it does not (the
# shard died meanwhile), the subscribe is decided on what is known then.
PROBE_TIMEOUT = timedelta(seconds=1)


class SubscriptionActor(BrokerActor):
    process_name = "ab-sub"
    init_message = InitSubscription

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.topic_name = self.name = self.type = self.dispatch = None
        self.topic = None
        self.dispatcher = None
        self.consumers = {}   # consumer id -> (consumer name, connection address)
        self.by_name = {}     # consumer name -> consumer id
        self.attaches = 0     # subscribes seen: lets the topic tell a stale "idle" apart
        self.probing = {}     # token -> (a Subscribe waiting for the exclusive holder's probe, that holder's id)
        self.next_token = 1
        self.ended = False    # unsubscribed or ended: a subscribe still on its way goes back to the topic
        self.topic_ending = False   # ended with its topic (EndAll): refused here, the topic is going

    def on_InitSubscription(self, msg, sender):
        self.topic = sender
        self.topic_name, self.name, self.type = msg.topic, msg.name, msg.type
        self.dispatch, self.dispatcher = msg.dispatch, msg.dispatcher
        self.send(sender, SubscriptionReady(msg.name, msg.incarnation))

    def on_Subscribe(self, msg, sender):
        self.attaches += 1
        self._subscribe(msg)

    def _subscribe(self, msg, probed=None):
        if self.ended:
            # This subscription is being deleted: attached now, the consumer would be left
            # without a `closed`, and its close_consumer unanswered. The topic handles it again
            # once it has dropped us (a new subscription of that name).
            self._subscribe_elsewhere(msg)
            return
        holder = next(iter(self.by_name), None)
        if self.type == "exclusive" and holder is not None and holder != msg.consumer_name:
            if probed != self.by_name[holder]:
                # The holder's client may have closed its socket already, its shard not having
                # read the EOF yet: a newcomer that saw that close must not be refused for it.
                # The holder's shard looks at the socket now, and ends it if it is hung up. (A
                # holder other than the one probed came meanwhile: it is probed in turn.)
                token, self.next_token = self.next_token, self.next_token + 1
                self.probing[token] = (msg, self.by_name[holder])
                self.send_ordered(self.dispatcher, dispatcher.ProbeHolder(token, self.by_name[holder]),
                                  "members")
                self.wakeupAfter(PROBE_TIMEOUT, payload=("probe", token))
                return
            self.send(msg.reply_to, connection.RequestFailed(
                msg.rid, E.CONSUMER_BUSY,
                f"exclusive subscription {self.name} already has consumer {holder!r}"))
            self._idle_check()
            return
        replaced = self.by_name.get(msg.consumer_name)
        if replaced is not None:
            # Same name again: a reconnect before we noticed the old connection die. Take over;
            # the dispatcher tells the old attachment (after its own `subscribed`, in order).
            self.consumers.pop(replaced)
            log.info("%s/%s: consumer %s replaces %s", self.topic_name, self.name, msg.new_id, replaced,
                     extra={"topic": self.topic_name, "subscription": self.name, "consumer": msg.new_id})
        self.consumers[msg.new_id] = (msg.consumer_name, msg.reply_to)
        self.by_name[msg.consumer_name] = msg.new_id
        self.send_ordered(self.dispatcher, dispatcher.AddConsumer(
            msg.new_id, msg.consumer_name, msg.transport, msg.reply_to, msg.rid, replaced,
            msg.options.get("max_unacked")), "members")

    def undeliverable(self, address, msgs):
        """Sent to our dispatcher, which had died (the topic ends us too): the subscribe or
        unsubscribe it carried is answered (send it again) instead of never."""
        for msg in msgs:
            request = msg.then_tell_topic if isinstance(msg, dispatcher.CloseAll) else msg
            if isinstance(msg, (dispatcher.AddConsumer, dispatcher.CloseAll)) and \
                    getattr(request, "rid", None) is not None and getattr(request, "reply_to", None) is not None:
                self.send(request.reply_to, connection.RequestLost(
                    request.rid, f"subscription {self.name} was lost before it answered"))

    def on_HolderProbed(self, msg, sender):
        waiting = self.probing.pop(msg.token, None)
        if waiting is None:
            return
        try:
            self._subscribe(waiting[0], probed=waiting[1])
        except Exception:   # a bug: the subscribe it resumes is answered now, not at its deadline
            log.exception("%s/%s: a subscribe resumed by its holder's probe failed", self.topic_name, self.name)
            self._base_failed(waiting[0], "the subscribe failed in the broker (logged)")

    def on_WakeupMessage(self, msg, sender):
        if isinstance(msg.payload, tuple) and msg.payload[0] == "probe":
            self.on_HolderProbed(HolderProbed(msg.payload[1]), sender)

    def on_DetachConsumer(self, msg, sender):
        # A connection's end reaches us twice: from the dispatcher (MembersLost, its lane's EOF)
        # and from the ConnectionActor (this): only the first removal can make us idle.
        removed = self._remove(msg.consumer_id, "connection_closed" if msg.rid is None else "closed")
        if (removed and not self.consumers and msg.rid is not None and self.dispatch == "non_reliable"
                and isinstance(self.dispatcher, ActorAddress)):
            self._idle_check(msg.rid, msg.reply_to)   # the topic answers, once it has dropped us
            return
        if msg.rid is not None:
            self.send(msg.reply_to, connection.RequestDone(msg.rid, {"op": "ok"}))
        if removed:
            self._idle_check()

    def on_MembersLost(self, msg, sender):
        removed = False
        for consumer_id in msg.consumer_ids:   # the dispatcher has dropped them already
            removed = self._remove(consumer_id, "connection_closed", tell_dispatcher=False) or removed
        if removed:
            self._idle_check()

    def on_Unsubscribe(self, msg, sender):
        if not isinstance(self.dispatcher, ActorAddress):   # nothing to pass it on through
            self._remove(msg.consumer_id, "unsubscribed")
            self.send(msg.reply_to, connection.RequestDone(msg.rid, {"op": "ok"}))
            return
        # One message to the dispatcher: the leaver removed on its own first would have its
        # unacknowledged messages redelivered to the others (and a failover standby promoted)
        # before they are closed. Answered by the topic once the subscription and cursor are gone.
        self._remove(msg.consumer_id, "unsubscribed", tell_dispatcher=False)
        self._end_all("unsubscribed", topic.RemoveSubscription(self.name, msg.rid, msg.reply_to),
                      quietly=(msg.consumer_id,))

    def on_EndAll(self, msg, sender):
        self.topic_ending = True
        self._end_all(msg.reason, topic.SubscriptionEnded(self.name))

    def _subscribe_elsewhere(self, msg):
        if self.topic_ending:
            # The topic may have ended before a SubscribeAgain reached it: answered here, as the
            # topic would have (seen: 1 subscribe in ~400 racing a delete_topic never answered)
            self.send(msg.reply_to, connection.RequestFailed(
                msg.rid, E.TOPIC_UNAVAILABLE, f"topic {self.topic_name} was deleted while this subscribe "
                                              "was on its way; send it again"))
        else:
            self.send(self.topic, topic.SubscribeAgain(msg))

    def _end_all(self, reason, then_tell_topic, quietly=()):
        self.ended = True
        self.consumers.clear()
        self.by_name.clear()
        for waiting, _ in self.probing.values():
            self._subscribe_elsewhere(waiting)
        self.probing.clear()
        self.send_ordered(self.dispatcher, dispatcher.CloseAll(reason, then_tell_topic, quietly), "members")

    def _remove(self, consumer_id, cause, tell_dispatcher=True):
        """Forget a consumer (and tell the dispatcher, unless it told us); whether it was still
        attached."""
        entry = self.consumers.pop(consumer_id, None)
        if entry is None:
            return False
        if self.by_name.get(entry[0]) == consumer_id:
            del self.by_name[entry[0]]
        if tell_dispatcher:
            self.send_ordered(self.dispatcher, dispatcher.RemoveConsumer(consumer_id, cause), "members")
        return True

    def _idle_check(self, rid=None, reply_to=None):
        if self.probing:   # a subscribe waiting for a probe may attach: not idle (checked again after)
            if rid is not None:
                self.send(reply_to, connection.RequestDone(rid, {"op": "ok"}))
            return
        if not self.consumers:
            # through the dispatcher, after the removals on the same channel: the topic may end
            # the dispatcher as soon as it hears, and the removals must have been handled by then
            self.send_ordered(self.dispatcher, topic.SubscriptionIdle(self.name, self.attaches, rid, reply_to),
                              "members")
