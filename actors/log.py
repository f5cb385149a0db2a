"""LogActor: one per reliable topic; the only owner of the topic's files.

Appends batches of runs to the segment log and makes them durable per the broker's fsync setting
before answering (appends come over a lane from the topic: APPEND frames in, APPENDED or
APPEND_FAILED frames back; its EOF tells the topic that this actor died), serves reads over
the dispatchers' lanes (catch-up, redelivery after restart), and keeps the subscriptions' cursors. Blocking file I/O (fsync) is this actor's whole job, so it stalls no
one else: the topic keeps accepting sends meanwhile and merges them into the next append
(group commit).
"""
import errno
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from thespian.actors import ThespianWatch

from actorbroker.actors import signing
from actorbroker.actors.base import BrokerActor, log
from actorbroker.storage.fencing import Fenced
from actorbroker.storage.topic_store import TopicStore, topic_dir
from actorbroker.transport import errors as E
from actorbroker.transport.lanes import LaneHub, LaneOp, Reactor


# What the data directory's environment refuses is not a bug (INTERNAL) but work the broker cannot
# store: OVERLOADED (PROTOCOL.md: "broker refuses work it cannot buffer"), named after its cause.
STORAGE_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system", errno.EIO: "I/O error",
                  errno.EPERM: "not permitted", errno.EACCES: "permission denied",
                  errno.EMFILE: "too many open files", errno.ENFILE: "too many open files"}
ERROR_LOG_EVERY_S = 10.0   # a failing disk: one broker.log line, then a count this often


def storage_failure(exc):
    """(protocol code, text for the client) of an exception raised by the topic's files; the
    text names the cause, not the file (the broker log does)."""
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return E.OVERLOADED, f"{STORAGE_ERRNOS[exc.errno]}: {exc.strerror} ({errno.errorcode[exc.errno]})"
    return E.INTERNAL, str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class OpenLog:
    topic: str
    dispatch: str
    config: Any
    # in a shared folder (config.shared_data): (node, incarnation, live nodes or None), the
    # claim on the log's next epoch (storage/fencing.py); None: a node's own data folder
    claim: Any = None


@dataclass(frozen=True)
class LogFenced:
    """To the topic: another node holds the log (`owner`): at the open, or it took the log over
    since. Nothing more is written or receipted here."""
    owner: str


@dataclass(frozen=True)
class LogOpenFailed:
    """To the topic: the log could not be opened (`code`: OVERLOADED when the disk refused,
    storage_failure); nothing is open. The topic refuses what needs the log and may send OpenLog
    again (the same LogActor tries again)."""
    error: str
    code: str


@dataclass(frozen=True)
class LogOpened:
    lane: Any           # where the topic connects for appends
    next_offset: int
    first_offset: int
    cursors: dict
    truncated_bytes: int
    log_bytes: int
    segments: int
    corrupt_batches: int = 0   # corrupt batches skipped (storage/segment_log.py), and their bytes
    corrupt_bytes: int = 0


@dataclass(frozen=True)
class LogRetained:
    """To the topic: retention deleted segments between appends (their age ran out, or a cursor
    moved on), so its stats say what the log holds now."""
    log_bytes: int
    segments: int
    forced_deletions: int
    corrupt_batches: int = 0   # also sent when a read found a corrupt batch
    corrupt_bytes: int = 0


@dataclass(frozen=True)
class SaveCursor:
    subscription: str
    state: dict


@dataclass(frozen=True)
class CursorSaved:
    subscription: str
    error: Any = None    # why it was not saved (disk full, ...); None: it is on disk
    code: Any = None     # the protocol code the ack it answers gets (storage_failure); None: INTERNAL


@dataclass(frozen=True)
class LoadCursor:
    """Answered with topic.CursorLoaded: a subscription restarting from its durable cursor."""
    subscription: str


@dataclass(frozen=True)
class CursorLoaded:
    """The durable cursor of a subscription being restarted (None: it has none)."""
    subscription: str
    state: Any
    unopened: bool = False   # the log could not be opened: ask again once it is (LogOpened)


