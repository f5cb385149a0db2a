"""Dispatch policies: which consumer gets which message. Pure logic, no actors."""
from actorbroker.actors.policies import ConsumerState, make_policy
from actorbroker.transport.codec import make_run


def rec(offset, key=None):
    """A one-record run (transport/codec.py)."""
    return make_run(offset, 0, "p", [b""], keys=None if key is None else [key])


def consumer(cid, name=None, credits=0):
    return ConsumerState(cid, name or f"c{cid}", transport=None, credits=credits)


def deliver(policy):
    """Run take() as the dispatcher would, acking each batch at once."""
    got = {}
    while True:
        batches = policy.take()
        if not batches:
            return got
        for c, records in batches:
            got.setdefault(c.id, []).extend(r[0] for r in records)


def test_credits_are_never_exceeded():
    for kind in ("exclusive", "failover", "shared", "key_shared"):
        policy = make_policy(kind, 1000)
        policy.add(consumer(1, credits=3))
        policy.enqueue([rec(i, f"k{i}") for i in range(10)])
        assert sum(len(v) for v in deliver(policy).values()) == 3, kind
        assert policy.backlog_size() == 7, kind


def test_backlog_bound_drops_the_newest():
    policy = make_policy("shared", 5)
    policy.enqueue([rec(i) for i in range(8)])
    assert policy.trim() == 3
    policy.add(consumer(1, credits=10))
    assert deliver(policy) == {1: [0, 1, 2, 3, 4]}


def test_a_record_dropped_after_it_took_a_consumers_credit_gives_it_back():
    from actorbroker.actors.policies import DELIVER_WINDOW
    for kind in ("shared", "key_shared"):
        policy = make_policy(kind, 5)
        busy = consumer(1, credits=100)
        policy.add(busy)
        busy.in_flight = DELIVER_WINDOW   # its transport has all it may have: records wait, assigned
        policy.enqueue([rec(i) for i in range(20)])
        assert policy.take() == []
        assert policy.trim() == 15, kind
        # what it has not been given is its credit again: only records still assigned hold any
        assert busy.credits + policy.waiting(1) == 100, kind
        busy.in_flight = 0
        assert deliver(policy) == {1: [0, 1, 2, 3, 4]}, kind


def test_what_credit_takes_at_once_is_not_dropped():
    policy = make_policy("key_shared", 5)
    policy.add(consumer(1, credits=6))
    policy.enqueue([rec(i, f"k{i}") for i in range(10)])
    assert len(policy.take()[0][1]) == 6
    assert policy.trim() == 0 and policy.backlog_size() == 4
    policy.enqueue([rec(i, f"k{i}") for i in range(10, 13)])
    assert policy.trim() == 2
    assert sorted(r[0] for q in policy.queues.values() for r in q) == [6, 7, 8, 9, 10]


def test_shared_is_round_robin():
    policy = make_policy("shared", 1000)
    for cid in (1, 2, 3):
        policy.add(consumer(cid, credits=100))
    policy.enqueue([rec(i) for i in range(9)])
    got = deliver(policy)
    assert got == {1: [0, 3, 6], 2: [1, 4, 7], 3: [2, 5, 8]}


def test_shared_gives_a_consumer_its_turn_while_its_transport_has_a_delivery_in_flight():
    # Records come one by one (pipelined sends); consumer 2's transport is slow to confirm its
    # deliveries: it still gets every third record, sent with its next delivery.
    policy = make_policy("shared", 1000)
    consumers = [consumer(cid, credits=100) for cid in (1, 2, 3)]
    for c in consumers:
        policy.add(c)
    got = {1: [], 2: [], 3: []}
    for i in range(9):
        policy.enqueue([rec(i)])
        for c, records in policy.take():
            got[c.id].extend(r[0] for r in records)
            c.in_flight += 1
        for c in consumers:
            if c.id != 2 or i % 4 == 3:   # 2's window opens only now and then
                c.in_flight = 0
    consumers[1].in_flight = 0
    for c, records in policy.take():
        got[c.id].extend(r[0] for r in records)
    assert got == {1: [0, 3, 6], 2: [1, 4, 7], 3: [2, 5, 8]}


def test_shared_records_assigned_to_a_consumer_that_leaves_go_to_the_others_in_order():
    policy = make_policy("shared", 1000)
    a, b = consumer(1, credits=100), consumer(2, credits=100)
    policy.add(a)
    policy.add(b)
    b.in_flight = 1
    policy.enqueue([rec(i) for i in range(4)])
    assert [(c.id, [r[0] for r in rs]) for c, rs in policy.take()] == [(1, [0, 2])]
    assert policy.backlog_size() == 2          # 1 and 3 wait for b's window
    policy.remove(2)
    assert deliver(policy) == {1: [1, 3]}


