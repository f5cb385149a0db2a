"""Reliable topics: durable log, durable cursors, at-least-once with redelivery; crash tests
with real processes (kill -9 of every broker process) and a torn segment."""
import os
import signal
import socket
import time

import pytest

from tests.util import ClientProcess, processes_of_kind, wait_for
from tests.wire import RawConnection


def connect(broker):
    conn = RawConnection(*broker.address)
    conn.hello()
    return conn


def subscribe(conn, topic, sub, sub_type="shared", name="c", credits=1000, **options):
    frame = {"op": "subscribe", "topic": topic, "subscription": sub, "type": sub_type,
             "consumer": name, "dispatch": "reliable"}
    frame.update(options)
    consumer = conn.request(frame)["consumer"]
    if credits:
        conn.send_frame({"op": "flow", "consumer": consumer, "credits": credits})
    return consumer


def producer(conn, topic):
    return conn.request({"op": "producer", "topic": topic, "dispatch": "reliable"})["producer"]


def receive(conn, count, timeout=10, fields=("id", "payload", "redeliveries")):
    """The next `count` messages pushed on this connection, as tuples of `fields`."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        frame = conn.recv_frame(timeout=max(0.01, deadline - time.monotonic()))
        assert frame is not None, f"connection closed after {len(got)} of {count} messages"
        if frame["op"] == "ping":
            conn.send_frame({"op": "pong", "rid": frame["rid"]})
        if frame["op"] == "message":
            got.extend(tuple(m[f] for f in fields) for m in frame["msgs"])
    return got


def assert_nothing_more(conn, within=0.5):
    """No further message arrives (bounded wait: a negative can only be observed over time)."""
    with pytest.raises(TimeoutError):
        while True:
            frame = conn.recv_frame(timeout=within)
            assert frame["op"] != "message", frame


def send(conn, producer_id, payloads):
    return conn.request({"op": "send", "producer": producer_id,
                         "msgs": [{"payload": p} for p in payloads]})


def test_receipted_messages_survive_kill_9_of_every_local_broker(start_broker, tmp_path, topic):
    data = tmp_path / "data"
    b = start_broker(data_dir=data)
    conn = connect(b)
    pid = producer(conn, topic)
    receipted = {}
    # pipeline many sends, then kill everything while some are still in flight
    for i in range(200):
        conn.send_frame({"op": "send", "rid": 1000 + i, "producer": pid,
                         "msgs": [{"payload": f"{i}-{j}".encode()} for j in range(10)]})
    while len(receipted) < 100:
        frame = conn.recv_frame()
        if frame["op"] == "receipt":
            receipted[frame["rid"] - 1000] = frame
    assert b.kill_all() == []
    for frame in iter(lambda: _next_or_none(conn), None):   # receipts that left before the kill
        if frame["op"] == "receipt":
            receipted[frame["rid"] - 1000] = frame
    b2 = start_broker(data_dir=data)
    reader = connect(b2)
    subscribe(reader, topic, "audit", "exclusive", start="earliest", credits=5000, max_unacked=5000)
    expected = {}
    for i, receipt in receipted.items():
        for j in range(10):
            expected[receipt["first"] + j] = f"{i}-{j}".encode()
    total = log_length(connect(b2), topic)   # own connection: request() skips pushes
    got = dict((o, p) for o, p, _ in receive(reader, total))
    for offset, payload in expected.items():
        assert got.get(offset) == payload, f"receipted offset {offset} lost"


def _next_or_none(conn):
    try:
        return conn.recv_frame(timeout=0.2)
    except (TimeoutError, OSError):
        return None


def log_length(conn, topic):
    """Messages the topic's single subscription has not acknowledged: all of them, here."""
    stats = wait_for(lambda: conn.request({"op": "stats", "topic": topic}),
                     lambda s: s["subscriptions"] and s["subscriptions"][0]["consumers"])
    sub = stats["subscriptions"][0]
    return sub["backlog"] + sum(c["unacked"] for c in sub["consumers"])


def test_a_damaged_cursor_or_topic_file_is_reported_not_skipped_silently(start_broker, tmp_path, topic):
    """A cursor file or topic.json damaged on disk (from outside: the broker's own writes are
    atomic) made its subscription or topic vanish at the restart without a word in the log
    (reliable probe). It cannot be restored (its name is in there), but it is reported now."""
    data = tmp_path / "data"
    b = start_broker(data_dir=data)
    conn = connect(b)
    subscribe(conn, topic, "durable", "exclusive")
    subscribe(conn, topic + "-other", "kept", "exclusive")
    b.stop()
    (cursor,) = [p for p in (data / "topics").glob("*/cursors/*.json")
                 if '"durable"' in p.read_text()]
    cursor.write_text('{"name": "dur')                     # cut short
    (meta,) = [p for p in (data / "topics").glob("*/topic.json") if f'"{topic}-other"' in p.read_text()]
    meta.write_text("")                                    # emptied
    b2 = start_broker(data_dir=data)
    stats = connect(b2).request({"op": "stats", "topic": topic})   # the topic opens: its cursors are read
    assert stats["subscriptions"] == []
    logged = wait_for(lambda: b2.log_tail(400), lambda text: "is damaged" in text and "cursor file" in text
                      and "topic.json is damaged" in text)
    assert str(cursor) in logged


