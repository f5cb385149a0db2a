"""DispatcherActor: one per subscription; the data side of it.

It holds the subscription's backlog and its consumers' credits (through the policy of the
subscription's type) and pushes batches straight to each consumer's TcpTransportActor. At most
DELIVER_WINDOW batches are in flight to one transport; the transport acks each once it has
buffered it, so a slow client holds messages here, in the bounded backlog, not in Thespian's queue.

On a reliable topic it also keeps the subscription's cursor (persisted through the topic's
LogActor), the delivered-but-unacknowledged messages of each consumer, and redelivers them when
their consumer goes, on nack, and on ack timeout. It holds at most RELIABLE_BUFFER records in
memory; beyond that it reads them back from the log when there is room (catch-up).
"""
import time
from datetime import timedelta

from dataclasses import dataclass
from typing import Any

from actorbroker.actors import broker, connection, log as log_actor, topic
from actorbroker.actors.base import BrokerActor
from actorbroker.actors.cursor import Cursor
from actorbroker.actors.policies import ConsumerState, make_policy
from actorbroker.transport.codec import encode_frame, record_blob, record_tail, with_redeliveries
from actorbroker.transport.messages import Deliver, Outbound

RELIABLE_BUFFER = 5000
DEFAULT_MAX_UNACKED = 1000