def test_shared_skips_consumers_without_credit():
    policy = make_policy("shared", 1000)
    policy.add(consumer(1, credits=0))
    policy.add(consumer(2, credits=5))
    policy.enqueue([rec(i) for i in range(4)])
    assert deliver(policy) == {2: [0, 1, 2, 3]}


def test_failover_first_by_name_is_active_and_next_takes_over():
    policy = make_policy("failover", 1000)
    policy.add(consumer(1, "b", credits=10))
    policy.add(consumer(2, "a", credits=10))
    assert policy.is_active(2) and not policy.is_active(1)
    policy.enqueue([rec(0)])
    assert deliver(policy) == {2: [0]}
    policy.remove(2)
    assert policy.is_active(1)
    policy.enqueue([rec(1)])
    assert deliver(policy) == {1: [1]}


def test_key_shared_same_key_same_consumer_and_minimal_movement():
    policy = make_policy("key_shared", 100000)
    for cid in (1, 2, 3):
        policy.add(consumer(cid, credits=100000))
    keys = [f"key-{i}" for i in range(300)]
    policy.enqueue([rec(i, k) for i, k in enumerate(keys)])
    owner = {}
    for cid, offsets in deliver(policy).items():
        for off in offsets:
            owner[keys[off]] = cid
    assert len(owner) == 300 and len(set(owner.values())) == 3
    before = dict(owner)
    policy.remove(3)
    policy.enqueue([rec(1000 + i, k) for i, k in enumerate(keys)])
    for cid, offsets in deliver(policy).items():
        for off in offsets:
            owner[keys[off - 1000]] = cid
    moved = [k for k in keys if owner[k] != before[k]]
    assert moved and all(before[k] == 3 for k in moved)   # only the leaver's keys moved


def test_key_shared_a_moved_key_waits_while_its_old_owner_holds_it_unacked():
    policy = make_policy("key_shared", 100000)
    policy.add(consumer(1, credits=100000))
    keys = [f"key-{i}" for i in range(64)]
    first = [rec(i, k) for i, k in enumerate(keys)]
    policy.enqueue(first)
    assert deliver(policy) == {1: list(range(64))}
    for record in first:                       # delivered, not acked (the dispatcher reports it)
        policy.hold(1, record)
    policy.add(consumer(2, credits=100000))
    moved = [k for k in keys if policy.owner(k) == 2]
    assert moved and policy.draining == set(moved)
    policy.enqueue([rec(100 + i, k) for i, k in enumerate(keys)])
    got = deliver(policy)
    assert got == {1: [100 + i for i, k in enumerate(keys) if k not in moved]}   # b waits
    policy.release(1, first[keys.index(moved[0])])   # acked: that key flows, the others wait
    assert deliver(policy) == {2: [100 + keys.index(moved[0])]}
    for record in first:
        policy.release(1, record)
    assert policy.draining == set() and policy.holding == {}
    assert deliver(policy) == {2: [100 + keys.index(k) for k in moved[1:]]}


def test_key_shared_keyless_messages_round_robin():
    policy = make_policy("key_shared", 1000)
    policy.add(consumer(1, credits=10))
    policy.add(consumer(2, credits=10))
    policy.enqueue([rec(i) for i in range(6)])
    got = deliver(policy)
    assert sorted(len(v) for v in got.values()) == [3, 3]


def test_key_shared_keyed_and_keyless_reach_each_consumer_in_offset_order():
    """Keyless records took only the credit the keyed queues left: one consumer given ids 0-9
    (the even ones keyless) got 1, 3, 5, 7, 9, then 0, 2, 4, 6, 8; with a keyed backlog larger
    than the credits, keyless records (redelivered ones too) waited behind all of it."""
    policy = make_policy("key_shared", 100000)
    a = policy.add(consumer(1, credits=10))
    policy.enqueue([rec(i, None if i % 2 == 0 else f"k{i % 7}") for i in range(10)])
    assert deliver(policy) == {1: list(range(10))}
    # a keyed backlog of 1,000 and credit for 50 at a time: keyless ones go in their turn
    policy.add(consumer(2, credits=0))
    policy.enqueue([rec(i, None if i % 5 == 0 else f"k{i % 13}") for i in range(10, 1010)])
    policy.requeue([rec(4), rec(2)])   # keyless, put back (their consumer left, say)
    seen = {1: [], 2: []}
    for _ in range(10):
        for c in policy.consumers.values():
            c.credits += 25
        for cid, ids in deliver(policy).items():
            seen[cid].extend(ids)
    for ids in seen.values():
        assert ids == sorted(ids)   # each consumer: in offset order
    first_batch = seen[1][:25] + seen[2][:25]
    assert 2 in first_batch and 4 in first_batch   # the put-back keyless ones: first, not last
    keyless = [i for ids in seen.values() for i in ids if i % 5 == 0 and i >= 10]
    assert keyless and max(keyless) > 400   # keyless ones flow with the keyed ones, not after them


