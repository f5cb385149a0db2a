"""The segment log on real files in a temp dir (no actors): append, read, roll, recovery."""
import os

from actorbroker.storage.segment_log import HEADER, SegmentLog


def fill(log, batches, per_batch=3):
    for i in range(batches):
        log.append([(f"k{i}", f"tail-{i}-{j}".encode()) for j in range(per_batch)], time_ms=1000 + i)
    log.sync()


def test_append_read_and_roll(tmp_path):
    log = SegmentLog(str(tmp_path), segment_bytes=500)
    fill(log, 40)
    assert log.next_offset == 120 and len(log.segments) > 3
    records = log.read(50, max_records=10)
    assert [r[0] for r in records][:10] == list(range(50, 60))
    assert records[0][1] == "k16" and records[0][3] == b"tail-16-2"
    assert records[0][2] == 1016


def test_reopen_finds_the_end(tmp_path):
    fill(SegmentLog(str(tmp_path), segment_bytes=500), 10)
    again = SegmentLog(str(tmp_path), segment_bytes=500)
    assert again.next_offset == 30 and again.truncated_bytes == 0
    assert again.append([("k", b"x")]) == 30


def test_torn_tail_is_truncated(tmp_path):
    log = SegmentLog(str(tmp_path), segment_bytes=10**6)
    fill(log, 5)
    log.close()
    (path,) = [os.path.join(tmp_path, n) for n in os.listdir(tmp_path)]
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 5)
    again = SegmentLog(str(tmp_path), segment_bytes=10**6)
    assert again.next_offset == 12 and again.truncated_bytes > 0
    assert os.path.getsize(path) < size - 5


def test_corrupt_body_is_detected_by_checksum(tmp_path):
    log = SegmentLog(str(tmp_path), segment_bytes=10**6)
    fill(log, 3)
    log.close()
    (path,) = [os.path.join(tmp_path, n) for n in os.listdir(tmp_path)]
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 2)
        f.write(b"\xff\xff")   # flip bytes inside the last batch's body
    again = SegmentLog(str(tmp_path), segment_bytes=10**6)
    assert again.next_offset == 6 and [r[0] for r in again.read(0)] == list(range(6))


def test_a_zero_filled_tail_is_torn_and_nothing_before_it_is_lost(tmp_path):
    # A power loss can leave a file extended with zeros whose data never reached the disk; a
    # zero header reads as an empty batch of offset 0 whose empty body passes the crc.
    log = SegmentLog(str(tmp_path), segment_bytes=10**6)
    fill(log, 4)
    log.close()
    (path,) = [os.path.join(tmp_path, n) for n in os.listdir(tmp_path)]
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(bytes(4096))
    again = SegmentLog(str(tmp_path), segment_bytes=10**6)
    assert again.truncated_bytes == 4096 and os.path.getsize(path) == size
    assert again.next_offset == 12 and [r[0] for r in again.read(0)] == list(range(12))
    assert again.append([("k", b"after")]) == 12


def test_a_batch_that_does_not_continue_the_offsets_ends_the_segment(tmp_path):
    log = SegmentLog(str(tmp_path), segment_bytes=10**6)
    fill(log, 3)
    log.close()
    (path,) = [os.path.join(tmp_path, n) for n in os.listdir(tmp_path)]
    with open(path, "rb") as f:
        data = f.read()
    length = HEADER.unpack(data[:HEADER.size])[0]
    first_batch = data[:HEADER.size + length]
    with open(path, "ab") as f:
        f.write(first_batch)   # a valid batch, but of offsets 0..2 again
    again = SegmentLog(str(tmp_path), segment_bytes=10**6)
    assert again.next_offset == 9 and again.truncated_bytes == len(first_batch)
    assert [r[0] for r in again.read(0)] == list(range(9))


def test_delete_before_keeps_the_segment_holding_the_offset(tmp_path):
    log = SegmentLog(str(tmp_path), segment_bytes=300)
    fill(log, 30)
    firsts = [s.first_offset for s in log.segments]
    removed = log.delete_before(firsts[2])
    assert removed == 2 and log.first_offset == firsts[2]
    assert log.read(0, 1)[0][0] == firsts[2]
    assert HEADER.size == 28
