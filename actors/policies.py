"""Who gets which message: one pure policy per subscription type, no actors, no I/O.

A policy holds the subscription's backlog and its consumers' credits; `take()` says which records
go to which consumer now. Records come as runs (transport/codec.py: consecutive offsets of one
send, as one list). exclusive and failover hand runs out whole, split only where a consumer's
credits end; shared and key_shared hand out records one by one, so they split runs into runs of
one record as they arrive.
"""
import bisect
import hashlib
import heapq
from collections import deque
from itertools import accumulate, islice
from dataclasses import dataclass
from typing import Any

from actorbroker.transport.codec import RUN_COUNT, explode_run, records_within, run_bytes, run_key, split_run

DELIVER_WINDOW = 1      # Deliver messages in flight to one consumer's transport
VIRTUAL_NODES = 64      # points per consumer on the key_shared hash ring
RING_REBUILD_AFTER = 16  # key_shared: more consumer changes than this at once: the ring re-sorted whole
MAX_DRAIN_SCAN = 4096   # key_shared: records looked at per consumer and take() past draining keys


def merge_front(queue, runs):
    """Put runs to redeliver (in offset order) into a queue of runs in offset order: ahead of
    everything newer, behind anything older put back before (nacks one at a time came back
    newest first)."""
    if not runs:
        return
    last = runs[-1][0]
    head = []
    while queue and queue[0][0] < last:
        head.append(queue.popleft())
    queue.extendleft(reversed(list(heapq.merge(head, runs, key=lambda run: run[0]))))


@dataclass(eq=False)
class ConsumerState:
    id: int
    name: str
    transport: Any
    owner: Any = None      # the ConnectionActor it belongs to
    credits: int = 0
    msgs_out: int = 0
    in_flight: int = 0
    unacked: int = 0       # reliable: delivered, not acknowledged yet
    max_unacked: int = 1 << 62
    tracks_acks: bool = False
    last_offset: int = -1  # the newest record delivered to it (non_reliable: see UNDELIVERED)
    routed: bool = False   # its shard has it (ROUTED): `active` changes go over the lane
    told: Any = None       # failover: the `active` state its client was last told
    deliver_deadline: Any = None   # reliable with an ack timeout: its delivery in flight is late after
    stalled: bool = False  # ... and was: given nothing more until its shard has taken it (DELIVER_ACK)
    connection: Any = None  # the id of its client's connection (its events name it)

    def room(self):
        """How many records it may be given now."""
        if self.stalled:
            return 0
        return min(self.credits, self.max_unacked - self.unacked)

    def can_take(self):
        return self.room() > 0 and self.in_flight < DELIVER_WINDOW

    def took(self, n):
        self.credits -= n
        if self.tracks_acks:
            self.unacked += n

    def gave_back(self, n):
        """n records it took (assigned, not delivered) were dropped: its credit comes back."""
        self.credits += n
        if self.tracks_acks:
            self.unacked -= n


def within(runs, limit, at_least=1):
    """How many leading runs of `runs` (an iterable) make at most `limit` bytes (run_bytes); at
    least `at_least`."""
    return max(at_least, sum(1 for _ in _takewhile_within(runs, limit)))


def _takewhile_within(runs, limit):
    for total in accumulate(map(run_bytes, runs)):
        if total > limit:
            return
        yield total