def test_key_shared_consumers_coming_and_going_in_bursts_keep_each_key_in_order():
    """Joins and leaves between deliveries, one at a time and in bursts larger than the ring's
    point-by-point limit, with records queued meanwhile: every key's records reach consumers
    in offset order, each record once, and the ring ends as a fresh one of the same consumers."""
    import random
    rng = random.Random(7)
    keys = [f"key-{i}" for i in range(50)]
    policy = make_policy("key_shared", 1_000_000)
    live, next_id, offset, got = [], 1, 0, []
    for round_ in range(60):
        burst = rng.choice([1, 1, 2, 40])
        for _ in range(burst):
            if live and (rng.random() < 0.45 or len(live) > 60):
                policy.remove(live.pop(rng.randrange(len(live))))
            else:
                policy.add(consumer(next_id, credits=10**9))
                live.append(next_id)
                next_id += 1
        policy.enqueue([rec(offset + i, rng.choice(keys)) for i in range(30)])
        offset += 30
        for cid, offsets in deliver(policy).items():
            got.extend(offsets)
    policy.add(consumer(next_id, credits=10**9))   # at least one, to deliver what is left
    live.append(next_id)
    got.extend(off for offsets in deliver(policy).values() for off in offsets)
    assert sorted(got) == list(range(offset))   # each once (non_reliable: nothing dropped here)
    fresh = make_policy("key_shared", 10)
    for cid in live:
        fresh.add(consumer(cid))
    assert all(policy.owner(k) == fresh.owner(k) for k in keys)


def test_key_shared_records_of_a_key_stay_in_order_across_joins():
    policy = make_policy("key_shared", 1_000_000)
    policy.add(consumer(1, credits=0))
    policy.enqueue([rec(i, f"k{i % 7}") for i in range(100)])
    assert policy.take() == [] and policy.backlog_size() == 100   # queued at consumer 1, no credit
    for cid in range(2, 40):                                      # many join: keys move
        policy.add(consumer(cid, credits=0))
    policy.enqueue([rec(i, f"k{i % 7}") for i in range(100, 200)])
    for c in policy.consumers.values():
        c.credits = 10**9
    got = deliver(policy)
    for offsets in got.values():
        assert offsets == sorted(offsets)
    owners = {}
    for cid, offsets in got.items():
        for off in offsets:
            owners.setdefault(off % 7, set()).add(cid)
    assert all(len(o) == 1 for o in owners.values())   # a key at one consumer, its whole history
    assert sorted(o for offsets in got.values() for o in offsets) == list(range(200))


def test_records_put_back_one_at_a_time_go_out_in_offset_order():
    """Nacks one by one (each a requeue) come back oldest first, ahead of the newer backlog."""
    for kind in ("exclusive", "failover", "shared", "key_shared"):
        for key in (None, "k"):
            policy = make_policy(kind, 1000)
            policy.add(consumer(1, credits=0))
            policy.enqueue([rec(i, key) for i in range(6, 9)])
            for offset in (0, 1, 4, 2, 5, 3):
                policy.requeue([rec(offset, key)])
            policy.consumers[1].credits = 100
            assert deliver(policy) == {1: list(range(9))}, (kind, key)


def test_key_shared_consumers_that_come_and_go_leave_no_turns_behind():
    policy = make_policy("key_shared", 1000)
    for round_ in range(20):
        for i in range(50):
            policy.add(consumer(round_ * 100 + i))
        for i in range(50):
            policy.remove(round_ * 100 + i)
    assert len(policy.keyless_turn) <= 16


def test_a_stalled_consumer_gives_back_what_it_was_given_and_gets_nothing_more():
    """Records given to a consumer behind a delivery its transport does not take (shared: assigned
    to it, its credit spent; key_shared: keyless ones queued to it in their turn) go back when the
    dispatcher's ack timeout stalls it, to the others; its keys stay with it, in order."""
    from actorbroker.transport.codec import run_key
    for kind in ("shared", "key_shared"):
        policy = make_policy(kind, 1000)
        stuck, other = consumer(1, "a", credits=1000), consumer(2, "b", credits=0)
        policy.add(stuck)
        policy.add(other)
        policy.enqueue([rec(0)])
        (taken, _), = policy.take()
        assert taken is stuck
        stuck.in_flight = 1   # its transport never takes that delivery
        policy.enqueue([rec(i) for i in range(1, 7)] + [rec(7, "k")])
        assert policy.take() == []
        given = [r[0] for r in policy.assigned.get(1, ())] + \
            [r[0] for r in getattr(policy, "queues", {}).get(1, ()) if run_key(r) is None]
        credits = stuck.credits
        stuck.stalled = True
        assert policy.take_back(1) == len(given) > 0, kind
        assert stuck.credits == credits + (len(given) if kind == "shared" else 0)
        other.credits = 100
        got = deliver(policy)
        assert 1 not in got and set(given) <= set(got[2]), kind
        if kind == "key_shared" and policy.owner("k") == 1:
            assert [r[0] for r in policy.queues[1]] == [7]
