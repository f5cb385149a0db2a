"""DispatcherActor: one per subscription; the data side of it.

It holds the subscription's backlog and its consumers' credits (through the policy of the
subscription's type) and pushes batches straight to each consumer's shard over that shard's lane
(transport/lanes.py): the topic's DISPATCH frames come in on one lane, each shard with consumers
here connects one lane that carries credits, acks and nacks in and DELIVER frames out. At most
DELIVER_WINDOW batches are in flight to one consumer; the shard acks each once it has buffered
it, so a slow client holds messages here, in the bounded backlog.

A shard's lane ending means that shard is gone: its consumers are removed at once (failover
promotes, reliable unacked messages are redelivered) and the SubscriptionActor is told. The
topic's lane ending means the topic is gone: the consumers are told `topic_lost`.

On a reliable topic it also keeps the subscription's cursor (persisted through the topic's
LogActor), the delivered-but-unacknowledged messages of each consumer, and redelivers them when
their consumer goes, on nack, and on ack timeout. It holds at most RELIABLE_BUFFER records in
memory (fewer when they are large: config.max_backlog_bytes); beyond that it reads them back from
the log when there is room (catch-up).
"""
import bisect
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from thespian.actors import ThespianWatch

from actorbroker.actors import broker, cluster, connection, log as log_actor, signing, subscription, topic
from actorbroker.actors.base import BrokerActor, log
from actorbroker.actors.config import delivery_batch_bytes
from actorbroker.actors.cursor import Cursor
from actorbroker.actors.lifecycle import emit
from actorbroker.actors.reporting import Histogram
from actorbroker.actors.system import thespian_waits
from actorbroker.actors.policies import DELIVER_WINDOW, ConsumerState, FailoverPolicy, KeySharedPolicy, make_policy
from actorbroker.transport import errors as E
from actorbroker.transport.codec import (RUN_COUNT, RUN_PAYLOADS, RUN_PRODUCER, RUN_REDELIVERIES, coalesce_runs,
                                         encode_frame, explode_run, run_bytes, split_run, with_run_redeliveries)
from actorbroker.transport.lanes import RECORD_PATH_LINGER_S, LaneHub, LaneOp, Reactor
from actorbroker.transport.session import error_frame
from actorbroker.transport.validate import MAX_DELAY_MS, MAX_TOTAL_CREDITS

RELIABLE_BUFFER = 5000
MIN_IN_MEMORY = 8   # records kept in memory however large (max_backlog_bytes gives the rest)
READ_MAX_BYTES = 16 * 1024 * 1024   # read back from the log at a time: a RECORDS lane frame stays
                                    # well below MAX_LANE_FRAME (5,000 records of 1 MB did not)
CURSOR_SAVE_DELAY = timedelta(milliseconds=100)
DEFAULT_MAX_UNACKED = 1000
# A consumer its shard has not said ROUTED for this long after its ConsumerOpened is probed through
# its ConnectionActor (see _check_routes): its connection actor may have died with the answer.
ROUTE_CHECK_AFTER = timedelta(seconds=2)
# A dead letter the dead-letter topic has not receipted this long after it was sent goes again
DEAD_LETTER_RETRY = timedelta(seconds=5)


@dataclass(frozen=True)
class InitDispatcher:
    topic: str
    name: str
    type: str
    dispatch: str
    config: Any
    # reliable topics only
    log: Any = None
    log_lane: Any = None      # the LogActor's LaneAddress: catch-up reads go over it
    cursor: Any = None        # {"floor", "acked"} from disk, or None for a new subscription
    start_offset: int = 0     # where a new subscription starts
    end_offset: int = 0       # the topic's next offset now
    options: Any = None       # ack_timeout_ms, max_redeliveries, dead_letter_topic
    broker: Any = None        # where dead letters are published
    incarnation: int = 0      # echoed in DispatcherReady


@dataclass(frozen=True)
class AddConsumer:
    consumer_id: int
    name: str
    transport: str    # ident of the consumer's shard (its lane)
    reply_to: Any     # the ConnectionActor, told ConsumerOpened
    rid: int
    replaces: Any     # consumer id taken over, or None
    max_unacked: Any = None


@dataclass(frozen=True)
class RemoveConsumer:
    consumer_id: int
    cause: str = "closed"     # of its consumer_detached event (docs/protocol.md, "Events")


@dataclass(frozen=True)
class DeadLettered:
    """From the dead-letter topic: the dead letter `token` (its offset here) is receipted there
    (durable), or was refused (`ok` False: it is sent again)."""
    token: int
    ok: bool


@dataclass(frozen=True)
class CloseAll:
    """Tell every consumer it is closed for `reason`, then send `then_tell_topic` (if any) to the
    topic. `quietly`: consumers forgotten without that push (the one that unsubscribed: its
    connection answers it), and their unacknowledged messages go to nobody."""
    reason: str
    then_tell_topic: Any
    quietly: tuple = ()


@dataclass(frozen=True)
class LogMoved:
    """The topic's LogActor was restarted: read and save through `log` from now on."""
    log: Any
    lane: Any
    end_offset: int


@dataclass(frozen=True)
class DispatcherStatsRequest:
    token: int
    topic_pending: int   # records the topic holds for us, not sent yet


@dataclass(frozen=True)
class ProbeHolder:
    """From the SubscriptionActor: an exclusive subscribe met this holder; ask its shard, through
    its ConnectionActor, whether its connection is still up; answered subscription.HolderProbed."""
    token: int
    consumer_id: int


@dataclass(frozen=True)
class FlushCursor:
    """From the topic while the broker stops cleanly (after its clients are gone): save the
    cursor now, not CURSOR_SAVE_DELAY later, and answer CursorFlushed once it is on disk."""
    token: int


@dataclass(frozen=True)
class CursorFlushed:
    token: int


