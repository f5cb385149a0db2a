"""A reliable topic's log damaged on disk between two runs of a real broker: offsets never go
backwards, and no subscription is left behind a hole (acc-disk t4)."""
import os

from actorbroker.storage.segment_log import HEADER
from tests.test_reliable import assert_nothing_more, connect, producer, receive, send, subscribe
from tests.util import wait_for


def cut_at_batch(segment, batches):
    """Keep the first `batches` batches of a segment: what a machine crash under --fsync
    interval:MS may leave (the last MS of receipted sends lost), at a batch boundary."""
    with open(segment, "rb") as f:
        data = f.read()
    pos = 0
    for _ in range(batches):
        pos += HEADER.size + HEADER.unpack_from(data, pos)[0]
    assert pos < len(data)
    os.truncate(segment, pos)


def test_a_log_tail_lost_below_a_cursor_never_reuses_its_offsets(start_broker, tmp_path, topic):
    data = tmp_path / "data"
    b = start_broker("--fsync", "interval:1000", data_dir=data)
    conn, other = connect(b), connect(b)
    dur = subscribe(conn, topic, "dur", "exclusive", name="c0", credits=1000, start="earliest")
    lag = subscribe(other, topic, "lag", "exclusive", name="c1", credits=1000, start="earliest")
    pid = producer(conn, topic)
    for i in range(10):   # one batch per send: each waits for its receipt
        assert send(conn, pid, [b"old%d" % (i * 10 + j) for j in range(10)])["first"] == i * 10
    assert [o for o, _, _ in receive(conn, 100)] == list(range(100))
    assert [o for o, _, _ in receive(other, 100)] == list(range(100))
    assert conn.request({"op": "ack", "consumer": dur, "ids": list(range(100))})["op"] == "ok"
    assert other.request({"op": "ack", "consumer": lag, "ids": list(range(30))})["op"] == "ok"
    b.stop()   # clean stop: every cursor saved

    (segment,) = list((data / "topics").glob("*/log/*.log"))
    cut_at_batch(segment, 5)   # offsets 50..99 lost, below dur's cursor (100), above lag's (30)

    b2 = start_broker("--fsync", "interval:1000", data_dir=data)
    again = connect(b2)
    dur = subscribe(again, topic, "dur", "exclusive", name="c0", credits=1000)
    receipt = send(again, producer(again, topic), [b"new0", b"new1", b"new2"])
    assert receipt["first"] >= 100   # above every id handed out before
    assert [(o, p) for o, p, _ in receive(again, 3)] == [(receipt["first"] + i, b"new%d" % i) for i in range(3)]
    assert_nothing_more(again)
    log_text = (data / "broker.log").read_text(errors="replace")
    assert any(topic in line and "WARNING" in line and "50..99" in line for line in log_text.splitlines())

    # a subscription whose cursor was below the lost tail gets what is left, then the new ones,
    # and its backlog moves past the hole
    lagging = connect(b2)
    lag = subscribe(lagging, topic, "lag", "exclusive", name="c1", credits=1000)
    ids = [o for o, _, _ in receive(lagging, 23)]
    assert ids == list(range(30, 50)) + [receipt["first"] + i for i in range(3)]
    assert lagging.request({"op": "ack", "consumer": lag, "ids": ids})["op"] == "ok"
    end = receipt["first"] + 3
    stats = wait_for(lambda: lagging.request({"op": "stats", "topic": topic}),
                     lambda s: {sub["name"]: sub["cursor"] for sub in s["subscriptions"]}.get("lag") == end)
    assert {sub["name"]: sub["backlog"] for sub in stats["subscriptions"]} == {"dur": 0, "lag": 0}


def test_a_corrupt_batch_in_a_sealed_segment_loses_only_its_own_messages(start_broker, tmp_path, topic):
    data = tmp_path / "data"
    b = start_broker("--segment-bytes", "1000", data_dir=data)
    conn = connect(b)
    pid = producer(conn, topic)
    for i in range(20):
        assert send(conn, pid, [b"m%04d" % (i * 10 + j) for j in range(10)])["first"] == i * 10
    first_segment = sorted((data / "topics").glob("*/log/*.log"))[0]
    with open(first_segment, "r+b") as f:   # bit rot in the body of the second batch (offsets 10..19)
        length = HEADER.unpack(f.read(HEADER.size))[0]
        f.seek(2 * HEADER.size + length + 5)
        f.write(b"\xff\xff\xff\xff")
    reader = connect(b)
    consumer = subscribe(reader, topic, "late", "exclusive", credits=1000, start="earliest")
    got = receive(reader, 190)
    assert [(o, p) for o, p, _ in got] == [(o, b"m%04d" % o) for o in range(200) if not 10 <= o < 20]
    assert_nothing_more(reader)
    assert reader.request({"op": "ack", "consumer": consumer, "ids": [o for o, _, _ in got]})["op"] == "ok"
    stats = wait_for(lambda: reader.request({"op": "stats", "topic": topic}),
                     lambda s: s["subscriptions"][0]["cursor"] == 200)
    assert stats["subscriptions"][0]["backlog"] == 0   # past the hole, not stuck below it
    assert stats["corrupt_batches_skipped"] == 1 and stats["corrupt_bytes_skipped"] > 0
    assert "offsets 10..19 (10 records) are lost" in (data / "broker.log").read_text(errors="replace")
