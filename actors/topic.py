"""TopicActor: one per topic. Numbers the messages, answers receipts, fans batches out to the
Dispatcher of every subscription, and owns the topic's producers and subscriptions.

On a reliable topic, a LogActor child owns the log on disk: sends are appended (all those that
arrive while an append is in flight go together: group commit), receipts go out and records are
fanned out only once the append is durable.

Records travel over lanes (transport/lanes.py), not as Thespian messages: producers' shards
connect to the topic's lane address and send PUBLISH frames, receipts go back on the same lane;
the topic connects to each dispatcher's lane and sends it DISPATCH frames. Fan-out is windowed:
at most DISPATCH_WINDOW batches are in flight to a dispatcher; what arrives meanwhile is merged
into the next batch (adaptive batching).

Supervision (restart rules): a dead LogActor is restarted at once (sends not yet receipted are
refused with INTERNAL, recovery runs, nothing receipted is lost); a dead Subscription or
Dispatcher takes its partner with it, its consumers get `closed` (`subscription_lost`), and a
reliable subscription is restarted from its durable cursor. A lane's EOF counts as a death.
A log that cannot be opened (disk full, a file not writable: LogOpenFailed) leaves the topic up,
refusing what needs the log with the cause (OVERLOADED when the disk refused); the next request
or send that needs it tries the open again (one try in flight at a time), so the topic works
again once the cause is gone, without a restart.
"""
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from thespian.actors import ActorExitRequest, ActorSystemMessage, ThespianWatch

from actorbroker.actors import broker, cluster, connection, dispatcher, log as log_actor, signing, subscription
from actorbroker.actors.base import BrokerActor, log
from actorbroker.actors.lifecycle import emit
from actorbroker.actors.reporting import ForgetSeries
from actorbroker.actors.starting import Starting
from actorbroker.actors.system import thespian_waits
from actorbroker.transport import errors as E
from actorbroker.transport.codec import RUN_COUNT, RUN_PAYLOADS, RUN_TIME
from actorbroker.transport.lanes import RECORD_PATH_LINGER_S, LaneHub, LaneOp, Reactor

DISPATCH_WINDOW = 1
# What waits for a dispatcher that has not taken the last DISPATCH yet is bounded, or a producer
# faster than it filled the topic's memory and then a lane frame too large for the lane (95 MB).
# non_reliable: the newest beyond the subscription's backlog bound are dropped (counted, as
# PROTOCOL.md says); reliable: the oldest leave memory, the dispatcher reads them from the log.
PENDING_FLOOR = 1024                 # records, whatever --max-backlog (the dispatcher trims to it)
PENDING_MAX_BYTES = 16 * 1024 * 1024 # and a DISPATCH frame stays well below MAX_LANE_FRAME
APPEND_MAX_BYTES = 16 * 1024 * 1024  # an APPEND (group commit) too, and the batch it stores
PRODUCER_NAME_MAX_BYTES = 255   # the name is copied into every record: it must not amplify a send
GATHER_TIMEOUT = timedelta(seconds=5)
# Subscribes passed on to a subscription are remembered this long (see _Sub.forwarded); when it
# dies, those it had (not coming back as undeliverable within LOST_ANSWER_AFTER) are answered
FORWARDED_MEMORY_S = 10.0
LOST_ANSWER_AFTER = timedelta(milliseconds=500)
# Producers opened this long ago are checked for a live ConnectionActor (_check_producers)
PRODUCER_CHECK_AFTER = timedelta(seconds=2)
# A new subscription's two actors say they run (SubscriptionReady, DispatcherReady) within this,
# or the pair is handled as lost (restarted if reliable): generous, as process starts take seconds
# on a loaded machine.
PAIR_START_DEADLINE = timedelta(seconds=10)


@dataclass(frozen=True)
class InitTopic:
    name: str
    dispatch: str
    config: Any
    # a reliable topic in a shared folder: the nodes the root sees live, or None (open the log
    # only if this node holds it); see storage/fencing.py
    live: Any = None
    incarnation: str = ""


@dataclass(frozen=True)
class TopicMoved:
    """To the root: another node holds this reliable topic's log (`owner`); this actor refuses
    every request and waits to be stopped."""
    name: str
    owner: str


@dataclass(frozen=True)
class OpenProducer:
    rid: Any
    reply_to: Any
    new_id: int          # 0 until the broker assigns it
    name: Any
    access: str
    shard: str           # ident of the shard whose lane will carry its sends


@dataclass(frozen=True)
class CloseProducer:
    producer_id: int
    rid: Any             # None when the connection ended: no answer wanted
    reply_to: Any


@dataclass(frozen=True)
class Publish:
    """Sends not from a client (dead letters): [[rid, count, payloads, keys, attrs, payload bytes]]
    (the fields of a run: transport/codec.py). Clients' sends come over lanes. With `reply_to`,
    it is told `dispatcher.DeadLettered(token, ok)` once they are receipted (durable) or refused."""
    producer_id: int
    producer_name: str
    sends: list
    reply_to: Any = None
    token: Any = None


class _PublishReply:
    """Where a lane would be in the receipt path of a Publish with a `reply_to`: its receipt or
    refusal goes to that actor as a Thespian message."""
    closed = False

    def __init__(self, actor, address, token):
        self.actor, self.address, self.token = actor, address, token

    def send(self, frame):   # [RECEIPTS, producer id, receipts, errors]
        self.actor.send(self.address, dispatcher.DeadLettered(self.token, bool(frame[2]) and not frame[3]))


@dataclass(frozen=True)
class Subscribe:
    rid: Any
    reply_to: Any        # the ConnectionActor
    transport: str       # ident of its shard: deliveries go over that shard's lane
    new_id: int
    subscription: str
    type: str
    consumer_name: str
    start: str
    options: dict


def _run_size(run):
    """About the bytes a run takes in memory and in a DISPATCH frame."""
    return len(run[RUN_PAYLOADS]) + 16 * run[RUN_COUNT]


@dataclass(frozen=True)
class SubscribeAgain:
    """From a SubscriptionActor being deleted: a subscribe that reached it too late, to handle
    again once that subscription is dropped."""
    subscribe: Any