@dataclass(frozen=True)
class InitDispatcher:
    topic: str
    name: str
    type: str
    dispatch: str
    config: Any
    # reliable topics only
    log: Any = None
    cursor: Any = None        # {"floor", "acked"} from disk, or None for a new subscription
    start_offset: int = 0     # where a new subscription starts
    end_offset: int = 0       # the topic's next offset now
    options: Any = None       # ack_timeout_ms, max_redeliveries, dead_letter_topic
    broker: Any = None        # where dead letters are published


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
    max_unacked: Any = None


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
    rid: Any = None   # answered with `ok` once the ack is durable (reliable) or taken


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
    process_name = "ab-disp"
    init_message = InitDispatcher

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.topic = None
        self.name = self.type = self.dispatch = None
        self.policy = None
        self.msgs_out = 0
        self.dropped = 0
        self.reliable = False
        # reliable state
        self.log = None
        self.broker = None
        self.cursor = None
        self.read_pos = 0          # next offset to bring into memory
        self.end = 0               # the topic's next offset, as far as we know
        self.reading = False
        self.unacked = {}          # offset -> (consumer id, record, deadline or None)
        self.redelivery_count = {} # offset -> times redelivered
        self.delayed = {}          # offset -> record waiting for a nack delay
        self.options = {}
        self.redelivered = 0
        self.dead_lettered = 0
        self.cursor_saving = False
        self.cursor_dirty = False
        self.acks_waiting = []       # (transport, rid) of acks in the save in flight
        self.acks_waiting_next = []  # ... and of acks for the next save
        self.timeout_tick = False

    def on_InitDispatcher(self, msg, sender):
        self.topic = sender
        self.name, self.type, self.dispatch = msg.name, msg.type, msg.dispatch
        self.policy = make_policy(msg.type, msg.config.max_backlog)
        if msg.dispatch == "reliable":
            self.reliable = True
            self.log = msg.log
            self.options = msg.options or {}
            self.broker = msg.broker
            state = msg.cursor or {"floor": msg.start_offset, "acked": []}
            self.cursor = Cursor(state["floor"], state.get("acked", ()))
            self.read_pos = self.cursor.floor
            self.end = msg.end_offset
            self._save_cursor()
            self._refill()

    def on_Dispatch(self, msg, sender):
        self.send(sender, topic.DispatchAck(self.name))
        if self.reliable:
            self._take_fresh(msg.records)
        else:
            self.policy.enqueue(msg.records)
        self._pump()
        if not self.reliable:
            self.dropped += self.policy.trim()  # non_reliable: what no credit can take, within bounds

    # --- reliable: what is in memory, and reading the rest back -----------------------------------
    def _take_fresh(self, records):
        """New durable records: keep them if they continue what is in memory and there is room;
        otherwise they stay in the log until we read them back."""
        if not records:
            return
        self.end = max(self.end, records[-1][0] + 1)
        room = RELIABLE_BUFFER - self.policy.backlog_size()
        if records[0][0] == self.read_pos and room > 0 and not self.reading:
            keep = [r for r in records[:room] if not self.cursor.is_acked(r[0])]
            self.policy.enqueue(keep)
            self.read_pos = records[min(room, len(records)) - 1][0] + 1
        self._refill()

    def _refill(self):
        if self.reading or self.read_pos >= self.end:
            return
        room = RELIABLE_BUFFER - self.policy.backlog_size()
        if room >= RELIABLE_BUFFER // 2:
            self.reading = True
            self.send_ordered(self.log, log_actor.ReadLog(self.read_pos, self.read_pos, room), "log")

    def on_LogRecords(self, msg, sender):
        self.reading = False
        if msg.token != self.read_pos:
            return
        if msg.first_offset > self.cursor.floor:   # retention removed what we had not acked
            self.cursor.skip_to(msg.first_offset)
        keep = []
        for offset, key, stamp, tail in msg.records:
            if offset < self.read_pos or self.cursor.is_acked(offset) or offset in self.unacked:
                continue
            blob = record_blob(offset, stamp, tail)
            count = self.redelivery_count.get(offset, 0)
            keep.append((offset, key, with_redeliveries(blob, count) if count else blob))
        self.policy.enqueue(keep)
        if msg.records:
            self.read_pos = max(self.read_pos, msg.records[-1][0] + 1)
        else:   # nothing on disk from read_pos: we are at the log's end, stop reading
            self.read_pos = max(self.read_pos, msg.first_offset)
            self.end = self.read_pos
        self._pump()
        self._refill()

    # --- reliable: acks, nacks, redelivery ---------------------------------------------------------
    def _redeliver(self, records):
        """Put records back for delivery, counted; dead-letter those past max_redeliveries."""
        again = []
        limit = self.options.get("max_redeliveries")
        for offset, key, blob in sorted(records, key=lambda r: r[0]):
            if self.cursor.is_acked(offset):
                continue
            count = self.redelivery_count.get(offset, 0) + 1
            self.redelivery_count[offset] = count
            if limit is not None and count > limit and self.options.get("dead_letter_topic"):
                self._dead_letter(offset, key, blob)
                continue
            self.redelivered += 1
            again.append((offset, key, with_redeliveries(blob, count)))
        self.policy.requeue(again)

    def _dead_letter(self, offset, key, blob):
        tail = record_tail(with_redeliveries(blob, 0))
        self.send(self.broker, broker.TopicRequest(
            self.options["dead_letter_topic"], "reliable",
            topic.Publish(0, f"{self.name}-dlq", [(None, [(key, tail, len(tail))])])))
        self.dead_lettered += 1
        self._acknowledge(offset)

    def _acknowledge(self, offset):
        self.redelivery_count.pop(offset, None)
        if self.cursor.ack(offset):
            self.cursor_dirty = True

    def _save_cursor(self):
        """One save in flight at a time; acks that arrive meanwhile go in the next (batched)."""
        if self.cursor_saving:
            self.cursor_dirty = True
            return
        self.cursor_saving, self.cursor_dirty = True, False
        self.acks_waiting, self.acks_waiting_next = self.acks_waiting_next, []
        state = dict(self.cursor.state(), type=self.type, options=self.options)
        self.send_ordered(self.log, log_actor.SaveCursor(self.name, state), "log")

    def on_CursorSaved(self, msg, sender):
        self.cursor_saving = False
        for transport, rid in self.acks_waiting:   # their acks are on disk now
            self._answer_ack(transport, rid)
        self.acks_waiting = []
        if self.cursor_dirty:
            self._save_cursor()

    def _schedule_timeouts(self):
        timeout = self.options.get("ack_timeout_ms")
        if timeout and self.unacked and not self.timeout_tick:
            self.timeout_tick = True
            self.wakeupAfter(timedelta(milliseconds=max(20, timeout // 4)), payload="ack-timeout")

    def on_WakeupMessage(self, msg, sender):
        if msg.payload == "ack-timeout":
            self.timeout_tick = False
            now = time.monotonic()
            expired = [o for o, (_, _, deadline) in self.unacked.items() if deadline and deadline <= now]
            self._return_unacked(expired)
            self._pump()
            self._schedule_timeouts()
        elif isinstance(msg.payload, tuple) and msg.payload[0] == "nack":
            records = [self.delayed.pop(o) for o in msg.payload[1] if o in self.delayed]
            self._redeliver(records)
            self._pump()

    def _return_unacked(self, offsets):
        records = []
        for offset in offsets:
            entry = self.unacked.pop(offset, None)
            if entry is None:
                continue
            consumer = self.policy.consumers.get(entry[0])
            if consumer is not None:
                consumer.unacked -= 1
            records.append(entry[1])
        self._redeliver(records)

    # --- membership, told by the SubscriptionActor -----------------------------------------------
    def on_AddConsumer(self, msg, sender):
        before = self._active_flags()
        if msg.replaces is not None:
            self._close(msg.replaces, "replaced")
        consumer = ConsumerState(msg.consumer_id, msg.name, msg.transport, msg.reply_to)
        if self.reliable:
            consumer.tracks_acks = True
            consumer.max_unacked = msg.max_unacked or DEFAULT_MAX_UNACKED
        self.policy.add(consumer)
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
        if consumer is not None and self.reliable:
            # its unacknowledged messages go back to the subscription, counted as redelivered
            self._return_unacked([o for o, entry in self.unacked.items() if entry[0] == consumer_id])
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
        if not self.reliable:  # non_reliable: nothing is kept for redelivery, nothing to release
            self._answer_ack(sender, msg.rid)
            return
        for offset in msg.ids:
            entry = self.unacked.pop(offset, None)
            if entry is not None:
                consumer = self.policy.consumers.get(entry[0])
                if consumer is not None:
                    consumer.unacked -= 1
                self._acknowledge(offset)
            elif offset in self.redelivery_count or offset in self.delayed:
                self.delayed.pop(offset, None)
                self._acknowledge(offset)   # waiting for redelivery: acked by anyone, for all
        if self.cursor_dirty:
            if msg.rid is not None:
                self.acks_waiting_next.append((sender, msg.rid))
            self._save_cursor()
        else:
            self._answer_ack(sender, msg.rid)
        self._pump()

    def _answer_ack(self, transport, rid):
        if rid is not None:
            self.send(transport, Outbound(encode_frame({"op": "ok", "rid": rid})))

    def on_Nack(self, msg, sender):
        if not self.reliable:
            return  # non_reliable: nothing is redelivered
        offsets = [o for o in msg.ids if o in self.unacked]
        if not msg.delay_ms:
            self._return_unacked(offsets)
        else:
            for offset in offsets:
                consumer_id, record, _ = self.unacked.pop(offset)
                consumer = self.policy.consumers.get(consumer_id)
                if consumer is not None:
                    consumer.unacked -= 1
                self.delayed[offset] = record
            self.wakeupAfter(timedelta(milliseconds=msg.delay_ms), payload=("nack", tuple(offsets)))
        self._pump()

    def on_DeliverAck(self, msg, sender):
        consumer = self.policy.consumers.get(msg.consumer_id)
        if consumer is not None:
            consumer.in_flight -= 1
            self._pump()

    def _pump(self):
        deadline = None
        if self.reliable and self.options.get("ack_timeout_ms"):
            deadline = time.monotonic() + self.options["ack_timeout_ms"] / 1000.0
        for consumer, records in self.policy.take():
            if self.reliable:
                fresh = [r for r in records if not self.cursor.is_acked(r[0])]
                consumer.credits += len(records) - len(fresh)   # acked while waiting: not sent
                consumer.unacked -= len(records) - len(fresh)
                records = fresh
                for record in records:
                    self.unacked[record[0]] = (consumer.id, record, deadline)
                if not records:
                    continue
            consumer.in_flight += 1
            consumer.msgs_out += len(records)
            self.msgs_out += len(records)
            self.send_ordered(consumer.transport, Deliver(consumer.id, [blob for _, _, blob in records]),
                              stream=consumer.id)
        if self.reliable:
            self._schedule_timeouts()
            self._refill()

    # --- stats ----------------------------------------------------------------------------------
    def on_DispatcherStatsRequest(self, msg, sender):
        consumers = [{"consumer": c.id, "name": c.name,
                      "active": self.policy.is_active(c.id) is not False,
                      "credits": c.credits, "unacked": c.unacked if self.reliable else 0,
                      "msgs_out": c.msgs_out}
                     for c in self.policy.consumers.values()]
        if self.reliable:  # everything not acknowledged and not out with a consumer
            backlog = max(0, self.end - self.cursor.floor - len(self.cursor.acked) - len(self.unacked))
        else:
            backlog = self.policy.backlog_size() + msg.topic_pending
        stats = {"name": self.name, "type": self.type, "backlog": backlog,
                 "msgs_out": self.msgs_out, "dropped": self.dropped, "redelivered": self.redelivered,
                 "consumers": consumers}
        if self.reliable:
            stats["dead_lettered"] = self.dead_lettered
            stats["cursor"] = self.cursor.floor
        self.send(sender, topic.DispatcherStats(msg.token, stats))