class Policy:
    """Common part: consumers in attach order, and a bounded FIFO backlog. `batch_bytes` bounds
    each batch take() gives (as run_bytes counts: the dispatcher sets it from max_pending_bytes);
    a record larger goes alone."""

    def __init__(self, max_backlog, batch_bytes=None):
        self.max_backlog = max_backlog
        self.batch_bytes = batch_bytes or 1 << 62
        self.consumers = {}
        self.backlog = deque()
        self.discarded = 0   # records remove() dropped (drop_stale); the dispatcher counts them

    def add(self, consumer):
        self.consumers[consumer.id] = consumer

    def remove(self, consumer_id, drop_stale=False):
        """Forget the consumer. Records routed to it and not delivered go to the others, but with
        `drop_stale` (non_reliable) those at or below the newest record another consumer has had
        are dropped: they would reach a consumer after newer ones."""
        return self.consumers.pop(consumer_id, None)

    def _orphans(self, records, drop_stale):
        if not records:
            return []
        if not drop_stale:
            return list(records)
        # only when there are orphans: a scan per removal made 10,000 leaving consumers quadratic
        drop_below = max((c.last_offset for c in self.consumers.values()), default=-1)
        kept, gone = [], 0
        for run in records:
            if run[0] > drop_below:
                kept.append(run)
            else:
                gone += run[RUN_COUNT]
        self.discarded += gone
        return kept

    def backlog_size(self):
        return len(self.backlog)

    def enqueue(self, records):
        self.backlog.extend(records)

    def requeue(self, records):
        """Records to redeliver: ahead of everything not yet delivered, in offset order."""
        merge_front(self.backlog, records)

    def reserve(self, consumer_id, records):
        """Records to redeliver to this consumer (a replaced one's unacknowledged, PROTOCOL.md):
        where consumers own what they get (by name, by key) requeueing is enough."""
        self.requeue(records)

    def trim(self):
        """Drop the newest records beyond max_backlog; returns how many. Called after take(),
        so what consumers with credit could take right away is never dropped."""
        dropped = 0
        while self.backlog_size() > self.max_backlog:
            self._drop_newest()
            dropped += 1
        return dropped

    def _drop_newest(self):
        self.backlog.pop()

    def is_active(self, consumer_id):
        """Failover's active flag; None where the type has no such notion."""
        return None

    def waiting(self, consumer_id):
        """Records given to this consumer (its credit spent) but not yet delivered to it."""
        return 0

    def take_back(self, consumer_id):
        """Records given to this consumer and not delivered go back to the backlog, for anyone,
        its credit with them (it does not take its deliveries); how many."""
        return 0

    def take(self):
        raise NotImplementedError


class SingleActivePolicy(Policy):
    """exclusive and failover: everything goes to one consumer, the first by name. The backlog
    holds whole runs; `size` counts their records."""

    def __init__(self, max_backlog, batch_bytes=None):
        super().__init__(max_backlog, batch_bytes)
        self.size = 0
        self.chosen = None   # active(), kept until a consumer comes or goes (not sought per delivery)

    def add(self, consumer):
        super().add(consumer)
        self.chosen = None

    def remove(self, consumer_id, drop_stale=False):
        self.chosen = None
        return super().remove(consumer_id, drop_stale)

    def active(self):
        if self.chosen is None and self.consumers:
            self.chosen = min(self.consumers.values(), key=lambda c: c.name)
        return self.chosen

    def backlog_size(self):
        return self.size

    def enqueue(self, records):
        self.backlog.extend(records)
        self.size += sum(run[RUN_COUNT] for run in records)

    def requeue(self, records):
        merge_front(self.backlog, records)
        self.size += sum(run[RUN_COUNT] for run in records)

    def take(self):
        consumer = self.active()
        if consumer is None or not consumer.can_take() or not self.backlog:
            return []
        room, limit = consumer.room(), self.batch_bytes
        backlog, batch, n, size = self.backlog, [], 0, 0
        while backlog and n < room:
            run = backlog[0]
            count = run[RUN_COUNT]
            part = min(count, room - n)   # the consumer's credits may end inside this run
            size += run_bytes(run)
            full = size >= limit
            if size > limit:   # ... or the batch's bytes
                fit = records_within(run, limit - (size - run_bytes(run)))
                if not batch:
                    fit = max(fit, 1)   # a record larger than the bound goes alone
                if not fit:
                    break
                part = min(part, fit)
            if part == count:
                batch.append(backlog.popleft())
            else:
                head, backlog[0] = split_run(run, part)
                batch.append(head)
            n += part
            if full:
                break
        self.size -= n
        consumer.took(n)
        return [(consumer, batch)]

    def trim(self):
        excess = self.size - self.max_backlog
        if excess <= 0:
            return 0
        backlog = self.backlog
        dropped = 0
        while dropped < excess:
            count = backlog[-1][RUN_COUNT]
            if count <= excess - dropped:
                backlog.pop()
                dropped += count
            else:   # keep the older part of the newest run
                backlog[-1], _ = split_run(backlog[-1], count - (excess - dropped))
                dropped = excess
        self.size -= dropped
        return dropped


class FailoverPolicy(SingleActivePolicy):
    def is_active(self, consumer_id):
        active = self.active()
        return active is not None and active.id == consumer_id


