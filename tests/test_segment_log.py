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


# --- damage: a corrupt batch is skipped, never the rest of its segment (issue: acc-disk t14, t3) ---

def batch_positions(path):
    """(position, first offset, size) of each batch of a segment file, by its headers."""
    out, pos = [], 0
    with open(path, "rb") as f:
        data = f.read()
    while pos < len(data):
        length, _, first, _, _ = HEADER.unpack_from(data, pos)
        out.append((pos, first, HEADER.size + length))
        pos += HEADER.size + length
    return out


def flip(path, at, n=4):
    with open(path, "r+b") as f:
        f.seek(at)
        data = f.read(n)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in data))


def sealed_log(tmp_path):
    """A log of 3 sealed segments and an active one, 10 batches of 3 records each, closed."""
    log = SegmentLog(str(tmp_path), segment_bytes=600)
    fill(log, 40)
    log.close()
    paths = sorted(os.path.join(tmp_path, n) for n in os.listdir(tmp_path))
    assert len(paths) >= 3
    return paths


def test_a_corrupt_batch_of_a_sealed_segment_found_by_a_read_hides_nothing_after_it(tmp_path):
    paths = sealed_log(tmp_path)
    log = SegmentLog(str(tmp_path), segment_bytes=600)
    pos, first, size = batch_positions(paths[0])[2]
    flip(paths[0], pos + size - 6)   # bit rot in a body, after the log was opened
    offsets = [r[0] for r in log.read(0, max_records=10**6)]
    lost = list(range(first, first + 3))
    assert offsets == [o for o in range(120) if o not in lost]
    assert log.lost_between(0, 120) == [(first, first + 3)]
    assert (log.corrupt_batches, log.corrupt_bytes) == (1, size)
    assert [r[0] for r in log.read(first, max_records=4)][:4] == [first + 3, first + 4, first + 5, first + 6]
    assert log.corrupt_batches == 1   # counted once, however often read


def test_a_corrupt_header_in_a_sealed_segment_is_skipped_at_open_and_nothing_truncated(tmp_path):
    paths = sealed_log(tmp_path)
    size_before = os.path.getsize(paths[0])
    pos, first, _ = batch_positions(paths[0])[1]
    flip(paths[0], pos, 2)   # the length of the second batch: its header leads nowhere
    again = SegmentLog(str(tmp_path), segment_bytes=600)
    assert again.truncated_bytes == 0 and os.path.getsize(paths[0]) == size_before
    assert again.next_offset == 120 and again.corrupt_batches == 1
    assert again.lost_between(0, 120) == [(first, first + 3)]
    assert [r[0] for r in again.read(0, max_records=10**6)] == [o for o in range(120) if not first <= o < first + 3]
    assert again.append([("k", b"after")]) == 120


def test_a_corrupt_batch_amid_the_active_segment_keeps_the_batches_after_it(tmp_path):
    log = SegmentLog(str(tmp_path), segment_bytes=10**6)
    fill(log, 6)
    log.close()
    (path,) = [os.path.join(tmp_path, n) for n in os.listdir(tmp_path)]
    pos, first, size = batch_positions(path)[2]
    flip(path, pos + size // 2)
    again = SegmentLog(str(tmp_path), segment_bytes=10**6)
    assert again.truncated_bytes == 0 and again.next_offset == 18 and again.corrupt_batches == 1
    assert [r[0] for r in again.read(0)] == [o for o in range(18) if not 6 <= o < 9]
    assert again.append([("k", b"after")]) == 18


def test_a_log_continues_at_a_given_offset_even_when_empty_and_keeps_it(tmp_path):
    log = SegmentLog(str(tmp_path), segment_bytes=10**6)
    fill(log, 2)
    assert log.continue_at(4) is None   # never backwards
    assert log.continue_at(50) == (6, 50)
    assert log.append([("k", b"x")]) == 50
    log.close()
    again = SegmentLog(str(tmp_path), segment_bytes=10**6)
    assert again.next_offset == 51 and again.lost_between(0, 51) == [(6, 50)]
    assert [r[0] for r in again.read(0)] == [0, 1, 2, 3, 4, 5, 50]
    again.close()
    empty = SegmentLog(str(tmp_path / "empty"))
    assert empty.continue_at(7) == (0, 7)
    empty.close()
    empty = SegmentLog(str(tmp_path / "empty"))
    assert empty.next_offset == 7 and empty.first_offset == 7 and len(os.listdir(tmp_path / "empty")) == 1
    empty.close()
