"""An append-only topic log in segment files, with per-batch checksums and a sparse index.

Layout of a topic directory:
    00000000000000000000.log   records from offset 0 ...
    00000000000000052311.log   ... the next segment, named by its first offset
    00000000000000060000-000000000003.log   in a shared folder (storage/fencing.py): a segment
                               written in epoch 3; an epoch's segments are read only below the
                               start of the next epoch that began writing (its `limit`)

A segment is a sequence of batches. A batch is a 28-byte header
    body length (u32) | crc32 of body (u32) | first offset (u64) | record count (u32) | time ms (u64)
followed by the body, a msgpack array in one of two formats, told apart by its first element:
  - runs (what this version writes): [RUNS_FORMAT (an int), run, run, ...], each
    run [count, producer, redeliveries, payloads, keys, attrs] (transport/codec.py's run without
    its first offset and time: the runs follow each other from the batch's first offset, and
    their time is the batch's); payloads is the run's msgpack array of payloads, kept as the
    bytes it arrived as (a bin), so neither writing nor reading a batch touches a record;
  - records (written by earlier versions, still read): [[key, tail], ...], where `tail` is the
    pre-encoded rest of a v1 record (payload, key, attrs, producer, redeliveries); its first
    element is an array, never an int. Read back as runs with codec.runs_from_tails.
The record count of the header counts records either way. Recovery scans the last segment and
truncates it at a torn or corrupt tail. A corrupt batch with valid batches after it (bit rot, or
pages a crash wrote out of order) is never truncated: it is skipped, the reader resyncs at the
next batch whose header is sane and whose checksum verifies, and its offsets are *lost*
(Segment.lost, logged at ERROR once, counted in corrupt_batches / corrupt_bytes); a sealed
segment is never truncated at all. Reads go by the index, checking each batch against it and its
checksum; a batch found corrupt then is skipped the same way. lost_between() names the offsets
the log lacks (lost batches, gaps between segments) so that a subscription can move past them.

The sparse index (offset -> file position, one entry per batch, in memory) is rebuilt when a
segment is opened; reading from an offset bisects it instead of scanning the segment.
"""
import bisect
import logging
import os
import re
import struct
import time
import zlib

import msgpack

from actorbroker.transport.codec import (RUN_ATTRS, RUN_COUNT, RUN_KEYS, RUN_PAYLOADS, RUN_PRODUCER,
                                         RUN_REDELIVERIES, run_tails, runs_from_tails, split_run)

log = logging.getLogger("actorbroker.storage")

HEADER = struct.Struct(">IIQIQ")   # body length, crc32, first offset, count, time ms
SEGMENT_SUFFIX = ".log"
RUNS_FORMAT = 1                    # first element of a body of runs (see above)
_pack = msgpack.Packer(use_bin_type=True).pack


class CorruptBatch(Exception):
    pass


def _segment_name(first_offset, epoch=0):
    if epoch:
        return f"{first_offset:020d}-{epoch:012d}{SEGMENT_SUFFIX}"
    return f"{first_offset:020d}{SEGMENT_SUFFIX}"


def _parse_segment_name(name):
    """(first offset, epoch) of a segment file name, or None."""
    if not name.endswith(SEGMENT_SUFFIX):
        return None
    first, _, epoch = name[:-len(SEGMENT_SUFFIX)].partition("-")
    if not first.isdigit() or (epoch and not epoch.isdigit()):
        return None
    return int(first), int(epoch or 0)