class SharedPolicy(Policy):
    """Round-robin, message by message, over the consumers that have credit. A record is
    assigned in its turn to a consumer with credit even while that consumer's transport has a
    delivery in flight (DELIVER_WINDOW): it waits here, assigned, and goes with the next
    delivery. Skipping such a consumer instead gave most messages to the consumers whose
    transports happened to answer first."""

    def __init__(self, max_backlog, batch_bytes=None):
        super().__init__(max_backlog, batch_bytes)
        self.turn = 0          # index in attach order of the consumer whose turn is next
        self.assigned = {}     # consumer id -> deque of records assigned to it, not delivered yet
        self.reserved = {}     # consumer id -> deque of records for it alone, against its credits

    def enqueue(self, records):
        super().enqueue(one for run in records for one in explode_run(run))

    def requeue(self, records):
        super().requeue([one for run in records for one in explode_run(run)])

    def reserve(self, consumer_id, records):
        merge_front(self.reserved.setdefault(consumer_id, deque()),
                    [one for run in records for one in explode_run(run)])

    def remove(self, consumer_id, drop_stale=False):
        consumer = super().remove(consumer_id)
        merge_front(self.backlog, self._orphans(self.assigned.pop(consumer_id, ()), drop_stale))   # never delivered
        merge_front(self.backlog, list(self.reserved.pop(consumer_id, ())))   # for anyone now
        return consumer

    def backlog_size(self):
        return (len(self.backlog) + sum(map(len, self.assigned.values()))
                + sum(map(len, self.reserved.values())))

    def waiting(self, consumer_id):
        return len(self.assigned.get(consumer_id, ()))

    def take_back(self, consumer_id):
        waiting = self.assigned.pop(consumer_id, None)
        if not waiting:
            return 0
        merge_front(self.backlog, sorted(waiting, key=lambda record: record[0]))
        self.consumers[consumer_id].gave_back(len(waiting))   # (never sent: its client counts on them)
        return len(waiting)

    def _drop_newest(self, *others):
        """The newest record waiting anywhere. One assigned to a consumer had taken its credit:
        given back (else a consumer's credits ran out on records it never got, and it stalled for
        good with its client waiting for them)."""
        queues = [(q, None) for q in (self.backlog, *others, *self.reserved.values()) if q]
        queues += [(q, consumer_id) for consumer_id, q in self.assigned.items() if q]
        queue, consumer_id = max(queues, key=lambda entry: entry[0][-1][0])
        queue.pop()
        if consumer_id is not None:
            self.consumers[consumer_id].gave_back(1)

    def take(self, spent=None):
        """spent: consumer -> bytes of the batch it has from the caller already (key_shared)."""
        if not self.consumers:
            return []
        if self.reserved:
            self._assign_reserved()
        if self.backlog:
            self._assign()
        batches = []
        # Only consumers with records assigned (`assigned` drops emptied queues): a look at every
        # consumer on each delivery made set-up and teardown of thousands of consumers quadratic.
        for consumer_id, waiting in list(self.assigned.items()):
            if not waiting:
                del self.assigned[consumer_id]
                continue
            consumer = self.consumers[consumer_id]
            if consumer.in_flight < DELIVER_WINDOW:
                used = spent.get(consumer, 0) if spent else 0
                n = within(waiting, self.batch_bytes - used, 0 if used else 1)
                if not n:
                    continue
                if n == len(waiting):
                    batches.append((consumer, list(waiting)))
                    del self.assigned[consumer_id]
                else:
                    batches.append((consumer, [waiting.popleft() for _ in range(n)]))
        return batches

    def _assign_reserved(self):
        for consumer_id, reserved in list(self.reserved.items()):
            consumer = self.consumers[consumer_id]
            n = min(consumer.room(), len(reserved))
            if n > 0:
                self.assigned.setdefault(consumer_id, deque()).extend(reserved.popleft() for _ in range(n))
                consumer.took(n)
            if not reserved:
                del self.reserved[consumer_id]

    def _assign(self):
        """The backlog, record by record, to the consumers with credit, each in its turn."""
        order = list(self.consumers.values())
        position = {c.id: i for i, c in enumerate(order)}
        start = self.turn % len(order)
        order = order[start:] + order[:start]
        quota = {c: c.room() for c in order if c.room() > 0}
        eligible = list(quota)
        if len(eligible) == 1:   # one consumer with credit: its whole share at once
            consumer, backlog = eligible[0], self.backlog
            n = min(quota[consumer], len(backlog))
            waiting = self.assigned.setdefault(consumer.id, deque())
            if n == len(backlog):
                waiting.extend(backlog)
                backlog.clear()
            else:
                waiting.extend(backlog.popleft() for _ in range(n))
            consumer.took(n)
            self.turn = position[consumer.id] + 1
            return
        n = len(self.backlog)
        if min(quota.values(), default=0) * len(eligible) >= n:   # credit for every record: slices
            records = list(self.backlog)
            self.backlog.clear()
            k = len(eligible)
            for j, consumer in enumerate(eligible):
                share = records[j::k]
                if share:
                    self.assigned.setdefault(consumer.id, deque()).extend(share)
                    consumer.took(len(share))
            self.turn = position[eligible[(n - 1) % k].id] + 1
            return
        taken = {}
        while self.backlog and eligible:
            for consumer in list(eligible):
                if not self.backlog:
                    break
                self.assigned.setdefault(consumer.id, deque()).append(self.backlog.popleft())
                taken[consumer] = taken.get(consumer, 0) + 1
                quota[consumer] -= 1
                self.turn = position[consumer.id] + 1
                if quota[consumer] == 0:
                    eligible.remove(consumer)
        for consumer, n in taken.items():
            consumer.took(n)