def test_torn_segment_tail_is_truncated_and_the_rest_kept(start_broker, tmp_path, topic):
    data = tmp_path / "data"
    b = start_broker(data_dir=data)
    conn = connect(b)
    pid = producer(conn, topic)
    for i in range(5):
        send(conn, pid, [f"m{i}".encode()])
    b.stop()
    (segment,) = list((data / "topics").glob("*/log/*.log"))
    with open(segment, "r+b") as f:     # cut the last record in the middle
        f.truncate(os.path.getsize(segment) - 3)
    b2 = start_broker(data_dir=data)
    reader = connect(b2)
    subscribe(reader, topic, "audit", "exclusive", start="earliest")
    assert [(o, p) for o, p, _ in receive(reader, 4)] == [(i, f"m{i}".encode()) for i in range(4)]
    assert_nothing_more(reader)
    stats = reader.request({"op": "stats", "topic": topic})
    assert stats["recovered_truncated_bytes"] > 0
    assert "torn" in b2.log_tail(200)
    # the log goes on from the last valid record
    writer = connect(b2)
    assert send(writer, producer(writer, topic), [b"next"])["first"] == 4


def test_acks_survive_a_restart(start_broker, tmp_path, topic):
    data = tmp_path / "data"
    b = start_broker(data_dir=data)
    conn = connect(b)
    consumer = subscribe(conn, topic, "s", "exclusive")
    pid = producer(conn, topic)
    send(conn, pid, [f"m{i}".encode() for i in range(6)])
    got = receive(conn, 6)
    conn.request({"op": "ack", "consumer": consumer, "ids": [o for o, _, _ in got[:4]]})
    b.stop()
    b2 = start_broker(data_dir=data)
    again = connect(b2)
    subscribe(again, topic, "s", "exclusive")
    assert [(o, p) for o, p, _ in receive(again, 2)] == [(4, b"m4"), (5, b"m5")]
    assert_nothing_more(again)


def test_acks_without_a_rid_survive_a_clean_restart(start_broker, tmp_path, topic):
    # An ack without a rid is saved within the dispatcher's batching delay; a clean stop saves
    # every cursor before the broker goes (docs/reliability.md: "provided the ack had been processed").
    data = tmp_path / "data"
    b = start_broker(data_dir=data)
    conn = connect(b)
    consumer = subscribe(conn, topic, "s", "shared")
    pid = producer(conn, topic)
    send(conn, pid, [f"m{i}".encode() for i in range(100)])
    got = receive(conn, 100)
    conn.send_frame({"op": "ack", "consumer": consumer, "ids": [o for o, _, _ in got]})
    wait_for(lambda: conn.request({"op": "stats", "topic": topic})["subscriptions"][0]["cursor"],
             lambda cursor: cursor == 100)   # processed
    b.stop()
    b2 = start_broker(data_dir=data)
    again = connect(b2)
    assert again.request({"op": "stats", "topic": topic})["subscriptions"][0]["backlog"] == 0
    subscribe(again, topic, "s", "shared")
    assert_nothing_more(again)


def _write_syscalls(pid):
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("syscw:")).split()[1])


@pytest.mark.parametrize("mode", ["always", "group"])
def test_fsync_always_writes_each_send_on_its_own_and_group_merges(start_broker, topic, mode):
    # docs/reliability.md: `always` is a write and an fsync per `send`; `group` merges the sends
    # that arrive while one is being written. Counted as write syscalls of the topic's log process.
    b = start_broker("--fsync", mode)
    conn = connect(b)
    pid = producer(conn, topic)
    send(conn, pid, [b"warm"])
    (log_pid,) = processes_of_kind(b, "ab-log")
    before = _write_syscalls(log_pid)
    n = 200
    for i in range(n):   # pipelined: the broker reads many of them in one go
        conn.send_frame({"op": "send", "rid": 1000 + i, "producer": pid, "msgs": [{"payload": b"%d" % i}]})
    receipts = [conn.recv_frame(timeout=10) for _ in range(n)]
    assert sorted(r["rid"] for r in receipts if r["op"] == "receipt") == list(range(1000, 1000 + n))
    writes = _write_syscalls(log_pid) - before
    if mode == "always":
        assert writes >= n
    else:
        assert writes < n


