"""The segment log's batches of runs (storage/segment_log.py) on real files, no actors: read back
as runs next to the earlier format's batches of records, cut where a read starts, recovered
after a torn tail, and bounded by a fenced owner's limit."""
import os

import msgpack

from actorbroker.storage import fencing
from actorbroker.storage.segment_log import RUNS_FORMAT, SegmentLog
from actorbroker.storage.topic_store import TopicStore
from actorbroker.transport.codec import encode_record_tail, make_run, run_records

T = 1_700_000_000_000


def records_of(runs):
    """(offset, payload, key, attrs, time, producer, redeliveries) of every record of `runs`."""
    return [(o, p, k, a, run[2], run[3], run[4]) for run in runs for o, p, k, a in run_records(run)]


def old_batch(log, first, payloads, time_ms, producer="old", keys=None):
    """A batch as earlier versions wrote it: [key, v1 tail] per record."""
    keys = keys or [None] * len(payloads)
    assert log.append([(k, encode_record_tail(p, k, {}, producer)) for p, k in zip(payloads, keys)],
                      time_ms) == first


def new_batch(log, first, runs, time_ms):
    assert log.append_runs(runs, time_ms) == first


def expected(first, payloads, time_ms, producer, keys=None, attrs=None, redeliveries=0):
    keys = keys or [None] * len(payloads)
    attrs = attrs or [{}] * len(payloads)
    return [(first + i, p, keys[i], attrs[i], time_ms, producer, redeliveries) for i, p in enumerate(payloads)]


def mixed_log(path, segment_bytes=10**6):
    """Batches of records (offsets 0-4), then of runs (5-12), then records again (13-14)."""
    log = SegmentLog(str(path), segment_bytes=segment_bytes)
    old_batch(log, 0, [b"a0", b"a1", b"a2"], T)
    old_batch(log, 3, [b"k3", b"k4"], T + 1, keys=["x", "y"])
    new_batch(log, 5, [make_run(99, 0, "p1", [b"r5", b"r6", b"r7"]),
                       make_run(99, 0, "p2", [b"r8", b"r9"], keys=["k", None], attrs=[{}, {"h": "v"}])], T + 2)
    new_batch(log, 10, [make_run(99, 0, "p1", [b"r10", b"r11", b"r12"], redeliveries=2)], T + 3)
    old_batch(log, 13, [b"o13", b"o14"], T + 4)
    log.sync()
    return log


ALL = (expected(0, [b"a0", b"a1", b"a2"], T, "old") + expected(3, [b"k3", b"k4"], T + 1, "old", keys=["x", "y"])
       + expected(5, [b"r5", b"r6", b"r7"], T + 2, "p1")
       + expected(8, [b"r8", b"r9"], T + 2, "p2", keys=["k", None], attrs=[{}, {"h": "v"}])
       + expected(10, [b"r10", b"r11", b"r12"], T + 3, "p1", redeliveries=2)
       + expected(13, [b"o13", b"o14"], T + 4, "old"))


def test_both_formats_in_one_log_read_back_as_runs(tmp_path):
    log = mixed_log(tmp_path)
    assert log.next_offset == 15
    runs = log.read_runs(0, 1000)
    assert records_of(runs) == ALL
    # a run of the new format comes back whole, as it was sent: its payloads' bytes untouched
    assert [r[:2] for r in runs if r[0] in (5, 8, 10)] == [[5, 3], [8, 2], [10, 3]]
    assert next(r for r in runs if r[0] == 5)[5] == msgpack.packb([b"r5", b"r6", b"r7"])
    log.close()
    again = SegmentLog(str(tmp_path), segment_bytes=10**6)   # reopened: the index is rebuilt
    assert again.next_offset == 15 and again.truncated_bytes == 0
    assert records_of(again.read_runs(0, 1000)) == ALL
    # the record-by-record view gives the v1 tails of both formats
    tails = again.read(0, 1000)
    assert [(o, k, t) for o, k, t, _ in tails] == [(r[0], r[2], r[4]) for r in ALL]
    assert tails[8][3] == encode_record_tail(b"r8", "k", {}, "p2")
    assert tails[10][3] == encode_record_tail(b"r10", None, {}, "p1", 2)


def test_a_read_from_the_middle_of_a_run_starts_there(tmp_path):
    log = mixed_log(tmp_path)
    for start in range(15):
        assert records_of(log.read_runs(start, 1000)) == ALL[start:], start
    runs = log.read_runs(6, 1000)
    assert runs[0][:5] == [6, 2, T + 2, "p1", 0]
    assert log.read_runs(15, 1000) == []


def test_a_read_stops_after_about_max_records(tmp_path):
    log = mixed_log(tmp_path)
    got = records_of(log.read_runs(6, 3))   # whole batches: at least 3 records, at most the batch's
    assert got == ALL[6:10]
    assert records_of(log.read_runs(0, 1)) == ALL[:3]