@dataclass(frozen=True)
class DeleteCursor:
    subscription: str


@dataclass(frozen=True)
class DestroyLog:
    pass


@dataclass(frozen=True)
class LogDestroyed:
    pass


class LogActor(BrokerActor):
    process_name = "ab-log"
    init_message = OpenLog

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.store = None
        self.config = None
        self.interval_s = None     # fsync every interval instead of before answering
        self.sync_scheduled = False
        self.floors = {}           # subscription -> cursor floor, for retention
        self.forced_deletions = 0
        self.reactor = Reactor()
        self.hub = None
        self.topic = None
        self.fenced = None         # the node that took the log over
        self.name = None
        self.open_failed = False   # the last OpenLog failed: nothing is open
        self.errors_quiet_until = 0.0   # storage errors are logged once per ERROR_LOG_EVERY_S ...
        self.errors_counted = 0         # ... and counted in between

    def watch(self):
        return ThespianWatch([self.reactor.fileno()]) if self.hub is not None else None

    def on_WatchMessage(self, msg, sender):
        self.reactor.poll()

    def on_OpenLog(self, msg, sender):
        self.config = msg.config
        mode = self.config.fsync
        if mode.startswith("interval:"):
            self.interval_s = int(mode.split(":", 1)[1]) / 1000.0
        self.topic = sender
        self.name = msg.topic
        if self.store is not None:   # (never: the topic asks again only after LogOpenFailed)
            return
        try:
            self.store = TopicStore(self.config.shared_data or self.config.data_dir, msg.topic, msg.dispatch,
                                    self.config.segment_bytes, msg.claim)
            cursors = self.store.cursors()
        except Fenced as exc:
            log.warning("topic %s: not opened here: %s", msg.topic, exc, extra={"topic": msg.topic})
            self.fenced = exc.owner
            self.send(sender, LogFenced(exc.owner))
            return
        except Exception as exc:   # ENOSPC, EPERM, EIO, ...: the topic must hear of it
            if self.store is not None:
                self.store.close()
            self.store = None
            self.open_failed = True
            code, text = self._storage_error("its log cannot be opened", exc)
            self.send(sender, LogOpenFailed(text, code))
            return
        self.open_failed = False
        self.floors = {name: state.get("floor", 0) for name, state in cursors.items()}
        log_ = self.store.log
        if log_.truncated_bytes:
            log.warning("topic %s: recovered, %d torn bytes truncated", msg.topic, log_.truncated_bytes,
                        extra={"topic": msg.topic})
        self.hub = LaneHub(self.reactor, self._lane_frame, lambda lane, reason: None,
                           kind=self.config.lanes, host=self.config.actor_host,
                           secret=signing.lane_secret())
        if self.config.retention_ms:   # age runs out on idle topics too
            self.wakeupAfter(self._retention_period(), payload="retain")
        self.send(sender, LogOpened(self.hub.listen(), log_.next_offset, log_.first_offset, cursors,
                                    log_.truncated_bytes,
                                    log_.size, len(log_.segments), log_.corrupt_batches, log_.corrupt_bytes))

    def _lane_frame(self, lane, frame):
        if frame[0] == LaneOp.APPEND:
            lane.send(self._append(*frame[1:]))
        elif frame[0] == LaneOp.READ:   # a dispatcher catching up
            log_ = self.store.log
            corrupt = log_.corrupt_batches
            runs = log_.read_runs(frame[2], frame[3], frame[4] if len(frame) > 4 else None)
            if log_.corrupt_batches != corrupt:   # found by this read: the topic's stats count it
                self.send(self.topic, LogRetained(log_.size, len(log_.segments), self.forced_deletions,
                                                  log_.corrupt_batches, log_.corrupt_bytes))
            end = runs[-1][0] + runs[-1][1] if runs else log_.next_offset
            # offsets the log lacks (corrupt batches skipped, a lost tail): the subscription moves past them
            lane.send([LaneOp.RECORDS, frame[1], runs, log_.first_offset, log_.lost_between(frame[2], end)])

    def _append(self, seq, first, runs, time_ms):
        if self.fenced is not None:
            return [LaneOp.APPEND_FAILED, seq, f"node {self.fenced} took this topic over; send it there",
                    first, E.TOPIC_UNAVAILABLE]
        log_ = self.store.log
        if first != log_.next_offset:  # after a failed append: refuse rather than renumber
            return [LaneOp.APPEND_FAILED, seq, "log position moved", log_.next_offset]
        try:
            log_.append_runs(runs, time_ms)
            if self.interval_s is None:
                log_.sync()
        except OSError as exc:   # disk full, I/O error: refuse, never receipt
            code, text = self._storage_error("log append failed", exc)
            return [LaneOp.APPEND_FAILED, seq, text, log_.next_offset, code]
        if self._fenced():   # after the fsync, before the receipt: storage/fencing.py says why
            return [LaneOp.APPEND_FAILED, seq, f"node {self.fenced} took this topic over; send it there",
                    log_.next_offset, E.TOPIC_UNAVAILABLE]
        if self.interval_s is not None and not self.sync_scheduled:
            self.sync_scheduled = True
            self.wakeupAfter(timedelta(seconds=self.interval_s), payload="sync")
        try:
            self._retain()
        except OSError as exc:   # the append is durable all the same: it is answered
            self._storage_error("retention failed", exc)
        return [LaneOp.APPENDED, seq, log_.size, len(log_.segments), self.forced_deletions]

    def _storage_error(self, what, exc):
        """(code, text) of a failure of the topic's files (storage_failure), logged as an ERROR:
        at once, then (a full disk fails every send, and broker.log is on it) counted, and the
        count logged every ERROR_LOG_EVERY_S."""
        code, text = storage_failure(exc)
        now = time.monotonic()
        if now >= self.errors_quiet_until:
            log.error("topic %s: %s: %s", self.name, what, exc if code == E.INTERNAL else f"{text}: {exc}",
                      extra={"topic": self.name})
            self.errors_quiet_until = now + ERROR_LOG_EVERY_S
        else:
            if not self.errors_counted:
                self.wakeupAfter(timedelta(seconds=self.errors_quiet_until - now), payload="errors")
            self.errors_counted += 1
        return code, text

    def _log_counted_errors(self):
        if self.errors_counted:
            log.error("topic %s: %d more storage failures in the last %.0f s (not logged one by one)",
                      self.name, self.errors_counted, ERROR_LOG_EVERY_S, extra={"topic": self.name})
            self.errors_counted = 0
            self.errors_quiet_until = time.monotonic() + ERROR_LOG_EVERY_S

    def _fenced(self):
        """Did another node claim the log since we opened it? Then tell the topic, once."""
        if self.fenced is None and self.store is not None:
            owner = self.store.fenced_by()
            if owner is not None:
                self.fenced = owner
                log.error("topic log taken over by node %s: fenced, nothing more is written here", owner)
                self.send(self.topic, LogFenced(owner))
        return self.fenced is not None

    def on_WakeupMessage(self, msg, sender):
        if msg.payload == "errors":
            self._log_counted_errors()
        elif msg.payload == "sync":
            self.sync_scheduled = False
            try:
                if self.store is not None:
                    self.store.log.sync()
            except OSError as exc:   # (receipted already: --fsync interval:MS says so)
                self._storage_error("log fsync failed", exc)
        elif msg.payload == "retain":
            self._retain_between_appends()
            self.wakeupAfter(self._retention_period(), payload="retain")

    def _retention_period(self):
        """How often an idle log looks at the age of its segments: a quarter of --retention-ms,
        between 0.2 s and a minute."""
        return timedelta(seconds=min(60.0, max(0.2, self.config.retention_ms / 4000.0)))

    def _retain_between_appends(self):
        """Retention with no append to carry its news: tell the topic when something went."""
        if self.store is None or self.fenced is not None:
            return
        log_ = self.store.log
        before = (log_.size, len(log_.segments), self.forced_deletions)
        try:
            self._retain()
        except OSError as exc:
            self._storage_error("retention failed", exc)
        after = (log_.size, len(log_.segments), self.forced_deletions)
        if after != before and self.topic is not None:
            self.send(self.topic, LogRetained(*after, log_.corrupt_batches, log_.corrupt_bytes))

    def on_SaveCursor(self, msg, sender):
        if self.store is None:   # destroyed (delete_topic): the cursor went with it, as wanted
            self.send(sender, CursorSaved(msg.subscription, "the topic's log was deleted"))
            return
        if self._fenced():
            self.send(sender, CursorSaved(msg.subscription, f"node {self.fenced} took this topic over"))
            return
        try:
            self.store.save_cursor(msg.subscription, msg.state)
        except Exception as exc:   # disk full, log destroyed, ...: the dispatcher waits for an answer
            code, text = self._storage_error(f"cursor of {msg.subscription} not saved", exc)
            self.send(sender, CursorSaved(msg.subscription, text, code))
            return
        self.floors[msg.subscription] = msg.state.get("floor", 0)
        self.send(sender, CursorSaved(msg.subscription))
        if self.config.retention_bytes or self.config.retention_ms:   # a cursor moved: maybe a segment is free
            self._retain_between_appends()

    # A cursor request may cross the topic's DestroyLog (an unsubscribe racing a delete_topic):
    # the log is gone with every cursor, which is what either request wanted.
    def on_LoadCursor(self, msg, sender):
        cursor = self.store.cursors().get(msg.subscription) if self.store is not None else None
        self.send(sender, CursorLoaded(msg.subscription, cursor, self.open_failed))

    def on_DeleteCursor(self, msg, sender):
        if self.store is not None:
            self.store.delete_cursor(msg.subscription)
        self.floors.pop(msg.subscription, None)

    def on_DestroyLog(self, msg, sender):
        if self.store is not None and self.fenced is None:   # a fenced owner deletes nothing
            self.store.destroy()
        elif self.open_failed and not self.config.shared_data:   # deleted all the same (its files)
            shutil.rmtree(topic_dir(self.config.data_dir, self.name), ignore_errors=True)
        self.store = None
        self.send(sender, LogDestroyed())

    def on_ActorExitRequest(self, msg, sender):
        if self.hub is not None:
            self.hub.close()
            self.hub = None
        if self.store is not None:
            self.store.close()

    def _retain(self):
        """Size and age retention: whole sealed segments, oldest first, only as many as bring the
        log under the size limit (deleting every free one emptied a log of 180 KB under a 200 KB
        limit down to 20 KB), never one a cursor still needs unless the log has grown past twice
        the limit (then only down to the limit again, counted in stats)."""
        log_ = self.store.log
        limit, max_age_ms = self.config.retention_bytes, self.config.retention_ms
        needed = min(self.floors.values(), default=log_.next_offset)

        def shrink(below):   # the oldest segment while over the limit and all of it below `below`
            while log_.size > limit and len(log_.segments) > 1 and log_.segments[1].first_offset <= below:
                log_.delete_before(log_.segments[1].first_offset)

        if limit and log_.size > limit:
            shrink(needed)
            if log_.size > 2 * limit:
                before = log_.first_offset
                shrink(log_.next_offset)
                if log_.first_offset > before:
                    self.forced_deletions += 1
                    log.warning("retention forced: deleted offsets below %d still needed by a "
                                "subscription", log_.first_offset)
        if max_age_ms:
            cutoff = time.time() * 1000 - max_age_ms
            while len(log_.segments) > 1 and log_.segments[0].last_time < cutoff \
                    and log_.segments[1].first_offset <= needed:
                log_.delete_before(log_.segments[1].first_offset)