@dataclass(frozen=True)
class SubscriptionIdle:
    """The subscription's last consumer left after it had seen `attaches` subscribes. When that
    was a close_consumer (`rid`), its `ok` is ours to send, once the subscription is dropped: a
    client that closed the last consumer of a non_reliable subscription then finds it gone."""
    name: str
    attaches: int
    rid: Any = None
    reply_to: Any = None


@dataclass(frozen=True)
class RemoveSubscription:
    """Unsubscribed: drop it, then answer the unsubscribe (`rid`), if any."""
    name: str
    rid: Any = None
    reply_to: Any = None


@dataclass(frozen=True)
class StatsRequest:
    rid: int
    reply_to: Any


@dataclass(frozen=True)
class SummaryRequest:
    token: int


@dataclass(frozen=True)
class DeleteTopic:
    rid: int
    reply_to: Any
    # TOPIC_MOVED: a fenced cluster node ends its copy, which lives on elsewhere; the producers
    # and consumers are told so, and their ConnectionActors attach them to the topic's new copy
    reason: str = "topic_deleted"


TOPIC_MOVED = "topic_moved"


@dataclass(frozen=True)
class SubscriptionEnded:
    name: str


@dataclass(frozen=True)
class DispatcherReady:
    """A new dispatcher accepts lanes at `lane`."""
    subscription: str
    incarnation: int
    lane: Any




@dataclass(frozen=True)
class DispatcherStats:
    token: int
    stats: dict


@dataclass(frozen=True)
class FlushCursors:
    """From the root while the broker stops cleanly: every subscription's cursor to disk now
    (dispatcher.FlushCursor); answered CursorsFlushed, at the latest after GATHER_TIMEOUT."""
    token: int


@dataclass(frozen=True)
class CursorsFlushed:
    token: int


@dataclass
class _Sub:
    """The topic's view of one subscription."""
    type: str
    subscription: Any
    dispatcher: Any
    attaches: int = 0
    pending: list = field(default_factory=list)   # records not yet sent to the dispatcher
    pending_count: int = 0   # records in `pending`
    pending_bytes: int = 0   # their payloads, about
    dropped: int = 0         # non_reliable: dropped here since the last DISPATCH (it counts them)
    in_flight: int = 0
    lane: Any = None     # our lane to the dispatcher, once it is ready
    ready: bool = False  # its subscription actor said it runs (SubscriptionReady)
    incarnation: int = 0 # tells a restarted pair's messages from its predecessor's
    last_stats: Any = None   # its dispatcher's last stats answer
    # (time.monotonic(), Subscribe) passed on to it within FORWARDED_MEMORY_S: if it dies, those
    # not answered yet are answered (see _subscription_lost)
    forwarded: deque = field(default_factory=deque)