def test_an_ack_of_ids_another_consumer_holds_is_answered_to_the_acker(broker, topic):
    """An ack acknowledges for the whole subscription, whichever consumer holds the ids; the
    answer goes to whoever asked, on its connection (it once went to the holder's, and was lost)."""
    holder_conn, acker_conn = connect(broker), connect(broker)
    subscribe(holder_conn, topic, "s", "shared", name="a-holder")
    acker = subscribe(acker_conn, topic, "s", "shared", name="b-acker", credits=0)
    send(holder_conn, producer(holder_conn, topic), [b"m0", b"m1"])
    held = [o for o, _, _ in receive(holder_conn, 2)]
    assert acker_conn.request({"op": "ack", "consumer": acker, "ids": held}) == {"op": "ok", "rid": acker_conn.last_rid}
    sub = acker_conn.request({"op": "stats", "topic": topic})["subscriptions"][0]
    assert sub["backlog"] == 0 and [c["unacked"] for c in sub["consumers"]] == [0, 0]
    holder_conn.close()     # acked by the other consumer: nothing left to redeliver
    assert_nothing_more(acker_conn)


def test_a_demoted_failover_consumers_unacked_go_to_the_new_active_one(broker, topic):
    """Failover: the active consumer holds unacked messages when one that sorts first attaches:
    those go to the newcomer, in order and before newer ones (Pulsar does the same)."""
    old_conn, new_conn = connect(broker), connect(broker)
    demoted = subscribe(old_conn, topic, "s", "failover", name="b-first-here")
    pid = producer(old_conn, topic)
    send(old_conn, pid, [b"m0", b"m1"])
    held = receive(old_conn, 2)
    subscribe(new_conn, topic, "s", "failover", name="a-sorts-first")
    send(old_conn, pid, [b"m2"])
    got = receive(new_conn, 3)
    assert [(o, p) for o, p, _ in got] == [(o, p) for o, p, _ in held] + [(2, b"m2")]
    assert [r for _, _, r in got] == [1, 1, 0]
    # the demoted one may still ack them: they are acknowledged for the subscription
    old_conn.request({"op": "ack", "consumer": demoted, "ids": [o for o, _, _ in held]})
    consumers = old_conn.request({"op": "stats", "topic": topic})["subscriptions"][0]["consumers"]
    assert {c["name"]: (c["active"], c["unacked"]) for c in consumers} == {
        "a-sorts-first": (True, 1), "b-first-here": (False, 0)}


@pytest.mark.parametrize("sub_type", ["shared", "failover", "exclusive", "key_shared"])
def test_unacked_messages_of_a_dead_consumer_are_redelivered_and_acked_ones_not(broker, topic, sub_type):
    doomed = connect(broker)
    first = subscribe(doomed, topic, "s", sub_type, name="a-doomed", credits=10)
    pid = producer(doomed, topic)
    send(doomed, pid, [f"m{i}".encode() for i in range(10)])
    got = receive(doomed, 10)
    acked = [o for o, _, _ in got[:4]]
    doomed.request({"op": "ack", "consumer": first, "ids": acked})
    survivor = connect(broker)
    if sub_type == "exclusive":
        doomed.close()      # exclusive: the next consumer can attach only once the holder is gone
        wait_for(lambda: survivor.request({"op": "stats", "topic": topic}),
                 lambda s: not s["subscriptions"][0]["consumers"])
        subscribe(survivor, topic, "s", sub_type, name="b-survivor")
    else:
        subscribe(survivor, topic, "s", sub_type, name="b-survivor")
        doomed.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_LINGER,
                               b"\x01\x00\x00\x00\x00\x00\x00\x00")
        doomed.close()      # abortive close (RST), as a crashed process's socket
    redelivered = receive(survivor, 6)
    # exactly the unacked ones, in offset order (so in order per key as well)
    assert [o for o, _, _ in redelivered] == [o for o, _, _ in got[4:]]
    assert all(r >= 1 for _, _, r in redelivered)
    assert_nothing_more(survivor)


