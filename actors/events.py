"""EventsActor: the broker's lifecycle event stream (the `watch` op, docs/protocol.md "Events").

Actors that decide something a watcher may see (a shard closing a connection, a dispatcher
promoting a consumer, a topic being deleted, ...) send it here as an `Event` with the wall-clock
time they decided it (actors/lifecycle.py). Events of different actors arrive in no promised order, so they
are held HOLD_S and released sorted by that time: the order in which the broker decided them.
Each watching connection gets the events its topic pattern matches, numbered by `seq`, written
through its shard like any other frame: a watcher that does not read fills its own outbox and is
closed with SLOW_CONSUMER by its shard; nothing here waits for it.
"""
import heapq
import itertools
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from fnmatch import fnmatchcase
from typing import Any

from actorbroker.actors import shard
from actorbroker.actors.base import BrokerActor
from actorbroker.transport.codec import encode_frame

# How long an event waits for events of other actors decided before it. Thespian messages take
# about a millisecond, ordered channels gather for 4 ms: 50 ms leaves room for a busy machine.
HOLD_S = 0.05
# A consumer_detached caused by its connection's end waits (at most this long) for that
# connection_closed when it has not arrived: in a burst of thousands of closes a shard sends its
# events later than HOLD_S, and the dispatchers' detaches, decided after them, came first.
CAUSE_WAIT_S = 2.0
CLOSED_MEMORY_S = 60.0   # connections whose connection_closed arrived, remembered this long
_RELEASE = "events-release"


@dataclass(frozen=True)
class Watch:
    """A connection watches (again: the pattern is replaced); answered `ok` by us, in order with
    the events that follow. rid None: the ConnectionActor resumes a watch with a new EventsActor."""
    connection_id: int
    rid: int
    pattern: str
    shard: Any


@dataclass(frozen=True)
class Unwatch:
    connection_id: int
    rid: Any             # None when the connection ended: no answer
    shard: Any


class _Watcher:
    __slots__ = ("pattern", "shard", "seq")

    def __init__(self, pattern, shard_address):
        self.pattern, self.shard, self.seq = pattern, shard_address, 0