class TopicActor(BrokerActor):
    process_name = "ab-topic"
    init_message = InitTopic

    def operability_children(self):
        return [sub.dispatcher for sub in self.subs.values()]

    def known_children(self):
        return [self.log] + [a for sub in self.subs.values() for a in (sub.subscription, sub.dispatcher)]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.name = None
        self.dispatch = None
        self.config = None
        self.next_offset = 0
        self.msgs_in = 0
        self.bytes_in = 0
        self.refused_dead_letters = 0   # non_reliable: dead letters refused (on_Publish)
        self.producers = {}        # id -> (name, access, connection address, shard ident)
        self.subs = {}             # name -> _Sub
        self.stats_gathers = {}    # token -> [rid, reply_to, frame, names not answered yet]
        self.flushes = {}          # our token -> [asker, its token, dispatchers still saving]
        self.next_token = 1
        self.deleting = None       # (rid, reply_to, subscriptions still ending)
        self.broker = None
        self.reactor = Reactor(linger=RECORD_PATH_LINGER_S)
        self.hub = None
        self.lane_address = None
        # reliable topics
        self.log = None
        self.log_lane = None       # appends go over it
        self.log_address = None    # where it accepts lanes (the dispatchers read through it)
        self.log_ready = False
        self.log_failed = None     # (code, text): the log's last open failed (LogOpenFailed)
        self.log_opening = False   # an OpenLog is waiting for its answer
        self.awaiting_log = []     # [(request, sender)] waiting for that answer (log_failed set)
        self.awaiting_sends = []   # [(lane, producer id, producer name, sends, receipts)] likewise
        self.first_offset = 0
        self.unsynced = []         # [(lane, producer id, receipts, runs)] not appended yet
        self.appending = {}        # seq -> (those same tuples, first offset, time)
        self.append_seq = 0
        self.log_bytes = 0
        self.retention_forced = 0   # times retention deleted what a subscription still needed
        self.segments = 0
        self.truncated_bytes = 0
        self.corrupt = (0, 0)           # corrupt batches skipped in the log, and their bytes
        self.restoring = {}        # subscription name -> type, while its cursor is being loaded
        self.waiting_restore = {}  # subscription name -> [(Subscribe, sender)] that came meanwhile
        self.waiting_removal = {}  # subscription name -> [Subscribe] handed back by its ending actor
        self.ending = False        # deleted or stopping: children that exit are not restarted
        self.moved_to = None       # the node holding the log, when another does (TopicMoved)
        self.claim_live = None
        self.incarnation = ""
        self.incarnations = 0      # subscription pairs created so far
        self.starting = Starting()   # subscription name -> incarnation: its dispatcher not ready yet
        self.producer_checks = {}  # ConnectionActor address (str) -> (address, [producer ids opened])
        self.lost_requests = []    # [(subscription name, Subscribe)] passed to one that died since
        self.rehandled = {}        # id -> Subscribe: of those, the ones that came back undelivered

    def watch(self):
        return ThespianWatch([self.reactor.fileno()]) if self.hub is not None else None

    def on_InitTopic(self, msg, sender):
        self.name, self.dispatch, self.config = msg.name, msg.dispatch, msg.config
        self.claim_live, self.incarnation = msg.live, msg.incarnation
        self.broker = sender
        self.hub = LaneHub(self.reactor, self._lane_frame, self._lane_closed,
                           kind=self.config.lanes, host=self.config.actor_host,
                           secret=signing.lane_secret())
        self.lane_address = self.hub.listen()
        self.start_reports(self.config.metrics)
        log.info("topic %s open (%s)", self.name, self.dispatch, extra={"topic": self.name})
        if self.dispatch == "reliable":
            self._start_log()
            self.hold_until((log_actor.LogOpened, log_actor.LogFenced, log_actor.LogOpenFailed))

    def _start_log(self, restart=False):
        self.log_ready = False
        self.log_lane = None
        self.log = self.createActor("actorbroker.actors.log.LogActor")
        self.forget_ordered("log", end=False)   # (the log before is gone)
        self._open_log(restart)

    def _open_log(self, restart):
        self.log_opening = True
        claim = None
        if self.config.shared_data:   # a restarted log reopens only what this node still holds
            claim = (self.config.node, self.incarnation, None if restart else self.claim_live)
        self.send_ordered(self.log, log_actor.OpenLog(self.name, self.dispatch, self.config, claim), "log")

    def on_LogOpenFailed(self, msg, sender):
        """The log could not be opened (the LogActor logged why): what waited for it is refused
        with the cause; the next request or send that needs the log tries again (_await_log)."""
        if sender != self.log:
            return
        self.log_opening = False
        self.log_failed = (msg.code, f"topic {self.name}: its log cannot be opened: {msg.error}")
        self._refuse_awaiting()

    def _refuse_awaiting(self):
        waiting, self.awaiting_log = self.awaiting_log, []
        for request, _ in waiting:
            self._refuse_request(request)
        sends, self.awaiting_sends = self.awaiting_sends, []
        for lane, producer_id, _, _, receipts in sends:
            self._refuse(lane, producer_id, receipts, self.log_failed[1], self.log_failed[0])

    def _refuse_request(self, request):
        self.send(request.reply_to, connection.RequestFailed(request.rid, *self.log_failed))

    def _await_log(self, msg, sender):
        """A request that needs the log while it cannot be opened: it waits for another try
        (True), answered by on_LogOpened or on_LogOpenFailed."""
        if self.log_failed is None or self.log is None:
            return False
        self.awaiting_log.append((msg, sender))
        if not self.log_opening:
            self._open_log(restart=self.log_ready is None)
        return True

    def on_LogRetained(self, msg, sender):
        if sender == self.log:
            self.log_bytes, self.segments, self.retention_forced = msg.log_bytes, msg.segments, msg.forced_deletions
            self.corrupt = (msg.corrupt_batches, msg.corrupt_bytes)

    def on_LogFenced(self, msg, sender):
        """Another node holds the log: refuse everything from now on (storage/fencing.py)."""
        if self.moved_to is not None:
            return
        self.moved_to = msg.owner
        log.warning("topic %s: its log is held by node %s: not served here", self.name, msg.owner,
                    extra={"topic": self.name})
        for entry, _, _ in self.appending.values():
            for lane, producer_id, receipts, _ in entry:
                self._refuse(lane, producer_id, receipts, self._moved_text(), E.TOPIC_UNAVAILABLE)
        for lane, producer_id, receipts, _ in self.unsynced:
            self._refuse(lane, producer_id, receipts, self._moved_text(), E.TOPIC_UNAVAILABLE)
        self.appending, self.unsynced = {}, []
        self.log_ready = False
        self.send(self.broker, TopicMoved(self.name, msg.owner))

    def _moved_text(self):
        return f"topic {self.name} is held by node {self.moved_to or '?'}; send it again"

    def _base_handle(self, msg, sender):
        if self.moved_to is None or isinstance(msg, ActorSystemMessage):
            super()._base_handle(msg, sender)
            return
        rid, reply_to = getattr(msg, "rid", None), getattr(msg, "reply_to", None)
        if rid is not None and reply_to is not None:   # a request that reached a moved topic
            self.send(reply_to, connection.RequestFailed(rid, E.TOPIC_UNAVAILABLE, self._moved_text()))

    def on_LogOpened(self, msg, sender):
        self.next_offset, self.first_offset = msg.next_offset, msg.first_offset
        self.log_bytes, self.segments = msg.log_bytes, msg.segments
        self.truncated_bytes = msg.truncated_bytes
        self.corrupt = (msg.corrupt_batches, msg.corrupt_bytes)
        restart = self.log_ready is None
        self.log_address = msg.lane
        self.log_opening = False
        try:
            self.log_lane = self.hub.connect(msg.lane, peer=("log",))
        except OSError:   # it died already: ChildActorExited restarts it again
            return
        self.log_ready = True
        failed, self.log_failed = self.log_failed, None
        if failed is not None:
            log.warning("topic %s: log opened (it could not be before)", self.name,
                        extra={"topic": self.name})
            for name in self.restoring:   # their cursors could not be loaded then
                self.send_ordered(self.log, log_actor.LoadCursor(name), "log")
        if restart:   # a restarted log: the dispatchers read and save through the new one
            for name, sub in self.subs.items():
                self.send_ordered(sub.dispatcher, dispatcher.LogMoved(self.log, self.log_address, self.next_offset),
                                  ("dispatcher", name))
            log.warning("topic %s: log restarted, ends at offset %d", self.name, self.next_offset,
                        extra={"topic": self.name})
        else:
            for name, state in msg.cursors.items():   # durable subscriptions outlive restarts
                self._create_subscription(name, state.get("type", "exclusive"), state, "latest",
                                          state.get("options") or {})
            log.info("topic %s: log ends at offset %d, %d subscriptions restored",
                     self.name, self.next_offset, len(msg.cursors), extra={"topic": self.name})
        waiting, self.awaiting_log = self.awaiting_log, []
        for request, sender_ in waiting:   # they waited for this open
            self._base_handle(request, sender_)
        sends, self.awaiting_sends = self.awaiting_sends, []
        for lane, producer_id, producer_name, sends_, _ in sends:
            self._publish_reliable(lane, producer_id, producer_name, sends_)

    def on_WatchMessage(self, msg, sender):
        if self.reactor.outside is None:   # idle in our epoll, Thespian's sockets included
            self.reactor.outside = thespian_waits(self)
        self.reactor.poll(quiet=lambda sends=self.thespian_sends: self.quiet_since(sends))

    # --- supervision --------------------------------------------------------------------------------
    def on_ChildActorExited(self, msg, sender):
        # Delivered once or twice, and a lane's EOF may have told us first: all idempotent.
        if self.ending or self.deleting is not None:
            return
        if msg.childAddress == self.log:   # (if its lane's EOF told us first, self.log is new)
            self._log_lost()
            return
        for name, sub in list(self.subs.items()):
            if msg.childAddress in (sub.subscription, sub.dispatcher):
                self._subscription_lost(name, sub)

    def _log_lost(self):
        """Restart the LogActor; what it had not made durable is refused, never receipted."""
        if self.moved_to is not None:
            return   # fenced: another node holds the log, nothing is restarted here
        log.error("topic %s: log actor died; restarting it", self.name, extra={"topic": self.name})
        refused = [entry for entry, _, _ in self.appending.values()]
        self.appending = {}
        for batch in refused + [self.unsynced]:
            for lane, producer_id, receipts, runs in batch:
                self._refuse(lane, producer_id, receipts, "the topic's log restarted before this send "
                             "was durable; send it again")
                self.msgs_in -= sum(run[1] for run in runs)
        self.unsynced = []
        opened = self.log_ready is not False   # (never opened: LogOpened restores the subscriptions)
        self._start_log(restart=True)
        self.log_ready = None if opened else False   # restarting: LogOpened tells the dispatchers
        for name in self.restoring:   # the old log took these requests with it
            self.send_ordered(self.log, log_actor.LoadCursor(name), "log")

    def _subscription_lost(self, name, sub):
        """One of the pair died: end the other, close the consumers, restart a durable one."""
        if self.subs.get(name) is not sub:
            return
        log.error("topic %s: subscription %s lost its actor; %s", self.name, name,
                  "restarting it from its cursor" if self.log is not None else "ending it",
                  extra={"topic": self.name, "subscription": name})
        self.subs.pop(name)
        self.starting.forget(name)
        self.send_ordered(sub.dispatcher, dispatcher.CloseAll("subscription_lost", None), ("dispatcher", name))
        self.send(sub.subscription, ActorExitRequest())
        self.send(sub.dispatcher, ActorExitRequest())
        self.forget_ordered(("subscription", name))
        self.forget_ordered(("dispatcher", name))
        if self.log is not None:
            self.restoring[name] = sub.type
            self.send_ordered(self.log, log_actor.LoadCursor(name), "log")
        for subscribe in self.waiting_removal.pop(name, []):
            self._subscribe_again(subscribe)
        # Subscribes it may have taken and died before answering (killed as it started, say) are
        # answered (the ConnectionActor ignores this for one it has its answer to), not at the
        # request deadline; handling them again instead would attach a consumer already answered
        # a second time, in the way of whoever subscribes next. Those that never reached it come
        # back as undeliverable and are handled again: they are left out (_answer_lost).
        horizon = time.monotonic() - FORWARDED_MEMORY_S
        lost = [(name, subscribe) for when, subscribe in sub.forwarded if when >= horizon]
        if lost:
            if not self.lost_requests:
                self.wakeupAfter(LOST_ANSWER_AFTER, payload=("lost-requests", None))
            self.lost_requests.extend(lost)

    def _answer_lost(self):
        lost, self.lost_requests = self.lost_requests, []
        rehandled, self.rehandled = self.rehandled, {}
        for name, subscribe in lost:
            if rehandled.get(id(subscribe)) is not subscribe:
                self.send(subscribe.reply_to, connection.RequestLost(
                    subscribe.rid, f"subscription {name} was lost before it answered"))

    def _check_producers(self):
        """A ConnectionActor killed after its ProducerOpened arrived, before its shard had the
        producer: the shard died with it, and if it had no lane to this topic yet no lane EOF
        tells us; the producer stayed (an exclusive one: PRODUCER_BUSY for good). Each owner of
        producers opened since the last check is sent a ProducersCheck: a dead one fails it."""
        checks, self.producer_checks = self.producer_checks, {}
        for address, producer_ids in checks.values():
            alive = tuple(p for p in producer_ids if p in self.producers)
            if alive:
                self._send_tracked(address, connection.ProducersCheck(alive), lambda: None)

    def _owner_gone(self, address):
        gone = str(address)
        for producer_id in [p for p, entry in self.producers.items() if str(entry[2]) == gone]:
            log.info("topic %s: producer %s: its connection actor is gone; removing it", self.name,
                     producer_id, extra={"topic": self.name})
            del self.producers[producer_id]

    def undeliverable(self, address, msgs):
        """A subscribe passed on to a SubscriptionActor that had died (before we knew): that
        subscription is lost, and the subscribe is handled again (restored, or created anew).
        A ProducerOpened or ProducersCheck that did not reach a ConnectionActor: it died, with its
        shard and every connection of it; its producers go."""
        if any(isinstance(m, (connection.ProducerOpened, connection.ProducersCheck)) for m in msgs):
            self._owner_gone(address)
        subscribes = [m for m in msgs if isinstance(m, Subscribe)]
        if not subscribes or self.ending or self.deleting is not None:
            return
        for name, sub in list(self.subs.items()):
            if sub.subscription == address:
                self._subscription_lost(name, sub)
        for subscribe in subscribes:
            if self.lost_requests:   # (not to be answered as lost: see _subscription_lost)
                self.rehandled[id(subscribe)] = subscribe
            self.on_Subscribe(subscribe, subscribe.reply_to)

    def on_CursorLoaded(self, msg, sender):
        if msg.unopened and msg.subscription in self.restoring:   # asked again once the log opens
            for subscribe, _ in self.waiting_restore.pop(msg.subscription, []):
                self._refuse_request(subscribe)
            return
        sub_type = self.restoring.pop(msg.subscription, None)
        waiting = self.waiting_restore.pop(msg.subscription, [])
        if sub_type is not None and msg.subscription not in self.subs and msg.state is not None:
            self._create_subscription(msg.subscription, msg.state.get("type", sub_type), msg.state, "latest",
                                      msg.state.get("options") or {})
        for subscribe, subscriber in waiting:   # now they attach to the restored subscription
            self.on_Subscribe(subscribe, subscriber)

    # --- lanes --------------------------------------------------------------------------------------
    def _lane_frame(self, lane, frame):
        op = frame[0]
        if op == LaneOp.PUBLISH:
            self._publish(lane, frame[1], frame[2], frame[3])
        elif op == LaneOp.PRODUCER_GONE:   # its connection ended; CloseProducer follows, finding nothing
            self.producers.pop(frame[1], None)
        elif op == LaneOp.DISPATCH_ACK:
            name = lane.peer[1]
            sub = self.subs.get(name)
            if sub is not None and sub.lane is lane:
                sub.in_flight -= 1
                self._feed(name, sub)
        elif op == LaneOp.APPENDED:
            if lane is self.log_lane:
                self._appended(frame[1], frame[2], frame[3])
                self.retention_forced = frame[4]
        elif op == LaneOp.APPEND_FAILED:
            if lane is self.log_lane:
                self._append_failed(frame[1], frame[2], frame[3], frame[4] if len(frame) > 4 else E.INTERNAL)
        elif op == LaneOp.HELLO:
            lane.peer = ("shard", frame[1])

    def _lane_closed(self, lane, reason):
        if lane.peer is None or self.ending:
            return
        if lane.peer[0] == "shard":   # that shard is gone: its producers with it
            ident = lane.peer[1]
            for producer_id in [p for p, entry in self.producers.items() if entry[3] == ident]:
                del self.producers[producer_id]
        elif lane.peer[0] == "log":
            if lane is self.log_lane and self.deleting is None:
                self._log_lost()
        elif lane.peer[0] == "dispatcher" and self.deleting is None:
            sub = self.subs.get(lane.peer[1])
            if sub is not None and sub.lane is lane:
                self._subscription_lost(lane.peer[1], sub)

    def on_NodeLost(self, msg, sender):
        """From the root: a member was declared lost. Its producers go (an exclusive one's place
        is free), and each dispatcher drops its consumers, as if their shards' lanes had ended:
        a cut ends none of them, and its ConnectionActors, cut off too, tell us nothing."""
        gone = [p for p, entry in self.producers.items() if cluster.node_of_shard(entry[3]) == msg.node]
        for producer_id in gone:
            del self.producers[producer_id]
        if gone:
            log.info("topic %s: node %s lost; removing its %d producers", self.name, msg.node, len(gone),
                     extra={"topic": self.name})
        for name, sub in self.subs.items():
            self.send_ordered(sub.dispatcher, msg, ("dispatcher", name))

    # --- producers ------------------------------------------------------------------------------
    def on_OpenProducer(self, msg, sender):
        if self._await_log(msg, sender):
            return
        exclusive_open = any(entry[1] == "exclusive" for entry in self.producers.values())
        if exclusive_open or (msg.access == "exclusive" and self.producers):
            self.send(msg.reply_to, connection.RequestFailed(
                msg.rid, E.PRODUCER_BUSY, f"topic {self.name} has an exclusive producer" if exclusive_open
                else f"topic {self.name} has other producers"))
            return
        if msg.name and len(msg.name.encode()) > PRODUCER_NAME_MAX_BYTES:
            self.send(msg.reply_to, connection.RequestFailed(
                msg.rid, E.BAD_REQUEST, f"'name' must be at most {PRODUCER_NAME_MAX_BYTES} bytes"))
            return
        name = msg.name or f"producer-{msg.new_id}"
        self.producers[msg.new_id] = (name, msg.access, msg.reply_to, msg.shard)
        # as Actor.send (in order with what else goes to it), but a dead owner fails it: undeliverable
        self._send_tracked(msg.reply_to, connection.ProducerOpened(
            msg.rid, msg.new_id, self.name, self.myAddress, self.lane_address, self.dispatch, name,
            self.config.node), lambda: None)
        if not self.producer_checks:
            self.wakeupAfter(PRODUCER_CHECK_AFTER, payload=("producer-check", None))
        self.producer_checks.setdefault(str(msg.reply_to), (msg.reply_to, []))[1].append(msg.new_id)

    def on_CloseProducer(self, msg, sender):
        self.producers.pop(msg.producer_id, None)
        if msg.rid is not None:
            self.send(msg.reply_to, connection.RequestDone(msg.rid, {"op": "ok"}))

    # --- the record path ----------------------------------------------------------------------------
    def on_Publish(self, msg, sender):
        if msg.reply_to is not None and self.log is None:
            # A dead letter kept here would be kept nowhere (a topic of that name existed as
            # non_reliable): refused, so the subscription keeps it and tries again (every 5 s)
            # until the name is a reliable topic's (delete this one: the next try creates it).
            if not self.refused_dead_letters:
                log.warning("topic %s is non_reliable: dead letters sent to it are refused and stay on their "
                            "subscriptions until it is a reliable topic", self.name)
            self.refused_dead_letters += 1
            self.send(msg.reply_to, dispatcher.DeadLettered(msg.token, False))
            return
        reply = _PublishReply(self, msg.reply_to, msg.token) if msg.reply_to is not None else None
        self._publish(reply, msg.producer_id, msg.producer_name, msg.sends)

    def _runs(self, producer_name, sends, now):
        """Number the sends: (runs, receipts); a run per send, nothing per record."""
        runs, receipts = [], []
        offset = self.next_offset
        for rid, count, payloads, keys, attrs, size in sends:
            runs.append([offset, count, now, producer_name, 0, payloads, keys, attrs])
            receipts.append((rid, offset, count))
            self.bytes_in += size
            offset += count
        self.msgs_in += offset - self.next_offset
        self.next_offset = offset
        return runs, receipts

    def _publish(self, lane, producer_id, producer_name, sends):
        # Accepted whatever the producer's state: the shard routed it while it was open.
        if self.log is not None:
            self._publish_reliable(lane, producer_id, producer_name, sends)
            return
        runs, receipts = self._runs(producer_name, sends, int(time.time() * 1000))
        if lane is not None:
            lane.send([LaneOp.RECEIPTS, producer_id, receipts, []])
        # Receipted at once (at most once): a dispatcher slower than the producers has what waits
        # for it bounded by _queue, and bounds its own backlog.
        for name, sub in self.subs.items():
            self._queue(sub, runs)
            self._feed(name, sub)

    def _refuse(self, lane, producer_id, receipts, text, code=E.INTERNAL):
        if lane is not None and not lane.closed:
            lane.send([LaneOp.RECEIPTS, producer_id, [], [(rid, code, text) for rid, _, _ in receipts]])

    def _publish_reliable(self, lane, producer_id, producer_name, sends):
        if not self.log_ready:
            offset, receipts = self.next_offset, []
            for send in sends:
                receipts.append((send[0], offset, send[1]))
                offset += send[1]
            if self.moved_to is not None:
                self._refuse(lane, producer_id, receipts, self._moved_text(), E.TOPIC_UNAVAILABLE)
            elif self.log_failed is not None:   # they wait for another try of the open, as requests do
                self.awaiting_sends.append((lane, producer_id, producer_name, sends, receipts))
                if not self.log_opening:
                    self._open_log(restart=self.log_ready is None)
            else:
                self._refuse(lane, producer_id, receipts, "the topic's log is restarting; send it again")
            return
        runs, receipts = self._runs(producer_name, sends, 0)   # timed when appended
        if self.config.fsync == "always":   # a write and an fsync for each `send` (its run)
            self.unsynced.extend((lane, producer_id, [receipt], [run]) for receipt, run in zip(receipts, runs))
        else:
            self.unsynced.append((lane, producer_id, receipts, runs))
        self._append()

    def _append(self):
        """Group commit: one append in flight; what arrives meanwhile goes in the next one.
        With --fsync always, every Publish is its own append (and fsync)."""
        if not self.unsynced or (self.appending and self.config.fsync != "always"):
            return
        if self.config.fsync == "always":
            n = 1
        else:   # what waits, within APPEND_MAX_BYTES (at least one Publish)
            n = size = 0
            for _, _, _, part in self.unsynced:
                size += sum(map(_run_size, part))
                if n and size > APPEND_MAX_BYTES:
                    break
                n += 1
        batch = self.unsynced[:n]
        self.unsynced = self.unsynced[n:]
        first = batch[0][2][0][1]
        now = int(time.time() * 1000)
        runs = []
        for _, _, _, part in batch:   # the log stores the runs as they are (storage/segment_log.py)
            for run in part:
                run[RUN_TIME] = now
            runs += part
        self.append_seq += 1
        self.appending[self.append_seq] = (batch, first, now)
        self.log_lane.send([LaneOp.APPEND, self.append_seq, first, runs, now])
        if self.config.fsync == "always":
            self._append()

    def _appended(self, seq, log_bytes, segments):
        entry = self.appending.pop(seq, None)
        if entry is None:
            return   # from a log that has been restarted since: those sends were refused
        batch, first, now = entry
        self.log_bytes, self.segments = log_bytes, segments
        runs = []
        for lane, producer_id, receipts, part in batch:
            if lane is not None and not lane.closed:
                lane.send([LaneOp.RECEIPTS, producer_id, receipts, []])
            runs += part
        for name, sub in self.subs.items():   # durable now: consumers may see it
            self._queue(sub, runs)
            self._feed(name, sub)
        self._append()

    def _append_failed(self, seq, error, next_offset, code):
        """Nothing of this append, nor of what was queued behind it, was receipted: refuse them
        all (the producers may retry) and number again from where the log really ends. `code`:
        TOPIC_UNAVAILABLE when another node took the topic over (fenced), OVERLOADED when the
        disk refused (full, not writable: log.storage_failure), INTERNAL otherwise."""
        failed, _, _ = self.appending.pop(seq, ([], None, None))
        for lane, producer_id, receipts, runs in failed + self.unsynced:
            self._refuse(lane, producer_id, receipts, f"log write failed: {error}", code)
            self.msgs_in -= sum(run[1] for run in runs)
        self.unsynced = []
        self.next_offset = next_offset
        self._append()

    def _queue(self, sub, runs):
        """Add runs to what waits for the subscription's dispatcher, within the bounds."""
        if self.log is None:
            bound = max(self.config.max_backlog, PENDING_FLOOR)
            for run in runs:
                size = _run_size(run)
                if sub.pending and (sub.pending_count + run[RUN_COUNT] > bound
                                    or sub.pending_bytes + size > PENDING_MAX_BYTES):
                    sub.dropped += run[RUN_COUNT]
                    continue
                sub.pending.append(run)
                sub.pending_count += run[RUN_COUNT]
                sub.pending_bytes += size
            return
        for run in runs:
            sub.pending.append(run)
            sub.pending_count += run[RUN_COUNT]
            sub.pending_bytes += _run_size(run)
        drop = 0
        while drop < len(sub.pending) - 1 and (sub.pending_count > dispatcher.RELIABLE_BUFFER
                                              or sub.pending_bytes > PENDING_MAX_BYTES):
            sub.pending_count -= sub.pending[drop][RUN_COUNT]
            sub.pending_bytes -= _run_size(sub.pending[drop])
            drop += 1
        if drop:
            del sub.pending[:drop]

    def _feed(self, name, sub):
        if sub.lane is not None and sub.in_flight < DISPATCH_WINDOW and (sub.pending or sub.dropped):
            sub.lane.send([LaneOp.DISPATCH, sub.pending, sub.dropped] if sub.dropped else
                          [LaneOp.DISPATCH, sub.pending])
            sub.pending, sub.pending_count, sub.pending_bytes, sub.dropped = [], 0, 0, 0
            sub.in_flight += 1

    # --- subscriptions -------------------------------------------------------------------------------
    def _create_subscription(self, name, sub_type, cursor, start, options):
        began = time.monotonic()
        sub_address = self.createActor("actorbroker.actors.subscription.SubscriptionActor")
        dispatcher_address = self.createActor("actorbroker.actors.dispatcher.DispatcherActor")
        forked = time.monotonic() - began
        self.forget_ordered(("dispatcher", name))
        self.forget_ordered(("subscription", name))
        self.incarnations += 1
        init = dispatcher.InitDispatcher(self.name, name, sub_type, self.dispatch, self.config,
                                         incarnation=self.incarnations)
        if self.log is not None:
            kept = {k: options.get(k) for k in ("ack_timeout_ms", "max_redeliveries", "dead_letter_topic")}
            init = dispatcher.InitDispatcher(
                self.name, name, sub_type, self.dispatch, self.config, log=self.log,
                log_lane=self.log_address, cursor=cursor,
                start_offset=self.first_offset if start == "earliest" else self.next_offset,
                end_offset=self.next_offset, options=kept, broker=self.broker,
                incarnation=self.incarnations)
        self.send_ordered(dispatcher_address, init, ("dispatcher", name))
        self.send_ordered(sub_address, subscription.InitSubscription(
            self.name, name, sub_type, self.dispatch, dispatcher_address, self.incarnations), ("subscription", name))
        sub = self.subs[name] = _Sub(sub_type, sub_address, dispatcher_address,
                                     incarnation=self.incarnations)
        self.starting.begin(name, self.incarnations, forked)
        self.wakeupAfter(PAIR_START_DEADLINE, payload=("pair-start", (name, self.incarnations)))
        return sub

    def on_SubscriptionReady(self, msg, sender):
        sub = self.subs.get(msg.name)
        if sub is not None and sub.incarnation == msg.incarnation:
            sub.ready = True

    def _pair_start_overdue(self, name, incarnation):
        """Thespian does not report a child killed within milliseconds of its start: such a
        subscription stayed wedged for good (every subscribe to it answered INTERNAL at the request
        deadline, its other actor left running). Not both running by the deadline: lost."""
        sub = self.subs.get(name)
        if sub is None or sub.incarnation != incarnation or (sub.ready and sub.lane is not None):
            return
        log.warning("topic %s: subscription %s did not start within %d s (an actor killed as it started?)",
                    self.name, name, PAIR_START_DEADLINE.total_seconds())
        self._subscription_lost(name, sub)

    def on_DispatcherReady(self, msg, sender):
        self.starting.done(msg.subscription, msg.incarnation)
        sub = self.subs.get(msg.subscription)
        if sub is None or sub.incarnation != msg.incarnation or sub.lane is not None:
            return
        try:
            sub.lane = self.hub.connect(msg.lane, peer=("dispatcher", msg.subscription))
        except OSError:
            self._subscription_lost(msg.subscription, sub)
            return
        sub.lane.send([LaneOp.HELLO, self.name])
        self._feed(msg.subscription, sub)

    def on_Subscribe(self, msg, sender):
        if self._await_log(msg, sender):
            return
        if msg.subscription in self.restoring:
            # its durable cursor is being loaded: a subscription created now would start from
            # the end and lose every unacknowledged message; attach once it is restored
            self.waiting_restore.setdefault(msg.subscription, []).append((msg, sender))
            return
        sub = self.subs.get(msg.subscription)
        if sub is None and len(self.subs) >= self.config.max_subscriptions_per_topic:
            self.send(msg.reply_to, connection.RequestFailed(msg.rid, E.OVERLOADED, (
                f"topic {self.name} has {len(self.subs)} subscriptions "
                f"(max_subscriptions_per_topic {self.config.max_subscriptions_per_topic})")))
            return
        if sub is None and self.starting.full(self.config.request_deadline_ms):   # (actors/starting.py)
            self.send(msg.reply_to, connection.RequestFailed(msg.rid, E.OVERLOADED, (
                f"topic {self.name}: " + self.starting.refusal("subscriptions (two processes each)"))))
            return
        if sub is None:
            sub = self._create_subscription(msg.subscription, msg.type, None, msg.start, msg.options)
        elif sub.type != msg.type:
            self.send(msg.reply_to, connection.RequestFailed(
                msg.rid, E.TYPE_MISMATCH, f"subscription {msg.subscription} is {sub.type}, not {msg.type}"))
            return
        sub.attaches += 1
        self.send_ordered(sub.subscription, msg, ("subscription", msg.subscription))
        now = time.monotonic()
        horizon = now - FORWARDED_MEMORY_S
        while sub.forwarded and sub.forwarded[0][0] < horizon:
            sub.forwarded.popleft()
        sub.forwarded.append((now, msg))

    def on_SubscribeAgain(self, msg, sender):
        sub = self.subs.get(msg.subscribe.subscription)
        if sub is not None and sub.subscription == sender and not self.ending:   # not dropped yet: once it is
            # (ending: deleted, or stopping; nothing will drop it: refused now, not never answered)
            self.waiting_removal.setdefault(msg.subscribe.subscription, []).append(msg.subscribe)
            return
        self._subscribe_again(msg.subscribe)

    def _subscribe_again(self, subscribe):
        if self.ending or self.deleting is not None:
            self.send(subscribe.reply_to, connection.RequestFailed(
                subscribe.rid, E.TOPIC_UNAVAILABLE, f"topic {self.name} was deleted while this subscribe "
                                                    "was on its way; send it again"))
            return
        self.on_Subscribe(subscribe, subscribe.reply_to)

    def on_SubscriptionIdle(self, msg, sender):
        sub = self.subs.get(msg.name)
        # Only if no subscribe was forwarded after the subscription found itself empty.
        if sub is not None and sub.attaches == msg.attaches and self.dispatch == "non_reliable":
            self._drop_subscription(msg.name)
        self._answer_ok(msg)

    def on_RemoveSubscription(self, msg, sender):
        self._drop_subscription(msg.name)
        self._answer_ok(msg)

    def _answer_ok(self, msg):
        if msg.rid is not None:
            self.send(msg.reply_to, connection.RequestDone(msg.rid, {"op": "ok"}))

    def _drop_subscription(self, name):
        sub = self.subs.pop(name, None)
        self.starting.forget(name)
        if sub is not None and self.log is not None:
            self.send_ordered(self.log, log_actor.DeleteCursor(name), "log")
        if sub is not None:   # its lane ends when the dispatcher exits
            self.send(sub.subscription, ActorExitRequest())
            self.send(sub.dispatcher, ActorExitRequest())
            self.forget_ordered(("subscription", name))
            self.forget_ordered(("dispatcher", name))
            self._forget_series(name)
        for subscribe in self.waiting_removal.pop(name, []):   # after the old one's channels are forgotten
            self._subscribe_again(subscribe)

    # --- stats and listing ------------------------------------------------------------------------------
    def _summary(self):
        summary = {"name": self.name, "dispatch": self.dispatch, "subscriptions": len(self.subs),
                   "producers": len(self.producers), "msgs_in": self.msgs_in}   # (the load: `cluster`)
        if self.config.node:   # in a cluster: the node that owns the topic
            summary["node"] = self.config.node
        return summary

    def on_SummaryRequest(self, msg, sender):
        self.send(sender, broker.TopicSummary(msg.token, self._summary()))

    def on_StatsRequest(self, msg, sender):
        if self._await_log(msg, sender):
            return
        frame = {"op": "stats", "rid": msg.rid, "topic": self.name, "dispatch": self.dispatch,
                 "msgs_in": self.msgs_in, "bytes_in": self.bytes_in,
                 "producers": len(self.producers), "subscriptions": [],
                 "poison_messages": self.poison_messages, "gaps_skipped": self.gaps_skipped,
                 "handler_errors": self.handler_errors}
        if self.config.node:
            frame["node"] = self.config.node
        token = self.next_token
        self.next_token += 1
        self.stats_gathers[token] = [msg.rid, msg.reply_to, frame, dict.fromkeys(self.subs)]
        if not self.subs:
            self._answer_stats(token)
            return
        for name, sub in self.subs.items():
            self.send_ordered(sub.dispatcher, dispatcher.DispatcherStatsRequest(token, sub.pending_count),
                              ("dispatcher", name))
        self.wakeupAfter(GATHER_TIMEOUT, payload=("stats", token))

    def on_FlushCursors(self, msg, sender):
        token = self.next_token
        self.next_token += 1
        self.flushes[token] = [sender, msg.token, len(self.subs)]
        for name, sub in self.subs.items():
            self.send_ordered(sub.dispatcher, dispatcher.FlushCursor(token), ("dispatcher", name))
        self._cursors_flushed(token, 0)
        self.wakeupAfter(GATHER_TIMEOUT, payload=("flush", token))

    def on_CursorFlushed(self, msg, sender):
        self._cursors_flushed(msg.token, 1)

    def _cursors_flushed(self, token, done, force=False):
        flush = self.flushes.get(token)
        if flush is None:
            return
        flush[2] -= done
        if flush[2] <= 0 or force:
            del self.flushes[token]
            self.send(flush[0], CursorsFlushed(flush[1]))

    def on_DispatcherStats(self, msg, sender):
        gather = self.stats_gathers.get(msg.token)
        if gather is None:
            return
        if msg.stats.get("name") not in gather[3]:
            return   # (answered already)
        gather[2]["subscriptions"].append(msg.stats)
        del gather[3][msg.stats.get("name")]
        sub = self.subs.get(msg.stats.get("name"))
        if sub is not None:
            sub.last_stats = msg.stats
        if not gather[3]:
            self._answer_stats(msg.token)

    def _answer_stats(self, token):
        gather = self.stats_gathers.pop(token, None)
        if gather is not None:
            rid, reply_to, frame, unanswered = gather
            for name in unanswered:   # its dispatcher is busy (or just died): listed all the same
                frame["subscriptions"].append(self._unanswered_stats(name))
            frame["subscriptions"].sort(key=lambda s: s["name"])
            for name in ("poison_messages", "gaps_skipped", "handler_errors"):   # the topic's and its dispatchers'
                frame[name] += sum(s.get(name, 0) for s in frame["subscriptions"])
            if self.log is not None:
                frame.update(log_bytes=self.log_bytes, segments=self.segments,
                             retention_forced=self.retention_forced,
                             recovered_truncated_bytes=self.truncated_bytes,
                             corrupt_batches_skipped=self.corrupt[0], corrupt_bytes_skipped=self.corrupt[1],
                             dead_lettered=sum(s.get("dead_lettered", 0) for s in frame["subscriptions"]))
            self.send(reply_to, connection.RequestDone(rid, frame))

    def _unanswered_stats(self, name):
        """A subscription whose dispatcher did not answer within GATHER_TIMEOUT: its last answer
        (or zeros), flagged `unanswered` (docs/protocol.md)."""
        sub = self.subs.get(name)
        last = sub.last_stats if sub is not None and sub.last_stats is not None else {
            "name": name, "type": sub.type if sub is not None else None, "backlog": 0, "msgs_out": 0,
            "dropped": 0, "redelivered": 0, "consumers": []}
        return dict(last, unanswered=True)

    def metrics_snapshot(self, counters, gauges, histograms):
        counters[("actorbroker_topic_messages_in", (self.name,))] = self.msgs_in
        counters[("actorbroker_topic_bytes_in", (self.name,))] = self.bytes_in

    # --- deletion ----------------------------------------------------------------------------------
    def on_DeleteTopic(self, msg, sender):
        for producer_id, (_, _, owner, _) in self.producers.items():
            self.send(owner, connection.ProducerEnded(producer_id, msg.reason, self.config.node))
        self.producers.clear()
        if self.log_failed is not None:   # what waits for the log: it will not open now
            self._refuse_awaiting()
        self.deleting = (msg.rid, msg.reply_to, set(self.subs))
        if self.log is not None:
            self.deleting[2].add(("log",))
            self.send_ordered(self.log, log_actor.DestroyLog(), "log")
        for name, sub in self.subs.items():
            self.send_ordered(sub.subscription, subscription.EndAll(msg.reason), ("subscription", name))
        self.wakeupAfter(GATHER_TIMEOUT, payload=("delete", None))
        self._finish_delete()

    def on_SubscriptionEnded(self, msg, sender):
        if self.deleting is not None:
            self.deleting[2].discard(msg.name)
            self._finish_delete()

    def on_LogDestroyed(self, msg, sender):
        if self.deleting is not None:
            self.deleting[2].discard(("log",))
            self._finish_delete()

    def _finish_delete(self, force=False):
        if self.deleting is None or (self.deleting[2] and not force):
            return
        rid, reply_to, _ = self.deleting
        self.deleting = None
        self.ending = True
        for subscribe in [s for waiting in self.waiting_removal.values() for s in waiting]:
            self._subscribe_again(subscribe)   # refused: the topic is gone
        self.waiting_removal.clear()
        log.info("topic %s deleted", self.name, extra={"topic": self.name})
        emit(self, self.config.events, "topic_deleted", topic=self.name)
        if reply_to is not None:   # deleted (not a fenced node's topic, which lives on elsewhere)
            self._forget_series(None)
        if reply_to is not None:   # None: a fenced cluster node ending its topics
            self.send(reply_to, connection.RequestDone(rid, {"op": "ok"}))
        self.ending = True
        self.exit_self()  # Thespian stops the subscriptions and dispatchers with us

    def _forget_series(self, subscription):
        """The metric series of this topic (or of its `subscription`) end: it was deleted."""
        if self.config.metrics is not None:
            self.send(self.config.metrics, ForgetSeries(self.name, subscription))

    def on_ActorExitRequest(self, msg, sender):
        self.ending = True
        if self.hub is not None:
            self.hub.close()
            self.hub = None

    def on_WakeupMessage(self, msg, sender):
        kind, token = msg.payload
        if kind == "stats":
            self._answer_stats(token)
        elif kind == "flush":
            self._cursors_flushed(token, 0, force=True)
        elif kind == "delete":
            self._finish_delete(force=True)
        elif kind == "producer-check":
            self._check_producers()
        elif kind == "lost-requests":
            self._answer_lost()
        elif kind == "pair-start":
            self._pair_start_overdue(*token)