def ring_hash(text):
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class KeySharedPolicy(SharedPolicy):
    """Same key, same consumer, by consistent hashing of keys onto consumer names; a consumer
    that comes or goes moves only its own share of keys. Keyless messages go round-robin, into
    the same per-consumer queues as they arrive, so that each consumer gets its messages, keyed
    and keyless, in offset order. (Given only the credit the keyed queues left, keyless messages
    waited behind the whole keyed backlog, a redelivered one 800 places late, and a consumer got
    keyed messages before older keyless ones: an ordering probe.)

    Reliable subscriptions keep each key in order across such a move (the dispatcher reports
    what is delivered and not acknowledged: hold() / release()): a key that moved to a consumer
    that joined is not given to it while the consumer that had it holds messages of that key
    unacked (the key is "draining"), as Pulsar's key_shared does. Its other keys flow.

    The ring and the queued records follow the consumers lazily, once, when records next need
    an owner after consumers came or went (until then keyed records wait in `unowned`); a
    consumer's points are hashed once. Rebuilding and rehashing the whole ring on every change
    made 500 consumers coming and going take 14 s each way."""

    def __init__(self, max_backlog, batch_bytes=None):
        super().__init__(max_backlog, batch_bytes)
        self.points = []        # the ring's points, sorted, for bisect
        self.point_owner = {}   # point -> consumer id
        self.vnodes = {}        # consumer id -> its points on the ring
        self.ring_changes = []  # (consumer id, its points, joined) not applied yet; None: too many
        self.ring_stale = False   # consumers came or went since records were last routed
        self.joined = False     # ... and some came: queued records may have to move
        self.queues = {}        # consumer id -> deque of its records (emptied ones dropped)
        self.keyless_turn = deque()   # consumer ids in round-robin order (gone ones dropped lazily)
        self.unowned = deque()  # records with no owner yet: no consumer, or a stale ring
        self.holding = {}       # key -> {consumer id: its records of that key delivered, unacked}
        self._draining = set()  # keys held unacked by a consumer that no longer owns them

    @property
    def draining(self):
        self._ensure_ring(now=True)
        return self._draining

    def hold(self, consumer_id, record):
        key = run_key(record)
        if key is not None:
            holders = self.holding.setdefault(key, {})
            holders[consumer_id] = holders.get(consumer_id, 0) + 1

    def release(self, consumer_id, record):
        """A record hold() reported is acked, or back for redelivery."""
        key = run_key(record)
        holders = self.holding.get(key) if key is not None else None
        if not holders or consumer_id not in holders:
            return
        holders[consumer_id] -= 1
        if holders[consumer_id] == 0:
            del holders[consumer_id]
            if not holders:
                del self.holding[key]
            if key in self._draining and not self._drains(key):
                self._draining.discard(key)

    def _drains(self, key):
        owner = self._owner_of(key)
        return any(holder != owner for holder in self.holding.get(key, ()))

    def owner(self, key):
        self._ensure_ring(now=True)
        return self._owner_of(key)

    def _owner_of(self, key):
        """The key's consumer on the ring as built (see _ensure_ring)."""
        if not self.points:
            return None
        i = bisect.bisect(self.points, ring_hash(key)) % len(self.points)
        return self.point_owner[self.points[i]]

    def _ensure_ring(self, now=False):
        """After consumers came or went: move the queued records whose key now hashes to another
        consumer (only a newcomer's keys can have: a scan, so only after adds), and give
        `unowned` its owners; all in offset order, so each key keeps its order. Not while no keyed
        record waits (unless `now`): consumers that come and go with nothing to route cost none."""
        if not self.ring_stale or not (now or self.unowned or self.queues):
            return
        self.ring_stale = False
        self._update_ring()
        if not self.points:
            return
        owners = {}   # key -> its owner on this ring: looked up once per key, not per record

        def owner(record):
            key = run_key(record)
            found = owners.get(key)
            if found is None:
                found = owners[key] = self._owner_of(key)
            return found
        moved = list(self.unowned)
        self.unowned.clear()
        if self.joined:   # (a keyless record stays where it is)
            for cid, queue in list(self.queues.items()):
                if any(run_key(record) is not None and owner(record) != cid for record in queue):
                    stay = deque()
                    for record in queue:
                        (stay if run_key(record) is None or owner(record) == cid else moved).append(record)
                    self.queues[cid] = stay
            self.joined = False
        moved.sort(key=lambda r: r[0])
        by_owner = {}
        for record in moved:
            cid = owner(record) if run_key(record) is not None else self._next_keyless()
            by_owner.setdefault(cid, []).append(record)
        for cid, records in by_owner.items():   # in offset order with what it has (keyless too)
            merge_front(self.queues.setdefault(cid, deque()), records)
        if self.holding:   # (the leaver's own holdings are released as they are redelivered)
            self._draining = {key for key in self.holding if self._drains(key)}

    def _update_ring(self):
        """The ring of the consumers there are now: a few changes point by point (sorted inserts
        and deletes), many at once (a burst of joins or a mass disconnect) by one sort."""
        changes, self.ring_changes = self.ring_changes, []
        if changes is None:
            self.point_owner = {point: cid for cid in self.consumers for point in self.vnodes[cid]}
            self.points = sorted(self.point_owner)
            return
        for cid, points, joined in changes:
            for point in points:
                if joined:
                    if point not in self.point_owner:
                        bisect.insort(self.points, point)
                    self.point_owner[point] = cid
                elif self.point_owner.get(point) == cid:
                    del self.point_owner[point]
                    del self.points[bisect.bisect_left(self.points, point)]

    def _ring_change(self, change):
        if self.ring_changes is not None:
            self.ring_changes.append(change)
            if len(self.ring_changes) > RING_REBUILD_AFTER:   # (None: rebuild it whole)
                self.ring_changes = None

    def _next_keyless(self):
        """The consumer whose turn it is for a keyless record (None: there is none), passing over
        stalled ones while another is not."""
        turn, first = self.keyless_turn, None
        for _ in range(len(turn)):
            cid = turn.popleft()
            if cid in self.consumers:
                turn.append(cid)
                if not self.consumers[cid].stalled:
                    return cid
                if first is None:
                    first = cid
        if first is not None:   # all stalled: the turn goes on from the first
            turn.rotate(-1)
        return first

    def add(self, consumer):
        super().add(consumer)
        self.keyless_turn.append(consumer.id)
        self.vnodes[consumer.id] = [ring_hash(f"{consumer.name}#{i}") for i in range(VIRTUAL_NODES)]
        self._ring_change((consumer.id, self.vnodes[consumer.id], True))
        self.ring_stale = self.joined = True
        return consumer

    def remove(self, consumer_id, drop_stale=False):
        consumer = super().remove(consumer_id, drop_stale)
        if len(self.keyless_turn) > 2 * len(self.consumers) + 16:   # gone ones, dropped lazily:
            # (consumers coming and going with no keyless record to take turns for)
            self.keyless_turn = deque(cid for cid in self.keyless_turn if cid in self.consumers)
        points = self.vnodes.pop(consumer_id, None)
        if points is not None:
            self._ring_change((consumer_id, points, False))
            self.ring_stale = True
        # Its keys' records wait for their next owners, sorted by offset with the rest of
        # `unowned` when the ring is next used. Those its credits covered were routed to it (only
        # its transport's window held them): dropped as such with drop_stale. The rest waited
        # for credits, backlog that was nobody's yet: never dropped.
        queue = self.queues.pop(consumer_id, deque())
        if consumer is not None and drop_stale and queue:
            routed = min(consumer.room(), len(queue))
            self.unowned.extend(self._orphans([queue.popleft() for _ in range(routed)], True))
        self.unowned.extend(queue)
        return consumer

    def take_back(self, consumer_id):
        """Also the keyless records waiting in its queue (their turn gave them to it); its keys'
        wait for it, in order."""
        taken = super().take_back(consumer_id)
        queue = self.queues.get(consumer_id)
        if queue and any(run_key(record) is None for record in queue):
            loose = [record for record in queue if run_key(record) is None]
            self.queues[consumer_id] = deque(record for record in queue if run_key(record) is not None)
            self.requeue(loose)
            taken += len(loose)
        return taken

    def backlog_size(self):
        return super().backlog_size() + len(self.unowned) + sum(len(q) for q in self.queues.values())

    def enqueue(self, records):
        for record in (one for run in records for one in explode_run(run)):
            self._route(record)

    def requeue(self, records):
        self._ensure_ring(now=True)
        by_queue = {}
        for record in (one for run in records for one in explode_run(run)):
            key = run_key(record)
            owner = self._owner_of(key) if key is not None else self._next_keyless()
            queue = self.unowned if owner is None else self.queues.setdefault(owner, deque())
            by_queue.setdefault(id(queue), (queue, []))[1].append(record)
        for queue, queued in by_queue.values():
            merge_front(queue, queued)

    def reserve(self, consumer_id, records):
        """Keyed records go by their key (a consumer that takes a name's place owns its keys);
        keyless ones wait for that consumer as in a shared subscription."""
        records = [one for run in records for one in explode_run(run)]
        self.requeue([r for r in records if run_key(r) is not None])
        super().reserve(consumer_id, [r for r in records if run_key(r) is None])

    def _drop_newest(self):
        super()._drop_newest(self.unowned, *self.queues.values())

    def _route(self, record):
        key = run_key(record)
        owner = None if self.ring_stale else (self._owner_of(key) if key is not None else self._next_keyless())
        if owner is None:
            self.unowned.append(record)
        else:
            self.queues.setdefault(owner, deque()).append(record)

    def take(self):
        self._ensure_ring()
        batches, spent = {}, {}
        for cid, queue in list(self.queues.items()):   # (non-empty ones: see SharedPolicy.take)
            if not queue:
                del self.queues[cid]
                continue
            consumer = self.consumers[cid]
            if consumer.can_take():
                n = min(consumer.room(), len(queue))
                if not self._draining:
                    n = within(islice(queue, n), self.batch_bytes)
                    batch = [queue.popleft() for _ in range(n)]
                else:
                    batch = self._undrained(queue, n, self.batch_bytes)
                if batch:
                    batches[consumer] = batch
                    spent[consumer] = sum(map(run_bytes, batch))
                    consumer.took(len(batch))
                if not queue:
                    del self.queues[cid]
        # keyless records reserved for a consumer that took a name's place (reserve), over the
        # credit that is left (still one batch each)
        for consumer, records in super().take(spent):
            batch = batches.setdefault(consumer, [])
            batch.extend(records)
            batch.sort(key=lambda record: record[0])
        return list(batches.items())

    def _undrained(self, queue, n, limit):
        """Up to n records of the queue, of `limit` bytes at most (at least one), in order,
        passing over those of draining keys (they stay, in order, at the front). Looks at most
        MAX_DRAIN_SCAN records: a long run of held-back records is not scanned on every delivery."""
        batch, kept, draining, size = [], [], self._draining, 0
        for _ in range(min(len(queue), MAX_DRAIN_SCAN)):
            if len(batch) == n:
                break
            record = queue[0]
            if run_key(record) in draining:
                kept.append(queue.popleft())
                continue
            size += run_bytes(record)
            if batch and size > limit:
                break
            batch.append(queue.popleft())
        queue.extendleft(reversed(kept))
        return batch


POLICIES = {"exclusive": SingleActivePolicy, "failover": FailoverPolicy,
            "shared": SharedPolicy, "key_shared": KeySharedPolicy}


def make_policy(sub_type, max_backlog, batch_bytes=None):
    return POLICIES[sub_type](max_backlog, batch_bytes)