class DispatcherActor(BrokerActor):
    process_name = "ab-disp"
    init_message = InitDispatcher

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.topic = None
        self.topic_name = None
        self.name = self.type = self.dispatch = None
        self.policy = None
        self.msgs_out = 0
        self.dropped = 0
        self.reliable = False
        self.key_order = False
        self.reactor = Reactor(linger=RECORD_PATH_LINGER_S)
        self.hub = None
        self.shard_lanes = {}      # shard ident -> Lane
        self.lost_shards = set()   # idents of shards whose lane ended (a shard is never reused)
        self.subscription = None   # the SubscriptionActor, told of consumers lost with a shard
        self.parent_pid = os.getppid()
        # reliable state
        self.log = None
        self.log_lane = None
        self.broker = None
        self.cursor = None
        self.read_pos = 0          # next offset to bring into memory
        self.end = 0               # the topic's next offset, as far as we know
        self.reading = False
        self.unacked = {}          # offset -> (consumer id, record, deadline or None)
        self.unacked_by = {}       # consumer id -> its offsets in `unacked` (a leaver's, without a scan)
        self.requeue_due = []      # records to redeliver, put back together at the next pump: a
                                   # burst of leavers (a client of 2,000 consumers killed) merged
                                   # into the backlog once, not once each (quadratic)
        self.redelivery_count = {} # offset -> times redelivered
        self.delayed = {}          # offset -> record waiting for a nack delay
        self.options = {}
        self.redelivered = 0
        self.dead_lettered = 0
        self.cursor_saving = False
        self.cursor_dirty = False
        self.acks_waiting = []       # (lane, consumer id, rid) of acks in the save in flight
        self.acks_waiting_next = []  # ... and of acks for the next save
        self.flush_waiters = []      # (address, token) of FlushCursor: answered once nothing is unsaved
        self.timeout_tick = False
        self.save_scheduled = False
        # operability: events, and what metrics count beyond the stats
        self.events = None
        self.metrics_on = False
        self.bytes_out = 0
        self.promotions = 0
        self.promoted = None     # consumer id: promoted at a takeover, its first records not yet written
        self.polling = False     # reading the lanes: _pump waits until they have all been read
        self.pump_due = False
        self.paperwork_due = False
        self.replaced = 0
        self.cleanup_time = Histogram()
        self.route_checks = set()   # consumer ids opened since the last route check
        self.dead_letters = {}      # offset -> (record, when sent): dead letters not receipted yet
        self.dead_letter_check = False
        self.route_check_due = False

    def watch(self):
        return ThespianWatch([self.reactor.fileno()]) if self.hub is not None else None

    def on_InitDispatcher(self, msg, sender):
        self.topic = sender
        self.topic_name = msg.topic
        self.name, self.type, self.dispatch = msg.name, msg.type, msg.dispatch
        self.node = msg.config.node
        # each DELIVER batch bounded in bytes: DELIVER_WINDOW of them fit in what a client's
        # outbox may hold beyond its shard's high water (config.delivery_batch_bytes)
        self.policy = make_policy(msg.type, msg.config.max_backlog,
                                  delivery_batch_bytes(msg.config.max_pending_bytes, DELIVER_WINDOW))
        # Memory bounds are counts of records (max_backlog, RELIABLE_BUFFER), and bytes too: the
        # count is lowered to what max_backlog_bytes holds at the records' recent mean size (10,000
        # records of 4 MiB would be 40 GB for one subscription whose consumer does not read).
        self.max_backlog, self.max_backlog_bytes = msg.config.max_backlog, msg.config.max_backlog_bytes
        self.record_bytes = 0.0   # mean size of a record lately (run_bytes); 0: none seen yet
        # reliable key_shared: the policy keeps a key that moved in order (KeySharedPolicy.hold)
        self.key_order = msg.dispatch == "reliable" and isinstance(self.policy, KeySharedPolicy)
        self.max_unacked_cap = msg.config.max_unacked_per_consumer
        self.events = msg.config.events
        self.metrics_on = msg.config.metrics is not None
        self.start_reports(msg.config.metrics)
        self.hub = LaneHub(self.reactor, self._lane_frame, self._lane_closed,
                           kind=msg.config.lanes, host=msg.config.actor_host,
                           secret=signing.lane_secret())
        self.send(self.topic, topic.DispatcherReady(self.name, msg.incarnation, self.hub.listen()))
        if msg.dispatch == "reliable":
            self.reliable = True
            self.log = msg.log
            self._connect_log(msg.log_lane)
            self.options = msg.options or {}
            self.broker = msg.broker
            state = msg.cursor or {"floor": msg.start_offset, "acked": []}
            self.cursor = Cursor(state["floor"], state.get("acked", ()))
            self.read_pos = self.cursor.floor
            self.end = msg.end_offset
            self._save_cursor()
            self._refill()

    def on_WatchMessage(self, msg, sender):
        # Every lane ready in one epoll batch first, then one pump: records read in the same
        # wakeup as a DETACH go to the consumer that takes over, not to the one that is gone.
        sends = self.thespian_sends
        if self.reactor.outside is None:   # idle in our epoll, Thespian's sockets included
            self.reactor.outside = thespian_waits(self)

        def batch_done():   # after each batch, also while the reactor lingers
            self.polling = False
            if self.pump_due:
                self._pump()
            self.polling = True
            quiet = self.quiet_since(sends) and not self.paperwork_due
            self.paperwork_due = False   # an expedited takeover's messages end the lingering too
            return quiet
        self.polling = True
        try:
            self.reactor.poll(quiet=batch_done)
        finally:
            self.polling = False
        if self.pump_due:
            self._pump()

    # --- lanes --------------------------------------------------------------------------------------
    def _lane_frame(self, lane, frame):
        op = frame[0]
        if op == LaneOp.DISPATCH:   # [DISPATCH, runs, dropped?]: dropped by the topic, for us to count
            if len(frame) > 2:
                self.dropped += frame[2]
            self._take_batch(lane, frame[1])
        elif op == LaneOp.FLOW:
            self._flow(frame[1], frame[2])
        elif op == LaneOp.DELIVER_ACK:
            consumer = self.policy.consumers.get(frame[1])
            if consumer is not None:
                consumer.in_flight -= 1
                consumer.stalled = False
                if self.promoted == consumer.id:
                    # its first records are written: now the paperwork
                    self.expedite("members-lost")
                    self.promoted = None
                    self.paperwork_due = True
                self._pump()
        elif op == LaneOp.ACK:
            self._ack(lane, frame[1], frame[2], frame[3])
        elif op == LaneOp.NACK:
            self._nack(frame[1], frame[2], frame[3])
        elif op == LaneOp.DETACH:
            self._detached(frame[1], frame[2] if len(frame) > 2 else None, frame[3] if len(frame) > 3 else None)
        elif op == LaneOp.UNDELIVERED:
            self._undelivered(frame[1], frame[2])
        elif op == LaneOp.PROBED:
            self._holder_probed(frame[2])
        elif op == LaneOp.ROUTED:
            self._routed(lane, frame[1])
        elif op == LaneOp.RECORDS:
            if lane is self.log_lane:
                self._log_records(frame[1], frame[2], frame[3], frame[4] if len(frame) > 4 else ())
        elif op == LaneOp.HELLO:
            if frame[1] == self.topic_name:
                lane.peer = ("topic", frame[1])
            else:
                lane.peer = ("shard", frame[1])
                self.shard_lanes[frame[1]] = lane
                self._pump()

    def _lane_closed(self, lane, reason):
        if lane.peer is None:
            return
        role, ident = lane.peer
        if role == "log":   # it died: the topic restarts it and sends LogMoved
            if lane is self.log_lane:
                self.log_lane = None
                self.reading = False
            return
        if role == "topic":
            if reason.startswith("bad frame"):   # the topic lives (our end refused its frame): we
                log.error("%s/%s: %s from the topic; ending this dispatcher", self.topic_name, self.name,
                          reason, extra={"topic": self.topic_name, "subscription": self.name})
            else:                                 # fail, the topic restarts or ends us as after a crash
                self._topic_lost()
            self.exit_self()
            return
        if self.shard_lanes.get(ident) is lane:
            del self.shard_lanes[ident]
        self.lost_shards.add(ident)
        self._drop([c.id for c in self.policy.consumers.values() if c.transport == ident], f"shard {ident}",
                   "connection_closed")

    def on_NodeLost(self, msg, sender):
        """From the topic: a member was declared lost. The consumers whose shards are on it go,
        as if those lanes had ended (a cut ends none: no EOF comes). The shards are not counted
        lost: one that was cut off may come back, the same, and open consumers here again."""
        self._drop([c.id for c in self.policy.consumers.values()
                    if cluster.node_of_shard(c.transport) == msg.node], f"node {msg.node}", "node_lost")

    def _drop(self, gone, where, cause):
        """Consumers whose connection is gone with `where`: failover promotes, reliable unacked
        messages are redelivered, the SubscriptionActor is told (an exclusive one is free)."""
        if gone:
            log.info("%s/%s: %s gone; removing its %d consumers", self.topic_name, self.name, where,
                     len(gone), extra={"topic": self.topic_name, "subscription": self.name, "consumer": gone})
            before = self._active_flags()
            for consumer_id in gone:
                # its connection named: the events actor holds the detach behind that connection_closed
                consumer = self.policy.consumers.get(consumer_id)
                self._forget(consumer_id, cause, consumer.connection
                             if consumer is not None and cause == "connection_closed" else None)
            self._announce_active(before)
            self._members_lost(gone)
            self._pump()

    def _members_lost(self, consumer_ids):
        # An ordered channel: a burst (10,000 clients killed at once) goes as one Thespian message.
        if self.subscription is not None:
            self.send_ordered(self.subscription, subscription.MembersLost(consumer_ids), "members-lost")

    def _topic_lost(self):
        """Our topic is gone (its lane ended, or our parent process died): say so to every
        consumer, over its lane, before we go too."""
        for consumer in list(self.policy.consumers.values()):
            lane = self.shard_lanes.get(consumer.transport)
            if lane is not None:
                lane.send([LaneOp.ENDED, consumer.id, "topic_lost"])
            self.policy.remove(consumer.id)

    def on_ActorExitRequest(self, msg, sender):
        if os.getppid() != self.parent_pid:
            self._topic_lost()
        # Acks still waiting for a cursor save are answered: every request with a rid gets one.
        for lane, consumer_id, rid in self.acks_waiting + self.acks_waiting_next:
            lane.send([LaneOp.REPLY, consumer_id, error_frame(
                E.UNKNOWN_CONSUMER, "the subscription ended before this ack was saved", rid), rid])
        self.acks_waiting, self.acks_waiting_next = [], []
        if self.hub is not None:
            self.hub.close()
            self.hub = None

    def _take_batch(self, lane, records):
        lane.send([LaneOp.DISPATCH_ACK])
        self._learn_size(records)
        if self.reliable:
            self._take_fresh(records)
        else:
            self.policy.max_backlog = self._in_memory(self.max_backlog)
            self.policy.enqueue(records)
        self._pump()

    def _learn_size(self, runs):
        count = sum(run[RUN_COUNT] for run in runs)
        if count:
            size = sum(map(run_bytes, runs)) / count
            self.record_bytes = size if not self.record_bytes else self.record_bytes + (size - self.record_bytes) / 4

    def _in_memory(self, records):
        """At most `records`, and what max_backlog_bytes holds of records of the recent size."""
        if not self.record_bytes:
            return records
        return min(records, max(MIN_IN_MEMORY, int(self.max_backlog_bytes / self.record_bytes)))

    def _connect_log(self, address):
        self.log_lane = None
        try:
            self.log_lane = self.hub.connect(address, peer=("log", None))
        except OSError:
            pass   # it died: the topic restarts it and sends LogMoved

    def on_LogMoved(self, msg, sender):
        self.log = msg.log
        self._connect_log(msg.lane)
        self.forget_ordered("log")   # a new receiver: its ordered channel starts from zero
        self.end = max(self.end, msg.end_offset)
        self.reading = False
        self.acks_waiting_next = self.acks_waiting + self.acks_waiting_next
        self.acks_waiting = []
        self.cursor_saving = False
        self._save_cursor()
        self._refill()

    # --- reliable: what is in memory, and reading the rest back -----------------------------------
    def _take_fresh(self, records):
        """New durable records: keep them if they continue what is in memory and there is room;
        otherwise they stay in the log until we read them back."""
        if not records:
            return
        last = records[-1]
        self.end = max(self.end, last[0] + last[RUN_COUNT])
        room = self._in_memory(RELIABLE_BUFFER) - self.policy.backlog_size()
        if records[0][0] == self.read_pos and room > 0 and not self.reading:
            keep, taken = [], 0
            for run in records:
                if taken >= room:
                    break
                if run[RUN_COUNT] > room - taken:
                    run = split_run(run, room - taken)[0]
                keep += self._not_acked(run)
                taken += run[RUN_COUNT]
                self.read_pos = run[0] + run[RUN_COUNT]
            self.policy.enqueue(keep)
        self._refill()

    def _not_acked(self, run):
        """The run, or the parts of it not acknowledged yet (one-record runs) when some are."""
        first, count = run[0], run[RUN_COUNT]
        cursor, acked = self.cursor, self.cursor.acked
        # look up the run's offsets, or scan the set, whichever is shorter: acks with holes (one
        # consumer holding a message while others ack thousands) make the set large
        if first >= cursor.floor and not (
                any(o in acked for o in range(first, first + count)) if count <= len(acked)
                else any(first <= o < first + count for o in acked)):
            return [run]
        return [one for one in explode_run(run) if not cursor.is_acked(one[0])]

    def _singles(self, entries):
        """One-record runs for (offset, run) pairs of delivered runs (redelivery): each run is
        split once, whatever number of its records come back."""
        split = {}
        out = []
        for offset, run in entries:
            ones = split.get(id(run))
            if ones is None:
                ones = split[id(run)] = (run, {one[0]: one for one in explode_run(run)})
            out.append(ones[1][offset])
        return out

    def _refill(self):
        if self.reading or self.read_pos >= self.end or self.log_lane is None:
            return
        limit = self._in_memory(RELIABLE_BUFFER)
        room = limit - self.policy.backlog_size()
        if room >= max(1, limit // 2):
            self.reading = True
            self.log_lane.send([LaneOp.READ, self.read_pos, self.read_pos, room, READ_MAX_BYTES])

    def _log_records(self, token, runs, first_offset, lost=()):
        """Runs read back from the log, from read_pos. A run none of whose records this
        subscription has seen (acked, delivered, or counted as redelivered before a restart of
        ours) is kept whole; the others are cut into their records and sorted out one by one."""
        self.reading = False
        if token != self.read_pos:
            return
        self._learn_size(runs)
        if first_offset > self.cursor.floor:   # retention removed what we had not acked
            self.cursor.skip_to(first_offset)
        for a, b in lost:   # offsets the log lost (corrupt batch, lost tail): never delivered, passed
            for offset in range(max(a, self.cursor.floor), b):
                if offset not in self.unacked and self.cursor.ack(offset):
                    self.cursor_dirty = True
        read_pos, cursor, unacked, counts = self.read_pos, self.cursor, self.unacked, self.redelivery_count
        seen = []
        if runs:
            end = runs[-1][0] + runs[-1][RUN_COUNT]
            seen = sorted(o for offsets in (cursor.acked, unacked, counts) for o in offsets if read_pos <= o < end)
        low = max(read_pos, cursor.floor)
        keep = []
        for run in runs:
            first = run[0]
            after = first + run[RUN_COUNT]
            if first >= low:
                i = bisect.bisect_left(seen, first)
                if i == len(seen) or seen[i] >= after:
                    keep.append(run)
                    continue
            fresh = []
            for one in explode_run(run):
                offset = one[0]
                if offset < read_pos or cursor.is_acked(offset) or offset in unacked:
                    continue
                if offset in counts:   # redelivered before a restart of ours: one by one
                    keep.append(with_run_redeliveries(one, counts[offset]))
                else:
                    fresh.append(one)
            keep += coalesce_runs(fresh)
        keep.sort(key=lambda r: r[0])
        self.policy.enqueue(keep)
        if runs:
            self.read_pos = max(self.read_pos, runs[-1][0] + runs[-1][RUN_COUNT])
        else:   # nothing on disk from read_pos: we are at the log's end, stop reading
            self.read_pos = max(self.read_pos, first_offset)
            self.end = self.read_pos
        self._pump()
        self._refill()

    # --- reliable: acks, nacks, redelivery ---------------------------------------------------------
    def _redeliver(self, records, to=None):
        """Put records back for delivery (to anyone, or for the consumer `to`), counted;
        dead-letter those past max_redeliveries."""
        again = []
        limit = self.options.get("max_redeliveries")
        for record in sorted(records, key=lambda r: r[0]):
            offset = record[0]
            if self.cursor.is_acked(offset):
                continue
            count = self.redelivery_count.get(offset, 0) + 1
            self.redelivery_count[offset] = count
            if limit is not None and count > limit and self.options.get("dead_letter_topic"):
                self._dead_letter(offset, record)
                continue
            again.append(with_run_redeliveries(record, count))
        if to is None:
            self.requeue_due += again
        else:
            self.policy.reserve(to, again)
        if again:
            emit(self, self.events, "redelivered", topic=self.topic_name, subscription=self.name,
                 count=len(again))

    def _dead_letter(self, offset, record):
        """A one-record run, published again with its payload, key, attrs and producer. Acked
        here only once the dead-letter topic has receipted it (DeadLettered): acked at once, a
        broker stopped (even cleanly) or killed before that append lost the message (a restart
        probe: 4-15 of 300 dead-lettered at a SIGTERM were in neither place). Until then it is
        neither queued nor unacknowledged here; a restart before it redelivers it (at least once:
        it may then be dead-lettered twice)."""
        payloads, keys, attrs = record[RUN_PAYLOADS], record[6], record[7]
        self.dead_letters[offset] = (record, time.monotonic())
        self.send(self.broker, broker.TopicRequest(
            self.options["dead_letter_topic"], "reliable",
            topic.Publish(0, record[RUN_PRODUCER], [[None, 1, payloads, keys, attrs, len(payloads)]],
                          self.myAddress, offset)))
        if not self.dead_letter_check:
            self.dead_letter_check = True
            self.wakeupAfter(DEAD_LETTER_RETRY, payload="dead-letter-retry")

    def on_DeadLettered(self, msg, sender):
        entry = self.dead_letters.get(msg.token)
        if entry is None:
            return
        if not msg.ok:   # refused (its log restarting, the disk full): again at the next check
            self.dead_letters[msg.token] = (entry[0], float("-inf"))
            return
        del self.dead_letters[msg.token]
        self.dead_lettered += 1
        self._acknowledge(msg.token)
        self._save_cursor_soon()

    def _retry_dead_letters(self):
        self.dead_letter_check = False
        due = time.monotonic() - DEAD_LETTER_RETRY.total_seconds()
        for offset, (record, sent) in list(self.dead_letters.items()):
            if sent <= due:
                self._dead_letter(offset, record)
        if self.dead_letters and not self.dead_letter_check:
            self.dead_letter_check = True
            self.wakeupAfter(DEAD_LETTER_RETRY, payload="dead-letter-retry")

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
        for lane, consumer_id, rid in self.acks_waiting:   # their acks are on disk now (or not: say so)
            if msg.error is None:
                self._answer_ack(lane, consumer_id, rid)
            else:
                lane.send([LaneOp.REPLY, consumer_id, error_frame(   # OVERLOADED: the disk refused
                    msg.code or E.INTERNAL, f"the ack is not durable: cursor save failed ({msg.error}); ack again", rid), rid])
        self.acks_waiting = []
        if msg.error is not None:
            self.cursor_dirty = True   # tried again with the next ack, or within CURSOR_SAVE_DELAY
        if self.flush_waiters:
            self._flush_cursor()
        elif self.cursor_dirty:
            self._save_cursor_soon()

    def on_FlushCursor(self, msg, sender):
        self.flush_waiters.append((sender, msg.token))
        self._flush_cursor()

    def _flush_cursor(self):
        """Save what is unsaved now; answer the FlushCursor waiters once nothing is."""
        if self.cursor is not None and (self.cursor_saving or self.cursor_dirty):
            if not self.cursor_saving:
                self._save_cursor()
            return
        waiters, self.flush_waiters = self.flush_waiters, []
        for address, token in waiters:
            self.send(address, CursorFlushed(token))

    def _save_cursor_soon(self):
        """Acks that asked for an answer (a rid) are saved at once; the others within
        CURSOR_SAVE_DELAY, together: a cursor save is an fsync and a rename in the LogActor, in
        series with the appends, and a consumer acking every 100 messages must not cost one save
        each (a crash then redelivers at most what was acked in that interval: at least once)."""
        if self.acks_waiting_next:
            self._save_cursor()
        elif not self.save_scheduled and not self.cursor_saving:
            self.save_scheduled = True
            self.wakeupAfter(CURSOR_SAVE_DELAY, payload="cursor-save")

    def _schedule_timeouts(self):
        timeout = self.options.get("ack_timeout_ms")
        if timeout and self.unacked and not self.timeout_tick:
            self.timeout_tick = True
            # bounded here too: a timer past 2^31 ms overflows in Thespian's loop (and kills us)
            self.wakeupAfter(timedelta(milliseconds=max(20, min(timeout, MAX_DELAY_MS) // 4)),
                             payload="ack-timeout")

    def on_WakeupMessage(self, msg, sender):
        if msg.payload == "cursor-save":
            self.save_scheduled = False
            if self.cursor_dirty:
                self._save_cursor()
        elif msg.payload == "ack-timeout":
            self.timeout_tick = False
            now = time.monotonic()
            expired = [o for o, (_, _, deadline) in self.unacked.items() if deadline and deadline <= now]
            self._return_unacked(expired)
            self._take_back_stalled(now)
            self._pump()
            self._schedule_timeouts()
        elif msg.payload == "route-check":
            self._check_routes()
        elif msg.payload == "dead-letter-retry":
            self._retry_dead_letters()
        elif isinstance(msg.payload, tuple) and msg.payload[0] == "nack":
            records = [self.delayed.pop(o) for o in msg.payload[1] if o in self.delayed]
            self._redeliver(records)
            self._pump()

    def _take_back_stalled(self, now):
        """A consumer whose shard has not taken its delivery within the ack timeout (its client does
        not read: the shard holds the DELIVER_ACK while its outbox is full) is given nothing more
        until it does, and what it was given and not sent goes back to the others (shared; key_shared:
        its keyless records). Those never reached a socket, so no ack timeout ran for them: they
        were held for as long as the client kept its connection alive."""
        for consumer in self.policy.consumers.values():
            if consumer.in_flight and not consumer.stalled and consumer.deliver_deadline is not None \
                    and consumer.deliver_deadline <= now:
                consumer.stalled = True
                self.policy.take_back(consumer.id)

    def _return_unacked(self, offsets, to=None):
        """Redeliver (to anyone, or to the consumer `to`) what these offsets' holders had."""
        self._redeliver(self._singles(self._pop_unacked(offsets)), to)

    def _pop_unacked(self, offsets):
        entries = []
        for offset in offsets:
            entry = self.unacked.pop(offset, None)
            if entry is None:
                continue
            self._unheld(entry[0], offset)
            consumer = self.policy.consumers.get(entry[0])
            if consumer is not None:
                consumer.unacked -= 1
            if self.key_order:
                self.policy.release(entry[0], entry[1])
            entries.append((offset, entry[1]))
        return entries

    # --- membership, told by the SubscriptionActor -----------------------------------------------
    def on_AddConsumer(self, msg, sender):
        self.subscription = sender
        if msg.transport in self.lost_shards:   # its shard died before it got here
            self._members_lost([msg.consumer_id])
            return
        before = self._active_flags()
        handed_over = []
        if msg.replaces is not None:
            self.replaced += msg.replaces in self.policy.consumers
            if self.reliable and msg.replaces in self.policy.consumers:
                # its unacknowledged messages go to the new one (PROTOCOL.md), not to whoever
                # has credit first (shared): taken before the old one's removal returns them
                handed_over = self._pop_unacked(self._unacked_of(msg.replaces))
            self._close(msg.replaces, "replaced")
        consumer = ConsumerState(msg.consumer_id, msg.name, msg.transport, msg.reply_to,
                                 connection=msg.rid[0] if isinstance(msg.rid, tuple) else None)
        if self.reliable:
            consumer.tracks_acks = True
            consumer.max_unacked = min(msg.max_unacked or DEFAULT_MAX_UNACKED, self.max_unacked_cap)
        self.policy.add(consumer)
        if handed_over:
            self._redeliver(self._singles(handed_over), to=consumer.id)
        emit(self, self.events, "consumer_attached", topic=self.topic_name, subscription=self.name,
             consumer=msg.consumer_id, consumer_name=msg.name, connection=consumer.connection)
        # The client hears `subscribed` and its first `active` with ConsumerOpened; the changes
        # after, over the shard's lane once the shard has it (ROUTED), in order with its records.
        consumer.told = self.policy.is_active(msg.consumer_id)
        self.send_ordered(msg.reply_to, connection.ConsumerOpened(
            msg.rid, msg.consumer_id, sender, self.topic, self.hub.address, self.dispatch,
            consumer.told, self.node, (self.topic_name, self.name, msg.name)), ("owner", str(msg.reply_to)))
        self.route_checks.add(msg.consumer_id)
        if not self.route_check_due:
            self.route_check_due = True
            self.wakeupAfter(ROUTE_CHECK_AFTER, payload="route-check")
        self._announce_active(before, skip=msg.consumer_id)
        if self.reliable and before is not None and before != self._active_flags():
            # failover, a consumer that sorts first came: the demoted one's unacked messages go
            # to it, in order, as in Pulsar (the standby may still ack them: acks are for all)
            self._return_unacked(self._unacked_of(before))
        self._pump()

    def on_RemoveConsumer(self, msg, sender):
        before = self._active_flags()
        self._forget(msg.consumer_id, msg.cause)
        self._announce_active(before)
        self._pump()

    def on_SubscriptionIdle(self, msg, sender):
        """From the SubscriptionActor, after the removals it sent before (see its _idle_check)."""
        self._tell_topic_before_the_end(msg)

    def _tell_topic_before_the_end(self, msg):
        """The topic may end us when it hears `msg`: our lazy events (the consumer_detached just
        decided) go now, with it. Sent while the ActorExitRequest is handled, they were lost now
        and then (a watcher never saw that consumer_detached; the same Thespian hazard as in
        BrokerActor.exit_self)."""
        self.expedite("events")
        self.send(self.topic, msg)

    def _detached(self, consumer_id, detected, connection_id=None):
        """Its connection ended: the shard says so over the lane, ahead of the ConnectionActor's
        detach (which then finds nothing to do). The consumer that takes over is told over its
        lane (`active`) and gets the records; the Thespian messages about it (the
        SubscriptionActor's MembersLost, events) are lazy: they go once the shard has written its
        first records (its DELIVER_ACK), or LAZY_S later. Sent with that delivery, they took the
        CPU it needed on its way through the shard: 0.4-1 ms of a takeover."""
        if consumer_id in self.policy.consumers:
            before = self._active_flags()
            self._forget(consumer_id, "connection_closed", connection_id)
            self._announce_active(before, promoted=True)
            if self.subscription is not None:
                # exclusive: nobody takes over, and a newcomer's subscribe must not be refused
                # CONSUMER_BUSY by a SubscriptionActor that has not heard yet (stats, here, no
                # longer show the holder): tell it now
                self.send_ordered(self.subscription, subscription.MembersLost([consumer_id]), "members-lost",
                                  lazy=self.type != "exclusive")
            self._pump()
            if detected is not None:   # detection (in the shard) to cleanup (here, done now)
                self.cleanup_time.observe(max(0.0, time.time() - detected))

    def undeliverable(self, address, msgs):
        """A message to a consumer's ConnectionActor did not reach it: that actor is dead, and
        with it its shard and every connection of it. A consumer it had just opened (its
        ConsumerOpened is what failed) was never routed in the shard, whose lane to us may never
        have existed: no lane EOF and no ConnectionClosed will ever remove it, and an exclusive
        subscription stayed held for good. Every consumer that connection actor owned goes now,
        as if its connection had closed."""
        gone = str(address)
        for consumer_id in [c.id for c in self.policy.consumers.values() if str(c.owner) == gone]:
            log.info("%s/%s: consumer %s: its connection actor is gone; removing it", self.topic_name,
                     self.name, consumer_id, extra={"topic": self.topic_name, "subscription": self.name})
            self._detached(consumer_id, None)

    def on_ProbeHolder(self, msg, sender):
        consumer = self.policy.consumers.get(msg.consumer_id)
        if consumer is None:   # gone already: decide on what is known
            self._holder_probed(msg.token)
            return
        # Through its ConnectionActor, on the channel of its ConsumerOpened: a holder whose client
        # hung up before that answer arrived was never routed in the shard, which alone cannot
        # tell it from a live one. The shard answers over our lane (PROBED), after its DETACH.
        self.send_ordered(consumer.owner, connection.ProbeConsumer(msg.consumer_id, msg.token, self.hub.address),
                          ("owner", str(consumer.owner)))

    def _check_routes(self):
        """Consumers opened ROUTE_CHECK_AFTER ago or more that their shard has not routed: their
        ConnectionActor got the ConsumerOpened and died before its shard had the route (killed,
        or with its listener), or is slow. Asked through it (ProbeConsumer, as for an exclusive
        holder): a dead one fails the send (undeliverable: removed), a live one's shard answers
        DETACH if the connection is gone, PROBED if routed."""
        self.route_check_due = False
        waiting, self.route_checks = self.route_checks, set()
        for consumer_id in waiting:
            consumer = self.policy.consumers.get(consumer_id)
            if consumer is not None and not consumer.routed:
                self.send_ordered(consumer.owner, connection.ProbeConsumer(consumer_id, None, self.hub.address),
                                  ("owner", str(consumer.owner)))

    def _holder_probed(self, token):
        # on the channel of MembersLost: a holder the probe found gone is forgotten first
        if token is None:   # a route check's (_check_routes): nothing waits for it
            return
        if self.subscription is not None:
            self.send_ordered(self.subscription, subscription.HolderProbed(token), "members-lost")

    def _undelivered(self, consumer_id, runs):
        """Records sent to a consumer whose connection had already ended: no socket took them. A
        non_reliable subscription gives them to the consumers it has now, ahead of the rest (at
        most once still holds: nobody had them), unless one of those has had a newer record
        meanwhile (then they would arrive out of order: dropped, as before). A reliable one
        counted them unacked by the gone consumer, and redelivered them when it detached."""
        consumer = self.policy.consumers.get(consumer_id)
        if consumer is not None:   # still ours (a stale lane): only the DELIVER_ACK it stands for
            consumer.in_flight -= 1
            consumer.stalled = False
        elif not self.reliable:
            count = sum(run[RUN_COUNT] for run in runs)
            self.msgs_out -= count
            newest = max((c.last_offset for c in self.policy.consumers.values()), default=-1)
            if runs and newest < min(run[0] for run in runs):
                self.policy.requeue(runs)
            else:   # a consumer has had newer ones since: these would come out of order
                self.dropped += count
        self._pump()

    def on_CloseAll(self, msg, sender):
        # The subscription ends (deleted with its topic, unsubscribed, or lost): what its consumers
        # held unacknowledged is not redelivered here (nor counted as such, nor dead-lettered);
        # a reliable one restarted after a loss has it from its durable cursor
        for consumer_id in msg.quietly:
            self._forget(consumer_id, msg.reason, requeue=False)
        for consumer_id in list(self.policy.consumers):
            self._close(consumer_id, msg.reason, requeue=False)
        if msg.then_tell_topic is not None:
            self._tell_topic_before_the_end(msg.then_tell_topic)

    def _close(self, consumer_id, reason, requeue=True):
        consumer = self.policy.consumers.get(consumer_id)
        if consumer is not None:
            self.send_ordered(consumer.owner, connection.ConsumerEnded(consumer_id, reason, self.node),
                              ("owner", str(consumer.owner)))
            self._forget(consumer_id, reason, requeue=requeue)

    def _forget(self, consumer_id, cause, connection_id=None, requeue=True):
        # non_reliable: as _undelivered, no consumer sees ids go backwards
        consumer = self.policy.remove(consumer_id, drop_stale=not self.reliable)
        if self.policy.discarded:
            self.dropped += self.policy.discarded
            self.policy.discarded = 0
        if consumer is not None:   # (naming the connection whose end caused it: the events actor
            # keeps it behind that connection_closed)
            emit(self, self.events, "consumer_detached", topic=self.topic_name, subscription=self.name,
                 consumer=consumer_id, consumer_name=consumer.name, cause=cause,
                 **({"connection": connection_id} if connection_id is not None else {}))
        if consumer is not None and self.reliable and requeue:
            # its unacknowledged messages go back to the subscription, counted as redelivered
            self._return_unacked(self._unacked_of(consumer_id))

    def _unacked_of(self, consumer_id):
        unacked = self.unacked
        return sorted(o for o in self.unacked_by.get(consumer_id, ()) if unacked.get(o, (None,))[0] == consumer_id)

    def _unheld(self, consumer_id, offset):
        held = self.unacked_by.get(consumer_id)
        if held is not None:
            held.discard(offset)
            if not held:
                del self.unacked_by[consumer_id]

    def _active_flags(self):
        """Failover: the id of the active consumer (None: none, or not a failover subscription)."""
        if not isinstance(self.policy, FailoverPolicy):
            return None
        active = self.policy.active()
        return active.id if active is not None else None

    def _announce_active(self, before, skip=None, promoted=False):
        """Failover: push `active` to the consumers whose state changed (at most two), over their
        shards' lanes, ahead of any record sent to them after it. One its shard does not have
        yet is told when the shard says ROUTED (it can have no records before: no credits).
        promoted: a takeover, whose paperwork waits for the new active consumer's first records."""
        if not isinstance(self.policy, FailoverPolicy):
            return
        now = self._active_flags()
        if now == before:
            return
        if before is not None and now is not None:   # the active one changed to another
            self.promotions += 1
            emit(self, self.events, "promoted", topic=self.topic_name, subscription=self.name,
                 consumer=now, consumer_name=self.policy.consumers[now].name)
        for consumer_id in (before, now):
            consumer = self.policy.consumers.get(consumer_id)
            if consumer is not None and consumer_id != skip:
                self._tell_active(consumer)
        if promoted:
            self.promoted = now

    def _tell_active(self, consumer):
        flag = self.policy.is_active(consumer.id)
        lane = self.shard_lanes.get(consumer.transport) if consumer.routed else None
        if lane is not None and flag != consumer.told:
            lane.send([LaneOp.ACTIVE, consumer.id, flag])
            consumer.told = flag

    def _routed(self, lane, consumer_id):
        consumer = self.policy.consumers.get(consumer_id)
        if consumer is not None and self.shard_lanes.get(consumer.transport) is lane:
            consumer.routed = True
            if isinstance(self.policy, FailoverPolicy):
                self._tell_active(consumer)   # a change since its ConsumerOpened

    # --- from the consumers' transports ---------------------------------------------------------
    def _flow(self, consumer_id, credits):
        consumer = self.policy.consumers.get(consumer_id)
        if consumer is not None:   # credits add up, to a bound any client can read back in stats
            consumer.credits = min(consumer.credits + credits, MAX_TOTAL_CREDITS)
            self._pump()

    def _ack(self, lane, consumer_id, ids, rid):
        if not self.reliable:  # non_reliable: nothing is kept for redelivery, nothing to release
            self._answer_ack(lane, consumer_id, rid)
            return
        # One ack frame names many offsets, mostly in order and of one consumer: count per
        # consumer, and move the cursor's floor without its set when the next offset is acked.
        unacked, cursor, counts = self.unacked, self.cursor, {}
        for offset in ids:
            entry = unacked.pop(offset, None)
            if entry is not None:
                counts[entry[0]] = counts.get(entry[0], 0) + 1
                self._unheld(entry[0], offset)
                if self.key_order:
                    self.policy.release(entry[0], entry[1])
            elif offset in self.redelivery_count or offset in self.delayed:
                self.delayed.pop(offset, None)   # waiting for redelivery: acked by anyone, for all
            else:
                continue
            if self.redelivery_count:
                self.redelivery_count.pop(offset, None)
            if offset == cursor.floor and not cursor.acked:
                cursor.floor += 1
                self.cursor_dirty = True
            elif cursor.ack(offset):
                self.cursor_dirty = True
        for holder_id, count in counts.items():   # not consumer_id: that one gets the answer
            holder = self.policy.consumers.get(holder_id)
            if holder is not None:
                holder.unacked -= count
        if self.cursor_dirty:
            if rid is not None:
                self.acks_waiting_next.append((lane, consumer_id, rid))
            self._save_cursor_soon()
        else:
            self._answer_ack(lane, consumer_id, rid)
        self._pump()

    @staticmethod
    def _answer_ack(lane, consumer_id, rid):
        if rid is not None:
            lane.send([LaneOp.REPLY, consumer_id, encode_frame({"op": "ok", "rid": rid}), rid])

    def _nack(self, consumer_id, ids, delay_ms):
        if not self.reliable:
            return  # non_reliable: nothing is redelivered
        # Only what this consumer holds (as in Pulsar): another consumer's nack of a message it is
        # still working on would have it processed twice. (An ack is for the whole subscription.)
        # An id given twice counts once.
        unacked = self.unacked
        offsets = [o for o in dict.fromkeys(ids) if unacked.get(o, (None,))[0] == consumer_id]
        if not delay_ms:
            self._return_unacked(offsets)
        else:
            entries = []
            for offset in offsets:
                consumer_id, run, _ = self.unacked.pop(offset)
                self._unheld(consumer_id, offset)
                consumer = self.policy.consumers.get(consumer_id)
                if consumer is not None:
                    consumer.unacked -= 1
                if self.key_order:   # (nacked with a delay: its key's order is the client's to give up)
                    self.policy.release(consumer_id, run)
                entries.append((offset, run))
            for record in self._singles(entries):
                self.delayed[record[0]] = record
            self.wakeupAfter(timedelta(milliseconds=min(delay_ms, MAX_DELAY_MS)), payload=("nack", tuple(offsets)))
        self._pump()

    def _pump(self):
        if self.polling:   # once the lanes ready now have been read (on_WatchMessage)
            self.pump_due = True
            return
        self.pump_due = False
        if self.requeue_due:
            again, self.requeue_due = self.requeue_due, []
            self.policy.requeue(sorted(again, key=lambda r: r[0]))
        deadline = None
        if self.reliable and self.options.get("ack_timeout_ms"):
            deadline = time.monotonic() + self.options["ack_timeout_ms"] / 1000.0
        for consumer, records in self.policy.take():
            taken = sum(run[RUN_COUNT] for run in records)
            if self.reliable:   # every record tracked until acked (by offset, with its run)
                records = [part for run in records for part in self._not_acked(run)]
                count = sum(run[RUN_COUNT] for run in records)
                # counted as sent again, not as put back (one acked meanwhile is not redelivered)
                self.redelivered += sum(run[RUN_COUNT] for run in records if run[RUN_REDELIVERIES])
                consumer.credits += taken - count   # acked while waiting: not sent
                consumer.unacked -= taken - count
                unacked, cid = self.unacked, consumer.id
                held = self.unacked_by.setdefault(cid, set())
                for run in records:
                    entry = (cid, run, deadline)
                    for offset in range(run[0], run[0] + run[RUN_COUNT]):
                        unacked[offset] = entry
                    held.update(range(run[0], run[0] + run[RUN_COUNT]))
                    if self.key_order:   # (key_shared runs are of one record)
                        self.policy.hold(cid, run)
                if not records:
                    if not held:
                        del self.unacked_by[cid]
                    continue
                records = coalesce_runs(records)
            else:
                count = taken
            lane = self.shard_lanes.get(consumer.transport)
            if lane is None:   # credits only come over that lane: it was there a moment ago
                continue
            consumer.in_flight += 1
            consumer.deliver_deadline = deadline
            if not self.reliable:
                consumer.last_offset = max(run[0] + run[RUN_COUNT] for run in records) - 1
            consumer.msgs_out += count
            self.msgs_out += count
            if self.metrics_on:
                self.bytes_out += sum(len(run[RUN_PAYLOADS]) for run in records)
            lane.send([LaneOp.DELIVER, consumer.id, records])
        if self.reliable:
            self._schedule_timeouts()
            self._refill()
        else:
            self.dropped += self.policy.trim()  # non_reliable: what no credit can take, within bounds

    # --- stats ----------------------------------------------------------------------------------
    def on_DispatcherStatsRequest(self, msg, sender):
        consumers = [{"consumer": c.id, "name": c.name,
                      "active": self.policy.is_active(c.id) is not False,
                      # (shared and key_shared: records assigned to it, not yet sent, are backlog)
                      "credits": c.credits,
                      "unacked": c.unacked - self.policy.waiting(c.id) if self.reliable else 0,
                      "msgs_out": c.msgs_out}
                     for c in self.policy.consumers.values()]
        stats = {"name": self.name, "type": self.type, "backlog": self._backlog(msg.topic_pending),
                 "msgs_out": self.msgs_out, "dropped": self.dropped, "redelivered": self.redelivered,
                 "consumers": consumers, "poison_messages": self.poison_messages,
                 "gaps_skipped": self.gaps_skipped, "handler_errors": self.handler_errors}
        if self.reliable:
            stats["dead_lettered"] = self.dead_lettered
            stats["cursor"] = self.cursor.floor
        self.send(sender, topic.DispatcherStats(msg.token, stats))

    def _backlog(self, topic_pending=0):
        if self.reliable:  # everything not acknowledged and not out with a consumer
            return max(0, self.end - self.cursor.floor - len(self.cursor.acked) - len(self.unacked))
        return self.policy.backlog_size() + len(self.requeue_due) + topic_pending

    def metrics_snapshot(self, counters, gauges, histograms):
        topic_labels, labels = (self.topic_name,), (self.topic_name, self.name)
        counters[("actorbroker_topic_messages_out", topic_labels)] = self.msgs_out
        counters[("actorbroker_topic_bytes_out", topic_labels)] = self.bytes_out
        for name, value in (("messages_out", self.msgs_out), ("redelivered", self.redelivered),
                            ("dropped", self.dropped), ("dead_lettered", self.dead_lettered),
                            ("promotions", self.promotions)):
            counters[("actorbroker_subscription_" + name, labels)] = value
        counters[("actorbroker_disconnects", ("replaced",))] = self.replaced
        gauges[("actorbroker_subscription_backlog_messages", labels)] = self._backlog()
        gauges[("actorbroker_subscription_unacked_messages", labels)] = len(self.unacked)
        gauges[("actorbroker_subscription_consumers", labels)] = len(self.policy.consumers)
        histograms[("actorbroker_consumer_cleanup_seconds", ())] = self.cleanup_time.snapshot()