def test_key_shared_keys_moved_to_a_newcomer_wait_for_the_old_owners_unacked(broker, topic):
    """PROTOCOL.md: on a reliable topic messages stay in order per key. A key that moves to a
    consumer that joins is held back from it while the consumer that had the key holds messages
    of it unacked (as Pulsar's key_shared does); a key whose old messages are acked flows at once.
    When the old owner goes, the newcomer gets its unacked messages first, then the newer ones:
    every key in offset order."""
    old_conn, new_conn = connect(broker), connect(broker)
    old = subscribe(old_conn, topic, "ks", "key_shared", name="a-old")
    pid = producer(old_conn, topic)
    keys = [f"k{i}" for i in range(16)]
    batch = lambda ids: {"op": "send", "producer": pid, "msgs": [{"payload": b"%d" % i, "key": keys[i % 16]} for i in ids]}
    old_conn.request(batch(range(32)))
    first = receive(old_conn, 32, fields=("id", "key"))          # every key is a-old's; none acked
    subscribe(new_conn, topic, "ks", "key_shared", name="b-new")
    old_conn.request(batch(range(32, 64)))
    assert_nothing_more(new_conn)                                 # the moved keys wait...
    sub = wait_for(lambda: old_conn.request({"op": "stats", "topic": topic})["subscriptions"][0],
                   lambda sub: sub["backlog"] + {c["name"]: c["unacked"] for c in sub["consumers"]}["a-old"] == 64)
    waiting = sub["backlog"]
    assert 0 < waiting < 32 and waiting % 2 == 0, sub
    stayed = receive(old_conn, 32 - waiting, fields=("id", "key"))  # ...the others came to a-old
    moved = sorted(set(keys) - {k for _, k in stayed})
    assert len(moved) == waiting // 2
    # a-old acks what it has of one moved key: that key (only) flows to b-new now
    old_conn.request({"op": "ack", "consumer": old, "ids": [o for o, k in first if k == moved[0]]})
    got = receive(new_conn, 2, fields=("id", "key"))
    assert got == [(o, moved[0]) for o in range(32, 64) if keys[o % 16] == moved[0]]
    assert_nothing_more(new_conn)
    old_conn.close()    # its unacked are redelivered to b-new first, then what waited
    got += receive(new_conn, 64 - 4, fields=("id", "key"))
    assert sorted(o for o, _ in got) == sorted(set(range(64)) - {o for o, k in first if k == moved[0]})
    for key in keys:
        ids = [o for o, k in got if k == key]
        assert ids == sorted(ids), (key, ids)


@pytest.mark.parametrize("sub_type", ["shared", "failover", "key_shared"])
def test_unsubscribe_gives_the_leavers_unacked_messages_to_nobody(broker, topic, sub_type):
    """PROTOCOL.md: unsubscribe deletes the subscription and every other consumer gets `closed`.
    What the leaver held unacked is not redelivered to the others first, and no failover standby
    is promoted on the way."""
    leaver = connect(broker)
    consumer = subscribe(leaver, topic, "s", sub_type, name="a-leaver", credits=10)
    pid = producer(leaver, topic)
    send(leaver, pid, [f"m{i}".encode() for i in range(5)])
    assert len(receive(leaver, 5)) == 5
    other = connect(broker)
    subscribe(other, topic, "s", sub_type, name="b-other")
    leaver.request({"op": "unsubscribe", "consumer": consumer})
    seen = []
    while True:
        frame = other.recv_frame(timeout=10)
        assert frame is not None
        seen.append(frame)
        if frame["op"] == "closed":
            break
    assert frame["reason"] == "unsubscribed"
    assert [f for f in seen if f["op"] == "message" or (f["op"] == "active" and f["active"])] == []
    assert_nothing_more(other)
    assert leaver.request({"op": "stats", "topic": topic})["subscriptions"] == []


def test_kill_9_of_a_consumer_process_redelivers_its_unacked(broker, topic):
    conn = connect(broker)
    pid = producer(conn, topic)
    proc = ClientProcess(broker, topic, "s", "shared", "a-proc", hold=True)
    try:
        send(conn, pid, [f"m{i}".encode() for i in range(5)])
        wait_for(lambda: conn.request({"op": "stats", "topic": topic}),
                 lambda s: s["subscriptions"][0]["consumers"][0]["unacked"] == 5)
        survivor = subscribe(conn, topic, "s", "shared", name="b-live")
        proc.proc.send_signal(signal.SIGKILL)
        got = receive(conn, 5)
        assert sorted(p for _, p, _ in got) == [f"m{i}".encode() for i in range(5)]
        assert survivor
    finally:
        proc.stop()


def test_nack_with_delay(broker, topic):
    conn = connect(broker)
    consumer = subscribe(conn, topic, "s", "exclusive")
    send(conn, producer(conn, topic), [b"x"])
    (offset, _, _), = receive(conn, 1)
    nacked_at = time.monotonic()
    conn.request({"op": "nack", "consumer": consumer, "ids": [offset], "delay_ms": 400})
    (again, payload, redeliveries), = receive(conn, 1)
    assert time.monotonic() - nacked_at >= 0.4
    assert (again, payload, redeliveries) == (offset, b"x", 1)


def test_messages_nacked_one_at_a_time_come_back_in_order(broker, topic):
    conn = connect(broker)
    consumer = subscribe(conn, topic, "s", "exclusive", credits=6)
    pid = producer(conn, topic)
    conn.request({"op": "send", "producer": pid, "msgs": [{"payload": b"m%d" % i, "key": "k"} for i in range(6)]})
    offsets = [o for o, _, _ in receive(conn, 6)]
    for offset in offsets:      # no credit left: they wait, each put back on its own
        conn.request({"op": "nack", "consumer": consumer, "ids": [offset]})
    conn.send_frame({"op": "flow", "consumer": consumer, "credits": 6})
    assert [o for o, _, _ in receive(conn, 6)] == offsets