class EventsActor(BrokerActor):
    process_name = "ab-events"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.watchers = {}            # connection id -> _Watcher
        self.held = []                # heap of (time, arrival, Event)
        self.arrival = itertools.count()
        self.release_due = False
        self.closed = {}              # connection id -> when its connection_closed arrived
        self.waiting = {}             # connection id -> [consumer_detached waiting for that close]
        self.first_detach = {}        # connection id -> the stamp of its first such detach, close not come
        # (topic, subscription) -> the connection whose close a detach of it waits for: the
        # subscription's later events (promoted, redelivered) wait behind that detach
        self.behind = {}

    def on_Watch(self, msg, sender):
        watcher = self.watchers.get(msg.connection_id)
        if watcher is None:
            watcher = self.watchers[msg.connection_id] = _Watcher(msg.pattern, msg.shard)
        watcher.pattern = msg.pattern
        if msg.rid is None:   # a watch resumed after this actor's predecessor died: say so
            watcher.seq += 1   # 1: the numbering starts again (the old seq died with it)
            self._write(watcher.shard, msg.connection_id, encode_frame(
                {"op": "event", "seq": watcher.seq, "time_ms": int(time.time() * 1000), "kind": "events_lost"}))
            return
        self._write(watcher.shard, msg.connection_id, encode_frame({"op": "ok", "rid": msg.rid}))

    def on_Unwatch(self, msg, sender):
        if msg.rid is None:   # the connection ended
            self.watchers.pop(msg.connection_id, None)
            return
        watcher = self.watchers.get(msg.connection_id)
        if watcher is not None:   # kept for its seq, which goes on if it watches again
            watcher.pattern = None
        self._write(msg.shard, msg.connection_id, encode_frame({"op": "ok", "rid": msg.rid}))

    def on_Event(self, msg, sender):
        if not self.watchers:
            return   # nobody to tell: nothing is kept
        connection_id = msg.fields.get("connection")
        if msg.kind == "connection_closed":
            self.closed[connection_id] = time.monotonic()
            # A close learnt late (its shard process died: the ConnectionActor hears it after
            # the dispatchers' lanes ended) is stamped before the detaches it caused, so that
            # it comes ahead of them and of what followed them (promoted, redelivered).
            first = self.first_detach.pop(connection_id, None)
            if first is not None and first <= msg.time:
                msg = replace(msg, time=first - 1e-6)
        elif msg.kind == "consumer_detached" and msg.fields.get("cause") == "connection_closed" \
                and connection_id is not None and connection_id not in self.closed:
            self.first_detach[connection_id] = min(msg.time, self.first_detach.get(connection_id, msg.time))
        heapq.heappush(self.held, (msg.time, next(self.arrival), msg))
        if not self.release_due:
            self.release_due = True
            self.wakeupAfter(timedelta(seconds=HOLD_S), payload=_RELEASE)

    def on_WakeupMessage(self, msg, sender):
        if msg.payload != _RELEASE:
            return
        self.release_due = False
        until = time.time() - HOLD_S
        while self.held and self.held[0][0] <= until:
            self._release(heapq.heappop(self.held)[2])
        now = time.monotonic()
        for connection_id, events in list(self.waiting.items()):   # their close never came
            if now - events[0][0] > CAUSE_WAIT_S:
                self.first_detach.pop(connection_id, None)
                self._release_waiting(connection_id)
        if len(self.closed) > 1024:
            self.closed = {c: t for c, t in self.closed.items() if now - t < CLOSED_MEMORY_S}
        if self.held or self.waiting:
            self.release_due = True
            delay = max(0.005, self.held[0][0] - until) if self.held else CAUSE_WAIT_S / 4
            self.wakeupAfter(timedelta(seconds=delay), payload=_RELEASE)

    def _release(self, event):
        """In stamp order, but a detach after the close that caused it (CAUSE_WAIT_S), and what
        its subscription decided after it (a promotion, a redelivery) after the detach."""
        connection_id = event.fields.get("connection")
        key = (event.fields.get("topic"), event.fields.get("subscription"))
        if event.kind == "consumer_detached" and event.fields.get("cause") == "connection_closed" \
                and connection_id is not None and connection_id not in self.closed:
            self.waiting.setdefault(connection_id, []).append((time.monotonic(), event))
            self.behind[key] = connection_id
            return
        waits_for = self.behind.get(key) if key[1] is not None else None
        if waits_for is not None and waits_for in self.waiting:
            self.waiting[waits_for].append((time.monotonic(), event))
            return
        self._publish(event)
        if event.kind == "connection_closed":
            self._release_waiting(connection_id)

    def _release_waiting(self, connection_id):
        """What waited for this connection's close (it came, or waited CAUSE_WAIT_S)."""
        waited = self.waiting.pop(connection_id, ())
        for key in {(e.fields.get("topic"), e.fields.get("subscription")) for _, e in waited}:
            if self.behind.get(key) == connection_id:
                del self.behind[key]
        for _, event in waited:
            self._publish(event)

    def _publish(self, event):
        topic = event.fields.get("topic")
        for connection_id, watcher in self.watchers.items():
            if watcher.pattern is None or (topic is not None and not fnmatchcase(topic, watcher.pattern)):
                continue
            watcher.seq += 1
            frame = {"op": "event", "seq": watcher.seq, "time_ms": int(event.time * 1000),
                     "kind": event.kind}
            frame.update(event.fields)
            self._write(watcher.shard, connection_id, encode_frame(frame))

    def _write(self, shard_address, connection_id, data):
        # one ordered channel per shard: the `ok` and the events reach the client in order
        self.send_ordered(shard_address, shard.Outbound(connection_id, data), ("shard", str(shard_address)))