def test_a_torn_batch_of_runs_is_truncated(tmp_path):
    log = mixed_log(tmp_path)
    new_batch(log, 15, [make_run(0, 0, "p3", [b"last%d" % i for i in range(50)])], T + 5)
    log.close()
    (path,) = [os.path.join(tmp_path, n) for n in os.listdir(tmp_path)]
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 7)   # the last batch of runs, torn in its body
    again = SegmentLog(str(tmp_path), segment_bytes=10**6)
    assert again.next_offset == 15 and again.truncated_bytes > 0
    assert records_of(again.read_runs(0, 1000)) == ALL
    new_batch(again, 15, [make_run(0, 0, "p3", [b"after"])], T + 6)
    again.close()
    again = SegmentLog(str(tmp_path), segment_bytes=10**6)
    assert records_of(again.read_runs(13, 1000)) == ALL[13:] + expected(15, [b"after"], T + 6, "p3")


def test_a_corrupt_batch_of_runs_is_detected_by_checksum(tmp_path):
    log = mixed_log(tmp_path)
    new_batch(log, 15, [make_run(0, 0, "p3", [b"z" * 40])], T + 5)
    log.close()
    (path,) = [os.path.join(tmp_path, n) for n in os.listdir(tmp_path)]
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 10)
        f.write(b"\xff\xff")
    again = SegmentLog(str(tmp_path), segment_bytes=10**6)
    assert again.next_offset == 15 and records_of(again.read_runs(0, 1000)) == ALL


def test_runs_roll_segments_and_retention_deletes_whole_ones(tmp_path):
    log = SegmentLog(str(tmp_path), segment_bytes=300)
    for i in range(40):
        new_batch(log, 3 * i, [make_run(0, 0, "p", [b"m%d-%d" % (i, j) for j in range(3)])], T + i)
    log.sync()
    assert log.next_offset == 120 and len(log.segments) > 3
    assert records_of(log.read_runs(50, 10))[:10] == [
        (o, b"m%d-%d" % (o // 3, o % 3), None, {}, T + o // 3, "p", 0) for o in range(50, 60)]
    firsts = [s.first_offset for s in log.segments]
    assert log.delete_before(firsts[2]) == 2
    assert log.read_runs(0, 1)[0][0] == firsts[2]
    assert log.oldest_time() > T


def test_the_batch_body_tells_its_format_by_its_first_element(tmp_path):
    log = mixed_log(tmp_path)
    log.close()
    (path,) = [os.path.join(tmp_path, n) for n in os.listdir(tmp_path)]
    from actorbroker.storage.segment_log import _read_batches
    firsts = [msgpack.unpackb(body)[0] for _, _, body in _read_batches(path)]
    assert [isinstance(f, int) for f in firsts] == [False, False, True, True, False]
    assert firsts[2] == RUNS_FORMAT


def open_store(folder, node, live=None, segment_bytes=64 * 1024 * 1024):
    return TopicStore(str(folder), "/orders", "reliable", segment_bytes, (node, node + "-1", live))


def test_a_fenced_owner_limit_in_the_middle_of_the_log_bounds_runs(tmp_path):
    """Old-format records, then runs of owner a; b takes over in the middle; a's later runs
    (same segment, then one of its own) are not part of the log, read from anywhere."""
    for seg in (10**6, 200):
        folder = tmp_path / str(seg)
        a = open_store(folder, "a", segment_bytes=seg)
        old_batch(a.log, 0, [b"a0", b"a1"], T)
        new_batch(a.log, 2, [make_run(0, 0, "pa", [b"a2", b"a3", b"a4"])], T + 1)
        a.log.sync()
        b = open_store(folder, "b", live=("b",), segment_bytes=seg)
        assert b.log.next_offset == 5
        new_batch(a.log, 5, [make_run(0, 0, "pa", [b"late%d" % i for i in range(30)])], T + 2)
        new_batch(a.log, 35, [make_run(0, 0, "pa", [b"later"])], T + 3)
        a.log.sync()
        assert a.fenced_by() == "b"
        new_batch(b.log, 5, [make_run(0, 0, "pb", [b"b5", b"b6"])], T + 4)
        b.log.sync()
        want = (expected(0, [b"a0", b"a1"], T, "old") + expected(2, [b"a2", b"a3", b"a4"], T + 1, "pa")
                + expected(5, [b"b5", b"b6"], T + 4, "pb"))
        for start in range(7):
            assert records_of(b.log.read_runs(start, 1000)) == want[start:], (seg, start)
        a.close()
        b.close()
        c = open_store(folder, "c", live=("c",), segment_bytes=seg)
        assert c.log.next_offset == 7
        assert records_of(c.log.read_runs(0, 1000)) == want
        assert records_of(c.log.read_runs(3, 1000)) == want[3:]
        c.close()


def test_read_runs_stops_at_max_bytes_with_whole_batches_and_at_least_one(tmp_path):
    log = SegmentLog(tmp_path / "log")
    for i in range(6):
        log.append_runs([make_run(i, 0, "p", [b"x" * 1000])], 0)
    assert [r[0] for r in log.read_runs(0, 1000, max_bytes=1)] == [0]            # at least one batch
    assert [r[0] for r in log.read_runs(2, 1000, max_bytes=2500)] == [2, 3]
    assert len(log.read_runs(0, 1000, max_bytes=None)) == 6