def test_ack_timeout_redelivers(broker, topic):
    conn = connect(broker)
    consumer = subscribe(conn, topic, "s", "exclusive", ack_timeout_ms=300)
    send(conn, producer(conn, topic), [b"x", b"y"])
    first = receive(conn, 2)
    conn.request({"op": "ack", "consumer": consumer, "ids": [first[1][0]]})
    (again, payload, redeliveries), = receive(conn, 1, timeout=5)
    assert (again, payload, redeliveries) == (first[0][0], b"x", 1)


@pytest.mark.parametrize("sub_type", ["shared", "key_shared"])
def test_records_given_to_a_consumer_that_does_not_read_go_to_the_others(broker, topic, sub_type):
    """A consumer with huge credits that never reads its socket (but whose connection stays up):
    the ack timeout redelivered only what had been written to it. What it had been given beyond
    (assigned to it in the dispatcher behind the delivery its shard could not write) got no ack
    timeout, and was held for good while the other consumer sat idle with credit. Now its shard's
    delivery late by the ack timeout stalls it: what it was given and not sent goes to the others
    (key_shared: its keyless records)."""
    total, payload = 1500, b"x" * 10_000
    stuck = RawConnection(*broker.address)
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.hello(heartbeat_ms=60_000)   # alive for the whole test without reading
    subscribe(stuck, topic, "s", sub_type, "stuck", credits=10**9, ack_timeout_ms=1000)
    fast = connect(broker)
    fast_id = subscribe(fast, topic, "s", sub_type, "fast", credits=100)
    pub = connect(broker)
    producer_id = producer(pub, topic)
    for i in range(total // 10):
        pub.send_frame({"op": "send", "rid": 1000 + i, "producer": producer_id,
                        "msgs": [{"payload": payload}] * 10})
    receipts = 0
    while receipts < total // 10:
        assert pub.recv_frame(timeout=30)["op"] == "receipt"
        receipts += 1
    seen = set()
    deadline = time.monotonic() + 60   # generous: a liveness bound, not a speed one
    while len(seen) < total:
        try:
            frame = fast.recv_frame(timeout=max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            raise AssertionError(f"the fast consumer got {len(seen)} of {total}; the rest is held: "
                                 f"{fast.request({'op': 'stats', 'topic': topic})}") from None
        assert frame is not None
        if frame["op"] == "ping":
            fast.send_frame({"op": "pong", "rid": frame["rid"]})
        elif frame["op"] == "message":
            ids = [m["id"] for m in frame["msgs"]]
            seen.update(ids)
            fast.send_frame({"op": "ack", "consumer": fast_id, "ids": ids})
            fast.send_frame({"op": "flow", "consumer": fast_id, "credits": len(ids)})
    sub = wait_for(lambda: fast.request({"op": "stats", "topic": topic})["subscriptions"][0],
                   lambda s: s["backlog"] == 0 and s["cursor"] == total)
    assert sub["redelivered"] > 0   # (what was written to the stuck one came back by the timeout)
    for conn in (stuck, fast, pub):
        conn.sock.close()


def test_a_nack_redelivers_only_what_that_consumer_holds(broker, topic):
    """Shared: consumer b's nack of a message consumer a holds (still working on it) redelivered
    it at once, to be processed twice (a protocol probe; Pulsar nacks a consumer's own messages
    only). Ignored now; a's own nack redelivers it."""
    conn = connect(broker)
    a = subscribe(conn, topic, "s", "shared", "a", credits=1)
    send(conn, producer(conn, topic), [b"m"])
    (offset, _, _), = receive(conn, 1)
    b = subscribe(conn, topic, "s", "shared", "b")
    conn.send_frame({"op": "flow", "consumer": a, "credits": 10})
    assert conn.request({"op": "nack", "consumer": b, "ids": [offset]})["op"] == "ok"
    assert_nothing_more(conn)
    assert conn.request({"op": "nack", "consumer": a, "ids": [offset]})["op"] == "ok"
    assert [(o, r) for o, _, r in receive(conn, 1)] == [(offset, 1)]


def test_unsubscribing_redelivers_and_dead_letters_nothing(broker, topic):
    """A subscription deleted (unsubscribe) while a consumer holds unacknowledged messages: they
    went back to the ending subscription, counted as redelivered (a `redelivered` event) and, past
    max_redeliveries, published to the dead-letter topic: a subscription's end dead-lettered its
    messages (operability probe). They end with it now."""
    dlq = topic + "-dlq"
    holder = connect(broker)
    consumer = subscribe(holder, topic, "s", "shared", "c1", max_redeliveries=1, dead_letter_topic=dlq)
    send(holder, producer(holder, topic), [b"a", b"b"])
    offsets = [o for o, _, _ in receive(holder, 2)]
    holder.request({"op": "nack", "consumer": consumer, "ids": offsets})
    assert [r for _, _, r in receive(holder, 2)] == [1, 1]   # held again: one more would be past the max
    other = connect(broker)
    theirs = subscribe(other, topic, "s", "shared", "c2", credits=0)
    assert other.request({"op": "unsubscribe", "consumer": theirs})["op"] == "ok"
    closed = holder.recv_frame(timeout=10)
    while closed["op"] != "closed":
        closed = holder.recv_frame(timeout=10)
    assert closed["reason"] == "unsubscribed"
    watcher = connect(broker)
    names = set()
    deadline = time.monotonic() + 2   # a negative: the dead-letter topic appeared within ms when it did
    while time.monotonic() < deadline and dlq not in names:
        names = {t["name"] for t in watcher.request({"op": "topics"})["topics"]}
    assert dlq not in names


def test_messages_dead_lettered_as_the_broker_stops_are_in_one_place_or_the_other(start_broker, tmp_path, topic):
    """max_redeliveries 0: what a consumer holds unacknowledged when serve gets SIGTERM is
    dead-lettered as the stop detaches it. Each was acked on the subscription as its dead letter
    went out, before the dead-letter topic had stored it: 4-15 of 300 were then in neither place
    after the restart (a restart probe). A dead letter is acked once receipted now; after the
    restart every message is on the dead-letter topic, back on the subscription, or both."""
    data, dlq = tmp_path / "data", topic + "-dlq"
    b = start_broker(data_dir=data)
    conn = connect(b)
    subscribe(conn, dlq, "audit", "exclusive", credits=0)   # the dead-letter topic exists
    subscribe(conn, topic, "w", "shared", "holder", credits=1000, max_unacked=1000, max_redeliveries=0,
              dead_letter_topic=dlq)
    pid = producer(conn, topic)
    for i in range(6):
        send(conn, pid, [b"%d-%d" % (i, j) for j in range(50)])
    held = {p for _, p, _ in receive(conn, 300)}
    b.stop()   # SIGTERM, with the 300 held
    b2 = start_broker(data_dir=data)

    def drain(name, sub, **options):
        conn = connect(b2)
        subscribe(conn, name, sub, "shared", "after", credits=1000, max_unacked=1000, **options)
        stats = wait_for(lambda: connect(b2).request({"op": "stats", "topic": name}),
                         lambda s: any(x["name"] == sub and x["consumers"] for x in s["subscriptions"]))
        entry = [x for x in stats["subscriptions"] if x["name"] == sub][0]
        count = entry["backlog"] + sum(c["unacked"] for c in entry["consumers"])
        return {p for _, p, _ in receive(conn, count)} if count else set()
    back = drain(topic, "w")
    dead = drain(dlq, "check", start="earliest")
    assert len(held) == 300 and held - back - dead == set()


def test_dead_letter_after_max_redeliveries(broker, topic):
    dlq = topic + "-dlq"
    conn = connect(broker)
    consumer = subscribe(conn, topic, "s", "exclusive", max_redeliveries=1, dead_letter_topic=dlq)
    pid = conn.request({"op": "producer", "topic": topic, "dispatch": "reliable", "name": "orders-app"})["producer"]
    conn.request({"op": "send", "producer": pid, "msgs": [{"payload": b"poison", "key": "k1", "attrs": {"a": "b"}}]})
    (offset, _, _), = receive(conn, 1)
    conn.request({"op": "nack", "consumer": consumer, "ids": [offset]})
    (_, _, redeliveries), = receive(conn, 1)
    assert redeliveries == 1
    conn.request({"op": "nack", "consumer": consumer, "ids": [offset]})   # past max: dead-lettered
    watcher = connect(broker)
    wait_for(lambda: [t["name"] for t in watcher.request({"op": "topics"})["topics"]],
             lambda names: dlq in names)
    subscribe(watcher, dlq, "audit", "exclusive", start="earliest")
    frame = watcher.recv_frame()
    while frame["op"] != "message":
        frame = watcher.recv_frame()
    [record] = frame["msgs"]
    # the message as it was sent, by whom it was sent, counted afresh on the dead-letter topic
    assert (record["payload"], record["key"], record["attrs"], record["producer"], record["redeliveries"]) == \
        (b"poison", "k1", {"a": "b"}, "orders-app", 0)
    stats = conn.request({"op": "stats", "topic": topic})
    assert stats["dead_lettered"] == 1
    assert_nothing_more(conn)


def test_a_dead_letter_for_a_non_reliable_topic_stays_on_its_subscription(broker, topic):
    """A dead-letter topic that already existed as non_reliable took the dead letter and kept it
    nowhere, and the subscription counted it as acknowledged: lost (reliable probe). It is refused
    there now; the subscription keeps it and tries again, so once that topic is deleted, the next
    try creates it reliable and stores it."""
    dlq = topic + "-dlq"
    conn = connect(broker)
    assert conn.request({"op": "producer", "topic": dlq, "dispatch": "non_reliable"})["op"] == "producer_ok"
    consumer = subscribe(conn, topic, "s", "exclusive", max_redeliveries=0, dead_letter_topic=dlq)
    send(conn, producer(conn, topic), [b"poison"])
    (offset, _, _), = receive(conn, 1)
    conn.request({"op": "nack", "consumer": consumer, "ids": [offset]})   # past max: dead-lettered
    watcher = connect(broker)
    # refused by the non_reliable topic, at the first try and at the next (5 s later)
    deadline = time.monotonic() + 7
    while time.monotonic() < deadline:
        stats = watcher.request({"op": "stats", "topic": topic})
        assert stats["dead_lettered"] == 0, stats
        assert watcher.request({"op": "stats", "topic": dlq})["msgs_in"] == 0
    assert watcher.request({"op": "delete_topic", "topic": dlq})["op"] == "ok"
    wait_for(lambda: watcher.request({"op": "stats", "topic": topic})["dead_lettered"], lambda n: n == 1,
             timeout=15)
    subscribe(watcher, dlq, "audit", "exclusive", start="earliest")
    assert [p for _, p, _ in receive(watcher, 1)] == [b"poison"]
    assert watcher.request({"op": "stats", "topic": dlq})["dispatch"] == "reliable"


def test_earliest_replays_history_and_latest_does_not(broker, topic):
    conn = connect(broker)
    pid = producer(conn, topic)
    send(conn, pid, [b"old-1", b"old-2"])
    early = connect(broker)
    subscribe(early, topic, "early", "exclusive", start="earliest")
    late = connect(broker)
    subscribe(late, topic, "late", "exclusive")
    send(conn, pid, [b"new"])
    assert [p for _, p, _ in receive(early, 3)] == [b"old-1", b"old-2", b"new"]
    assert [p for _, p, _ in receive(late, 1)] == [b"new"]


def test_subscription_outlives_its_consumers(broker, topic):
    conn = connect(broker)
    consumer = subscribe(conn, topic, "durable", "shared")
    conn.request({"op": "close_consumer", "consumer": consumer})
    pid = producer(conn, topic)
    send(conn, pid, [b"while away"])
    again = connect(broker)
    subscribe(again, topic, "durable", "shared", name="back")
    assert [p for _, p, _ in receive(again, 1)] == [b"while away"]


def test_max_unacked_bounds_deliveries(broker, topic):
    conn = connect(broker)
    consumer = subscribe(conn, topic, "s", "exclusive", max_unacked=3)
    send(conn, producer(conn, topic), [f"m{i}".encode() for i in range(5)])
    got = receive(conn, 3)
    assert_nothing_more(conn)
    conn.request({"op": "ack", "consumer": consumer, "ids": [got[0][0]]})
    assert [p for _, p, _ in receive(conn, 1)] == [b"m3"]


@pytest.mark.parametrize("asked", [1000, 2**32 - 1])
def test_max_unacked_is_clamped_to_the_brokers_bound(start_broker, topic, asked):
    """A client may ask any max_unacked up to 2^32 - 1; each unacknowledged message costs the
    broker memory, so --max-unacked-per-consumer bounds it (memory grew without limit)."""
    b = start_broker("--max-unacked-per-consumer", "4")
    conn = connect(b)
    consumer = subscribe(conn, topic, "s", "exclusive", max_unacked=asked)
    send(conn, producer(conn, topic), [f"m{i}".encode() for i in range(10)])
    got = receive(conn, 4)
    assert_nothing_more(conn)
    conn.request({"op": "ack", "consumer": consumer, "ids": [got[0][0]]})
    assert [p for _, p, _ in receive(conn, 1)] == [b"m4"]


def test_retention_keeps_what_a_cursor_needs_and_deletes_the_rest(start_broker, topic):
    b = start_broker("--segment-bytes", "1500", "--retention-bytes", "5000")
    conn = connect(b)
    consumer = subscribe(conn, topic, "s", "exclusive")
    pid = producer(conn, topic)
    for i in range(60):   # about 150 bytes on disk each (a batch of one run): 6 segments
        send(conn, pid, [bytes(100)])
    got = receive(conn, 60)
    stats = conn.request({"op": "stats", "topic": topic})
    assert stats["segments"] > 4           # nothing acked: every segment is still needed
    conn.request({"op": "ack", "consumer": consumer, "ids": [o for o, _, _ in got]})
    send(conn, pid, [bytes(100)])           # retention runs with the next append
    receive(conn, 1)
    stats = conn.request({"op": "stats", "topic": topic})
    # the oldest segments, only as many as bring it under the limit: it kept as much history as
    # fits (deleting every free segment left one or two of them)
    assert 5000 - 1500 - 200 < stats["log_bytes"] <= 5000, stats["log_bytes"]
    # a new subscription from earliest starts at what is retained, with no gap after it
    reader = connect(b)
    subscribe(reader, topic, "late", "exclusive", start="earliest")
    offsets = [o for o, _, _ in receive(reader, 1)]
    assert offsets[0] > 0


def test_forced_retention_is_counted_in_stats(start_broker, topic):
    b = start_broker("--segment-bytes", "1500", "--retention-bytes", "3000")
    conn = connect(b)
    pid = producer(conn, topic)
    idle = subscribe(conn, topic, "idle", "exclusive", credits=0)   # never acks anything
    conn.request({"op": "close_consumer", "consumer": idle})
    for i in range(60):   # about 150 bytes each: past twice the limit
        send(conn, pid, [bytes(100)])
    stats = conn.request({"op": "stats", "topic": topic})
    assert stats["retention_forced"] > 0 and stats["log_bytes"] <= 2 * 3000 + 1500


def test_acks_free_segments_for_retention_without_another_send(start_broker, topic):
    b = start_broker("--segment-bytes", "1500", "--retention-bytes", "3000")
    conn = connect(b)
    consumer = subscribe(conn, topic, "s", "exclusive")
    pid = producer(conn, topic)
    for i in range(35):   # below twice the limit: nothing forced, every segment needed by "s"
        send(conn, pid, [bytes(100)])
    got = receive(conn, 35)
    before = conn.request({"op": "stats", "topic": topic})
    assert before["segments"] > 2 and before["retention_forced"] == 0
    conn.request({"op": "ack", "consumer": consumer, "ids": [o for o, _, _ in got]})
    after = wait_for(lambda: conn.request({"op": "stats", "topic": topic}),
                     lambda s: s["segments"] < before["segments"])
    assert after["log_bytes"] <= 3000 + 1500


def test_age_retention_deletes_segments_of_an_idle_topic(start_broker, topic):
    b = start_broker("--segment-bytes", "600", "--retention-ms", "300")
    conn = connect(b)
    pid = producer(conn, topic)
    for i in range(12):
        send(conn, pid, [bytes(100)])
    before = conn.request({"op": "stats", "topic": topic})["segments"]
    assert before > 2
    # no subscription needs them, no send comes: they go as their age runs out
    stats = wait_for(lambda: conn.request({"op": "stats", "topic": topic}), lambda s: s["segments"] == 1)
    assert stats["log_bytes"] < 600 * 2


def test_age_retention_deletes_old_acknowledged_segments(start_broker, topic):
    b = start_broker("--segment-bytes", "600", "--retention-ms", "300")
    conn = connect(b)
    consumer = subscribe(conn, topic, "s", "exclusive")
    pid = producer(conn, topic)
    for i in range(12):
        send(conn, pid, [bytes(100)])
    got = receive(conn, 12)
    conn.request({"op": "ack", "consumer": consumer, "ids": [o for o, _, _ in got]})
    before = conn.request({"op": "stats", "topic": topic})["segments"]
    assert before > 2
    # appends run retention; segments older than 300 ms and fully acknowledged go
    stats = wait_for(lambda: (send(conn, pid, [bytes(100)]), conn.request({"op": "stats", "topic": topic}))[1],
                     lambda s: s["segments"] < before, timeout=10, interval=0.2)
    assert stats["segments"] < before


def test_a_backlog_of_large_messages_is_read_back_from_the_log_in_lane_sized_parts(start_broker, tmp_path, topic):
    """After a restart a subscription reads its backlog back from the log, RELIABLE_BUFFER
    (5,000) records at a time: 150 records of 1 MB came in one 150 MB frame over the lane, which
    lanes refuse beyond 64 MiB, and the subscription was lost. Reads are bounded in bytes too, and
    what a dispatcher keeps in memory is bounded by --max-backlog-bytes."""
    from actorbroker.transport.client import Client
    data = tmp_path / "data"
    b = start_broker(data_dir=data)
    payload = b"L" * (1024 * 1024)
    with Client(*b.address) as client:
        client.subscribe(topic, "s", "exclusive", "c", dispatch="reliable").close()
        producer = client.producer(topic, dispatch="reliable")
        for _ in range(150):
            producer.send(payload)
        producer.flush(timeout=120)
    assert b.stop() == []
    b2 = start_broker(data_dir=data)
    with Client(*b2.address) as client:
        consumer = client.subscribe(topic, "s", "exclusive", "c", dispatch="reliable")
        got = [consumer.receive(timeout=30) for _ in range(150)]
        assert [m.id for m in got] == list(range(150)) and all(m.payload == payload for m in got)
        consumer.ack(got, sync=True)