def _read_batches(path, start=0, verify=True):
    """Yield (position, header tuple, body) of the valid batches of a segment file from `start`;
    stops at the first torn or corrupt batch and then yields ("torn", position). Without
    `verify`, bodies are skipped, not read (body None): only the headers are walked."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(start)
        pos = start
        while True:
            head = f.read(HEADER.size)
            if not head:
                return
            if len(head) < HEADER.size:
                yield ("torn", pos)
                return
            length, crc, first, count, stamp = HEADER.unpack(head)
            if length == 0 or count == 0:
                # every batch holds a record: zeros here are a tail the file system extended but
                # never wrote (a power loss), whose empty body even passes the crc (crc32 of b"")
                yield ("torn", pos)
                return
            if verify:
                body = f.read(length)
                if len(body) < length or zlib.crc32(body) != crc:
                    yield ("torn", pos)
                    return
            else:
                if pos + HEADER.size + length > size:
                    yield ("torn", pos)
                    return
                body = None
                f.seek(length, os.SEEK_CUR)
            yield (pos, (length, crc, first, count, stamp), body)
            pos += HEADER.size + length


def _batch_at(f, pos, size, expected, upper, verify):
    """The header tuple of the batch at `pos` if it is sane (non-empty, within the file, of first
    offset `expected`, below `upper`) and, with `verify`, its checksum matches; else None."""
    f.seek(pos)
    head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    length, crc, first, count, stamp = HEADER.unpack(head)
    # every batch holds a record: zeros are a tail the file system extended but never wrote (a
    # power loss), whose empty body even passes the crc (crc32 of b""); offsets run on from batch
    # to batch: a batch that does not continue them was not written there by this segment's writer
    if length == 0 or count == 0 or pos + HEADER.size + length > size or first != expected:
        return None
    if upper is not None and first + count > upper:
        return None
    if verify and zlib.crc32(f.read(length)) != crc:
        return None
    return length, crc, first, count, stamp


def _crc_ok(f, pos, size):
    f.seek(pos)
    data = f.read(size)
    return len(data) == size and zlib.crc32(data[HEADER.size:]) == HEADER.unpack_from(data)[1]


def _resync(f, start, size, expected, upper):
    """(position, header tuple) of the first batch from `start` on whose header is sane (first
    offset at or above `expected`, below `upper`) and whose checksum verifies, or None. Only
    after damage: the rest of the file is read at once and candidates are found by a regular
    expression (a header's count is below 2**24, its first offset has the high word of
    `expected`), so that only few positions are checked in Python."""
    f.seek(start)
    data = f.read(size - start)
    high = expected >> 32
    if upper is None or (upper - 1) >> 32 == high:
        first_high = re.escape(high.to_bytes(4, "big"))
    else:
        first_high = b".{4}"
    candidate = re.compile(b"(?=(?!\\x00{4}).{8}" + first_high + b".{4}\\x00)", re.DOTALL)
    for match in candidate.finditer(data):
        i = match.start()
        if i + HEADER.size > len(data):
            break
        length, crc, first, count, stamp = HEADER.unpack_from(data, i)
        if not count or first < expected or (upper is not None and first + count > upper):
            continue
        end = i + HEADER.size + length
        if end <= len(data) and zlib.crc32(data[i + HEADER.size:end]) == crc:
            return start + i, (length, crc, first, count, stamp)
    return None


def _checked_body(data, first, count):
    """The body of a batch read back by the index (header and body in `data`), or None when it
    is not the batch the index holds there or its checksum fails (bit rot since it was written)."""
    if len(data) < HEADER.size:
        return None
    length, crc, head_first, head_count, stamp = HEADER.unpack_from(data)
    body = data[HEADER.size:]
    if length != len(body) or head_first != first or head_count != count or zlib.crc32(body) != crc:
        return None
    return stamp, body


class Segment:
    def __init__(self, directory, first_offset, epoch=0, limit=None, topic=None):
        self.topic = topic        # for the log lines
        self.path = os.path.join(directory, _segment_name(first_offset, epoch))
        self.first_offset = first_offset
        self.epoch = epoch
        self.limit = limit        # records from this offset on are another epoch's: ignored
        self.next_offset = first_offset
        self.size = 0
        self.index_offsets = []   # first offset of each batch
        self.index_positions = []
        self.index_counts = []    # records of each batch
        self.index_sizes = []     # bytes of each batch, its header included
        self.last_time = 0
        self.lost = []            # (first, end, bytes): offsets of corrupt batches, skipped

    def load(self, verify=True, upper=None):
        """Rebuild the index by scanning. With `verify` (the active segment: a crash may have
        torn it) every batch is checksummed and a torn or corrupt tail is truncated; without,
        (a sealed segment, fsynced when the log rolled past it, the checkpoint) only the headers
        are walked, and `upper`, the next segment's first offset, bounds its offsets. A corrupt
        batch with a valid one after it is skipped, never truncated (self.lost); a sealed segment
        is never truncated. Returns the bytes truncated."""
        self.size = 0
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            pos = 0
            while pos < size:
                batch = _batch_at(f, pos, size, self.next_offset, upper, verify)
                if batch is None and not verify and self.index_positions \
                        and not _crc_ok(f, self.index_positions[-1], self.index_sizes[-1]):
                    # unchecked, the batch before led us here: a corrupt length misplaces the next
                    # header. It is the corrupt one: resync from it
                    pos, self.next_offset = self.index_positions.pop(), self.index_offsets.pop()
                    self.index_counts.pop()
                    self.index_sizes.pop()
                    self.size = pos
                if batch is not None:
                    length, _, first, count, stamp = batch
                    if self.limit is not None and first + count > self.limit:
                        break   # written by a fenced owner after the next epoch began: not part of the log
                    self._index(first, pos, count, HEADER.size + length)
                    self.next_offset = first + count
                    self.size = pos = pos + HEADER.size + length
                    self.last_time = stamp
                    continue
                found = _resync(f, pos + 1, size, self.next_offset, upper)
                if found is None:
                    if verify or upper is None:
                        return self._truncate(pos, "torn or corrupt tail")
                    # a sealed segment: what follows is unreadable, up to the next segment
                    self._lose(self.next_offset, upper, size - pos)
                    self.next_offset, self.size = upper, size
                    break
                at, (_, _, first, _, _) = found
                self._lose(self.next_offset, first, at - pos)
                self.next_offset = first
                pos = at   # read again, and checked, by the loop
        return 0

    def _lose(self, first, end, nbytes):
        """Offsets [first, end) are in a corrupt batch (or several): skipped, said once."""
        if end <= first:   # bytes between intact batches that hold no offset of the log
            log.warning("topic %s: segment %s: %d bytes of no batch skipped, no record lost", self.topic,
                        self.path, nbytes, extra={"topic": self.topic})
            return
        self.lost.append((first, end, nbytes))
        log.error("topic %s: segment %s: corrupt batch: offsets %d..%d (%d records) are lost, %d bytes "
                  "skipped; the batches after it are read", self.topic, self.path, first, end - 1, end - first,
                  nbytes, extra={"topic": self.topic})

    def lose_batch(self, i):
        """Batch i of the index turned out corrupt when read: skipped from now on."""
        first, count, nbytes = self.index_offsets[i], self.index_counts[i], self.index_sizes[i]
        for column in (self.index_offsets, self.index_positions, self.index_counts, self.index_sizes):
            del column[i]
        self._lose(first, first + count, nbytes)

    def _truncate(self, pos, why):
        truncated = os.path.getsize(self.path) - pos
        with open(self.path, "r+b") as f:
            f.truncate(pos)
            f.flush()
            os.fsync(f.fileno())
        log.warning("topic %s: segment %s: %s: %d bytes truncated at %d", self.topic, self.path, why, truncated,
                    pos, extra={"topic": self.topic})
        return truncated

    def _index(self, first, pos, count, nbytes):
        self.index_offsets.append(first)
        self.index_positions.append(pos)
        self.index_counts.append(count)
        self.index_sizes.append(nbytes)

    def position_of(self, offset):
        i = bisect.bisect_right(self.index_offsets, offset) - 1
        return self.index_positions[max(i, 0)] if self.index_positions else 0


class SegmentLog:
    """One topic's log. Not thread-safe; owned by one actor."""

    def __init__(self, directory, segment_bytes=64 * 1024 * 1024, epoch=0, limits=None, topic=None):
        """`epoch` and `limits` ({epoch: end offset}) only in a shared folder (storage/fencing.py):
        the log then starts a segment of its own epoch and never writes another's. `topic`: its
        name, for the log lines."""
        self.directory = directory
        self.topic = topic
        self.segment_bytes = segment_bytes
        self.epoch = epoch
        self.limits = limits or {}
        os.makedirs(directory, exist_ok=True)
        self.segments = []
        self.truncated_bytes = 0
        self._lost_deleted = (0, 0)   # corrupt batches and bytes of segments retention deleted
        self._file = None
        self._dirty = False
        self._open()

    # --- opening and recovery ---------------------------------------------------------------------
    def _open(self):
        found = sorted(filter(None, map(_parse_segment_name, os.listdir(self.directory))))
        for first, epoch in found:
            limit = self.limits.get(epoch)
            if limit is not None and first >= limit:
                continue   # begun by a fenced owner after the next epoch began
            self.segments.append(Segment(self.directory, first, epoch, limit, self.topic))
        # Sealed segments were fsynced when the log rolled past them: that is the checkpoint.
        # Their headers are walked to rebuild the index; only the active (last) segment, which a
        # crash may have torn, is read and checked batch by batch. In a shared folder the last
        # segment of every epoch is such a tail.
        for i, segment in enumerate(self.segments):
            tail = i == len(self.segments) - 1 or self.segments[i + 1].epoch != segment.epoch
            upper = None if tail else self.segments[i + 1].first_offset
            self.truncated_bytes += segment.load(verify=tail, upper=upper)
        for before, after in zip(self.segments, self.segments[1:]):
            if before.next_offset < after.first_offset:
                log.warning("topic %s: log %s: offsets %d..%d are absent (no segment holds them)",
                            self.topic, self.directory, before.next_offset, after.first_offset - 1,
                            extra={"topic": self.topic})
        if not self.segments or self.segments[-1].epoch != self.epoch:
            # a new log, or a new epoch: this owner writes only segments of its own
            first = self.segments[-1].next_offset if self.segments else 0
            self.segments.append(Segment(self.directory, first, self.epoch, topic=self.topic))
            open(self.segments[-1].path, "ab").close()
            self._fsync_dir()
        self._file = open(self.active.path, "ab")

    def continue_at(self, offset):
        """Go on from `offset`, above the log's end: offsets a subscription already counts as
        acknowledged were lost with the log's tail (a machine crash under --fsync interval, a
        torn tail truncated), and handing them out again would hide new records behind its
        cursor. The active segment is sealed (or dropped, if empty) and a new one begins at
        `offset`, so the gap survives restarts (lost_between names it). Returns the gap
        (first, end) or None."""
        if offset <= self.next_offset:
            return None
        gap = (self.next_offset, offset)
        active = self.active
        self.sync()
        self._file.close()
        if active.size == 0 and not active.index_offsets:
            os.unlink(active.path)
            self.segments.pop()
        else:
            with open(active.path, "rb") as f:   # sealed: its bytes are the checkpoint now
                os.fsync(f.fileno())
        self.segments.append(Segment(self.directory, offset, self.epoch, topic=self.topic))
        self._file = open(self.active.path, "ab")
        self._fsync_dir()
        return gap

    @property
    def corrupt_batches(self):
        """Corrupt batches skipped (found at open or when read), since this log was opened."""
        return self._lost_deleted[0] + sum(len(s.lost) for s in self.segments)

    @property
    def corrupt_bytes(self):
        return self._lost_deleted[1] + sum(n for s in self.segments for _, _, n in s.lost)

    def lost_between(self, start, end):
        """[(first, end)] of the offsets in [start, end) the log does not hold: corrupt batches
        skipped, gaps between segments (a tail lost below a cursor, a missing segment)."""
        out = []
        for i, segment in enumerate(self.segments):
            ranges = [(a, b) for a, b, _ in segment.lost]
            if i + 1 < len(self.segments) and segment.next_offset < self.segments[i + 1].first_offset:
                ranges.append((segment.next_offset, self.segments[i + 1].first_offset))
            out += [(max(a, start), min(b, end)) for a, b in ranges if a < end and b > start]
        return sorted(out)

    @property
    def active(self):
        return self.segments[-1]

    @property
    def next_offset(self):
        return self.active.next_offset

    @property
    def first_offset(self):
        return self.segments[0].first_offset

    @property
    def size(self):
        return sum(s.size for s in self.segments)

    # --- writing -------------------------------------------------------------------------------------
    def append(self, entries, time_ms=None):
        """Append records [(key, tail), ...] as one batch of the earlier format (records); returns
        its first offset. Written to the OS, durable only after sync()."""
        return self._write(msgpack.packb(entries, use_bin_type=True), len(entries), time_ms)

    def append_runs(self, runs, time_ms=None):
        """Append runs (transport/codec.py's lists; their first offsets and times are not kept:
        they are numbered from the log's end and get the batch's time) as one batch; returns
        its first offset. Nothing per record: each run's payloads are stored as they are."""
        body = [RUNS_FORMAT]
        count = 0
        for run in runs:
            body.append((run[RUN_COUNT], run[RUN_PRODUCER], run[RUN_REDELIVERIES], run[RUN_PAYLOADS],
                         run[RUN_KEYS], run[RUN_ATTRS]))
            count += run[RUN_COUNT]
        return self._write(_pack(body), count, time_ms)

    def _write(self, body, count, time_ms):
        if self.active.size >= self.segment_bytes:
            self._roll()
        stamp = int(time.time() * 1000) if time_ms is None else time_ms
        first = self.active.next_offset
        data = HEADER.pack(len(body), zlib.crc32(body), first, count, stamp) + body
        segment = self.active
        try:
            self._file.write(data)
            self._file.flush()
        except OSError:
            # never leave half a batch behind: later batches would sit after garbage
            self._file = self._reopen_truncated(segment.size)
            raise
        segment._index(first, segment.size, count, len(data))
        segment.size += len(data)
        segment.next_offset = first + count
        segment.last_time = stamp
        self._dirty = True
        return first

    def _reopen_truncated(self, size):
        try:
            self._file.close()
        except OSError:
            pass
        with open(self.active.path, "r+b") as f:
            f.truncate(size)
        return open(self.active.path, "ab")

    def sync(self):
        if self._dirty:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._dirty = False

    def _roll(self):
        self.sync()
        self._file.close()
        segment = Segment(self.directory, self.active.next_offset, self.epoch, topic=self.topic)
        self.segments.append(segment)
        self._file = open(segment.path, "ab")
        self._fsync_dir()

    def _fsync_dir(self):
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- reading ------------------------------------------------------------------------------------
    def _batches(self, offset, max_records, max_bytes=None):
        """(first offset, count, time ms, decoded body) of the batches holding records from
        `offset` on, until about max_records records (whole batches), max_bytes bytes of batches
        (at least one) or the log's end. Read by
        the index, each batch checked against it and its checksum: one that fails is skipped
        (Segment.lose_batch) and the read goes on after it."""
        self._file.flush()
        offset = max(offset, self.first_offset)
        taken = taken_bytes = 0
        i = max(0, bisect.bisect_right([s.first_offset for s in self.segments], offset) - 1)
        for segment in self.segments[i:]:
            if segment.next_offset <= offset:
                continue
            j = max(0, bisect.bisect_right(segment.index_offsets, offset) - 1)
            with open(segment.path, "rb") as f:
                while j < len(segment.index_offsets):
                    first, count = segment.index_offsets[j], segment.index_counts[j]
                    if first + count <= offset:
                        j += 1
                        continue
                    if max_bytes is not None and taken and taken_bytes + segment.index_sizes[j] > max_bytes:
                        return
                    f.seek(segment.index_positions[j])
                    checked = _checked_body(f.read(segment.index_sizes[j]), first, count)
                    if checked is None:
                        segment.lose_batch(j)   # the next batch is j now
                        continue
                    stamp, body = checked
                    # only batches below a fenced owner's limit are in the index
                    yield first, count, stamp, msgpack.unpackb(body, raw=False)
                    taken += first + count - max(first, offset)
                    taken_bytes += segment.index_sizes[j]
                    if taken >= max_records:
                        return
                    j += 1

    def read_runs(self, offset, max_records=1000, max_bytes=None):
        """Runs of the records from `offset` (transport/codec.py's layout), at most about
        max_records records and max_bytes bytes (whole batches, at least one): batches of runs as
        stored, earlier batches of records converted (codec.runs_from_tails); a run holding
        `offset`, or the end of a fenced owner's segment, is cut there."""
        offset = max(offset, self.first_offset)
        out = []
        for first, count, stamp, body in self._batches(offset, max_records, max_bytes):
            end = first + count
            if body and isinstance(body[0], int):   # runs
                at = first
                for n, producer, redeliveries, payloads, keys, attrs in body[1:]:
                    if at + n > offset and at < end:
                        run = [at, n, stamp, producer, redeliveries, payloads, keys, attrs]
                        if at < offset:
                            run = split_run(run, offset - at)[1]
                        if at + n > end:
                            run = split_run(run, end - run[0])[0]
                        out.append(run)
                    at += n
            else:   # records, of an earlier version
                out += runs_from_tails([(first + n, key, stamp, tail) for n, (key, tail) in enumerate(body)
                                        if offset <= first + n < end])
        return out

    def read(self, offset, max_records=1000):
        """Records from `offset`: [(offset, key, time_ms, tail)] (v1 tails), at most about
        max_records. The record-by-record view of the log (tools, tests); the broker reads runs."""
        offset = max(offset, self.first_offset)
        out = []
        for first, count, stamp, body in self._batches(offset, max_records):
            if body and isinstance(body[0], int):
                records, at = [], first
                for n, producer, redeliveries, payloads, keys, attrs in body[1:]:
                    run = [at, n, stamp, producer, redeliveries, payloads, keys, attrs]
                    records += [(at + i, keys[i] if keys else None, stamp, tail)
                                for i, tail in enumerate(run_tails(run))]
                    at += n
            else:
                records = [(first + n, key, stamp, tail) for n, (key, tail) in enumerate(body)]
            out += [r for r in records if offset <= r[0] < first + count]
        return out

    # --- retention ------------------------------------------------------------------------------------
    def delete_before(self, offset):
        """Delete whole sealed segments whose records are all below `offset`; returns how many."""
        removed = 0
        while len(self.segments) > 1 and self.segments[1].first_offset <= offset:
            os.unlink(self.segments[0].path)
            gone = self.segments.pop(0)
            self._lost_deleted = (self._lost_deleted[0] + len(gone.lost),
                                  self._lost_deleted[1] + sum(n for _, _, n in gone.lost))
            removed += 1
        if removed:
            self._fsync_dir()
        return removed

    def oldest_time(self):
        return self.segments[0].last_time if self.segments else 0

    def close(self):
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None
