"""Sans-IO frame codec of protocols v1 and v2: fed bytes, yields frames; no sockets here.

A frame is a 4-byte big-endian length N, then N bytes holding one msgpack map with a str "op".
"""
import struct

import msgpack

from actorbroker.transport.errors import BAD_FRAME, FRAME_TOO_LARGE, ProtocolError

PROTOCOL_VERSION = 2            # the newest version, which the Python clients ask for
SUPPORTED_VERSIONS = (1, 2)     # what the broker serves (docs/protocol.md, "Protocol version 2")
DEFAULT_MAX_FRAME = 4 * 1024 * 1024
_HEADER = struct.Struct(">I")

_packer_opts = dict(use_bin_type=True)


def encode_frame(obj):
    """One frame (header + msgpack map) as bytes."""
    body = msgpack.packb(obj, **_packer_opts)
    return _HEADER.pack(len(body)) + body


def encode_reply(obj, max_frame):
    """encode_frame, for a reply whose lists may make it larger than `max_frame` (`topics`,
    `stats`): entries come off the end of its longest list (a list of the map, or of a map in a
    list of it: a subscription's consumers) until it fits, and the reply says `truncated: true`."""
    data = encode_frame(obj)
    if len(data) - _HEADER.size <= max_frame:
        return data
    obj = {key: ([dict(item) if isinstance(item, dict) else item for item in value] if isinstance(value, list) else value)
           for key, value in obj.items()}
    obj["truncated"] = True
    while len(data) - _HEADER.size > max_frame:
        lists = [(value, obj, key) for key, value in obj.items() if isinstance(value, list)]
        lists += [(value, item, key) for top in list(obj.values()) if isinstance(top, list)
                  for item in top if isinstance(item, dict) for key, value in item.items() if isinstance(value, list)]
        lists = [entry for entry in lists if entry[0]]
        if not lists:
            break   # nothing left to cut: as it is
        longest, owner, key = max(lists, key=lambda entry: len(entry[0]))
        low, high = 0, len(longest) - 1   # keep the most entries that fit (at least one goes)
        while low < high:
            middle = (low + high + 1) // 2
            owner[key] = longest[:middle]
            if len(encode_frame(obj)) - _HEADER.size <= max_frame:
                low = middle
            else:
                high = middle - 1
        owner[key] = longest[:low]
        data = encode_frame(obj)
    return data


def decode_body(body):
    """The map inside one frame body; ProtocolError(BAD_FRAME) if it is not a map with a str op."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except msgpack.ExtraData:
        raise ProtocolError(BAD_FRAME, "trailing bytes after the msgpack map")
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(BAD_FRAME, f"body is not valid msgpack ({type(exc).__name__})")
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_FRAME, "frame is not a msgpack map")
    op = obj.get("op")
    if not isinstance(op, str):
        raise ProtocolError(BAD_FRAME, "frame has no str 'op'")
    return obj


class FrameDecoder:
    """Accumulates bytes and hands out whole frames.

    `feed(data)` then iterate (or call `next_frame()` until None). A framing error raises
    ProtocolError once; the decoder is then broken and the connection must be closed.
    """

    def __init__(self, max_frame=DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data):
        self._buf += data

    @property
    def buffered(self):
        """Bytes received but not yet returned as frames (a partial frame)."""
        return len(self._buf) - self._pos

    def next_frame(self):
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 4:
            self._compact()
            return None
        (n,) = _HEADER.unpack_from(buf, pos)
        if n > self.max_frame:
            raise ProtocolError(FRAME_TOO_LARGE, f"frame of {n} bytes exceeds max_frame {self.max_frame}")
        if len(buf) - pos - 4 < n:
            self._compact()
            return None
        body = bytes(buf[pos + 4:pos + 4 + n])
        self._pos = pos + 4 + n
        return decode_body(body)

    def __iter__(self):
        while True:
            frame = self.next_frame()
            if frame is None:
                return
            yield frame

    def _compact(self):
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0


# --- message pushes, encoded once per record -------------------------------------------------

# A record (one element of a push's "msgs" array) is a msgpack map of 7 entries, built in two
# parts: the tail (payload, key, attrs, producer, redeliveries) is packed by the producer's
# transport, in parallel across connections; the topic only prepends the id and time it assigns.
_RECORD_HEAD = b"\x87" + msgpack.packb("id")
_TIME_KEY = msgpack.packb("time")
_UINT64 = struct.Struct(">BQ")
_TAIL_KEYS = [msgpack.packb(k) for k in ("payload", "key", "attrs", "producer", "redeliveries")]


def encode_record_tail(payload, key, attrs, producer, redeliveries=0):
    # One C call: pack a 5-entry map and drop its one-byte header (0x85): what is left is the
    # five key/value pairs, in this order, redeliveries last (with_redeliveries relies on it).
    return _pack({"payload": payload, "key": key, "attrs": attrs, "producer": producer,
                  "redeliveries": redeliveries})[1:]


_pack = msgpack.Packer(use_bin_type=True).pack
_PAYLOAD_KEY = msgpack.packb("payload")


def plain_tail_encoder(producer):
    """A faster encode_record_tail for the common record (no key, no attrs) of one producer: the
    same bytes, built from a prefix per payload size and a suffix per producer, no msgpack call."""
    suffix = _pack({"key": None, "attrs": {}, "producer": producer, "redeliveries": 0})[1:]

    def encode(payload):
        n = len(payload)
        if n < 0x100:
            head = b"\xc4" + bytes((n,))
        elif n < 0x10000:
            head = b"\xc5" + n.to_bytes(2, "big")
        else:
            head = b"\xc6" + n.to_bytes(4, "big")
        return b"".join((_PAYLOAD_KEY, head, payload, suffix))
    return encode


def record_blob(offset, time_ms, tail):
    return b"".join((_RECORD_HEAD, _UINT64.pack(0xCF, offset), _TIME_KEY, _UINT64.pack(0xCF, time_ms), tail))


def record_blobs(first_offset, time_ms, tails):
    """record_blob for consecutive offsets sharing one time: the time is packed once."""
    stamp = _TIME_KEY + _UINT64.pack(0xCF, time_ms)
    pack = _UINT64.pack
    return [b"".join((_RECORD_HEAD, pack(0xCF, offset), stamp, tail))
            for offset, tail in enumerate(tails, first_offset)]


_TAIL_START = len(_RECORD_HEAD) + 9 + len(_TIME_KEY) + 9


def record_time_ms(blob):
    """The publish time of a record built by record_blob (read in place, nothing decoded)."""
    return _UINT64.unpack_from(blob, _TAIL_START - 9)[1]


def record_tail(blob):
    """The tail of a record built by record_blob (its redeliveries as encoded then)."""
    return blob[_TAIL_START:]


_REDELIVERIES_KEY = msgpack.packb("redeliveries")
_LAST_VALUE_MAX = 9   # the longest msgpack int


def with_redeliveries(blob, count):
    """A record (its redeliveries last) re-marked as redelivered `count` times. The old count may
    take 1 to 9 bytes: cut after the key, which the value that follows it is too short to hold."""
    cut = blob.rfind(_REDELIVERIES_KEY, len(blob) - len(_REDELIVERIES_KEY) - _LAST_VALUE_MAX)
    return blob[:cut + len(_REDELIVERIES_KEY)] + msgpack.packb(count)


def encode_record(offset, payload, key, attrs, time_ms, producer, redeliveries=0):
    """One whole record, pre-encoded so that it is packed only once."""
    return record_blob(offset, time_ms, encode_record_tail(payload, key, attrs, producer, redeliveries))


_MSG_PREFIX = b"\x83" + msgpack.packb("op") + msgpack.packb("message") + msgpack.packb("consumer")
_MSGS_KEY = msgpack.packb("msgs")
# Room for the header, the map prefix, the consumer id and the array header.
PUSH_OVERHEAD = 4 + len(_MSG_PREFIX) + 9 + len(_MSGS_KEY) + 5


def max_message_bytes(max_frame, producer_name):
    """The most a message may hold (payload, key and attrs as validate.message_problem counts
    them) to be delivered alone in one push: the envelope, 64 bytes for a record's fields, and the
    producer's name, which every record carries. The broker's bound, and its clients'."""
    return max_frame - PUSH_OVERHEAD - 64 - len(producer_name.encode("utf-8"))


def _array_header(n):
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + struct.pack(">H", n)
    return b"\xdd" + struct.pack(">I", n)


def encode_message_frames(consumer_id, blobs, max_frame=DEFAULT_MAX_FRAME):
    """`message` push frames carrying the pre-encoded records `blobs`, none larger than max_frame."""
    frames = []
    head = _MSG_PREFIX + msgpack.packb(consumer_id) + _MSGS_KEY
    limit = max_frame - PUSH_OVERHEAD
    start, size = 0, 0
    for i, blob in enumerate(blobs):
        if size + len(blob) > limit and i > start:
            frames.append(_push(head, blobs[start:i]))
            start, size = i, 0
        size += len(blob)
    if start < len(blobs):
        frames.append(_push(head, blobs[start:]))
    return frames


def _push(head, blobs):
    body = b"".join((head, _array_header(len(blobs)), *blobs))
    return _HEADER.pack(len(body)) + body


def fits_in_push(blob_len, max_frame=DEFAULT_MAX_FRAME):
    """Whether one record of this encoded size can be delivered in a single push frame."""
    return blob_len + PUSH_OVERHEAD <= max_frame


# --- protocol v2: runs ---------------------------------------------------------------------------
#
# Inside the broker (lanes) and in v2 `message` pushes, records travel as runs: consecutive offsets
# of one send, sharing a publish time, a producer and a redelivery count. The payloads stay one
# msgpack array (bytes) from the producer's shard to the consumer's socket, so the topic and the
# dispatcher handle a run, not its records. A run on a lane is a list:
#   [first offset, count, time_ms, producer, redeliveries, payloads (msgpack array of bin),
#    keys (None: no keys, or a list of str|None), attrs (None: all empty, or a list of maps)]
# In a v2 push it is the array [first, time, producer, redeliveries, payloads, keys, attrs].
RUN_FIRST, RUN_COUNT, RUN_TIME, RUN_PRODUCER, RUN_REDELIVERIES, RUN_PAYLOADS, RUN_KEYS, RUN_ATTRS = range(8)


def pack_payloads(payloads):
    return _pack(payloads)


def unpack_payloads(blob):
    return msgpack.unpackb(blob, raw=False, use_list=True)


def make_run(first, time_ms, producer, payloads, keys=None, attrs=None, redeliveries=0):
    """A run from a list of payloads (keys and attrs: lists of the same length, or None)."""
    return [first, len(payloads), time_ms, producer, redeliveries, _pack(payloads), keys, attrs]


def run_key(run):
    """The key of a run's first record (the only one, for the runs of shared/key_shared)."""
    keys = run[RUN_KEYS]
    return keys[0] if keys else None


def split_run(run, n):
    """(the first n records, the rest) of a run of more than n records."""
    payloads = unpack_payloads(run[RUN_PAYLOADS])
    keys, attrs = run[RUN_KEYS], run[RUN_ATTRS]
    first, time_ms, producer, redeliveries = run[RUN_FIRST], run[RUN_TIME], run[RUN_PRODUCER], run[RUN_REDELIVERIES]
    head = [first, n, time_ms, producer, redeliveries, _pack(payloads[:n]),
            keys[:n] if keys else None, attrs[:n] if attrs else None]
    tail = [first + n, len(payloads) - n, time_ms, producer, redeliveries, _pack(payloads[n:]),
            keys[n:] if keys else None, attrs[n:] if attrs else None]
    return head, tail


# What a record adds to its payload once written to a client, beyond its producer's name, its key
# and its attrs: the v1 map's keys, id, time, headers (v1 is the larger form).
RECORD_OVERHEAD = 64


def _key_bytes(key):
    return len(key) + 2 if key else 0


def _attrs_bytes(attrs):
    """About an attrs map's packed size (str lengths, not UTF-8 bytes: a bound, not a count)."""
    return sum(len(k) + len(v) + 4 for k, v in attrs.items()) if attrs else 0


def run_bytes(run):
    """About the bytes a run takes in a client's outbox: its payloads as they are (bin headers
    included) and, per record, RECORD_OVERHEAD, its producer's name, its key and its attrs.
    From the run's fields; only keys and attrs, where a run has any, are looked at per record
    (attrs of megabytes passed every bound: a delivery batch over a lane's frame limit ended the
    lane, and a backlog grew without limit): delivery batches and backlogs are bounded by it."""
    producer = run[RUN_PRODUCER]
    size = len(run[RUN_PAYLOADS]) + run[RUN_COUNT] * (
        RECORD_OVERHEAD + (len(producer) if isinstance(producer, str) else 0))
    keys, attrs = run[RUN_KEYS], run[RUN_ATTRS]
    if keys:
        size += sum(map(_key_bytes, keys))
    if attrs:
        size += sum(map(_attrs_bytes, attrs))
    return size


def records_within(run, max_bytes):
    """How many leading records of a run fit in max_bytes, counted as run_bytes does (0 if not
    even the first). Unpacks the payloads: for the one run a delivery batch is cut in."""
    producer = run[RUN_PRODUCER]
    each = RECORD_OVERHEAD + (len(producer) if isinstance(producer, str) else 0) + 5   # (+ bin header)
    keys, attrs = run[RUN_KEYS], run[RUN_ATTRS]
    total = 0
    for i, payload in enumerate(unpack_payloads(run[RUN_PAYLOADS])):
        total += len(payload) + each
        if keys:
            total += _key_bytes(keys[i])
        if attrs:
            total += _attrs_bytes(attrs[i])
        if total > max_bytes:
            return i
    return run[RUN_COUNT]


def explode_run(run):
    """Runs of one record each (shared and key_shared hand out records one by one; reliable
    subscriptions track each record)."""
    if run[RUN_COUNT] == 1:
        return [run]
    first, time_ms, producer, redeliveries = run[RUN_FIRST], run[RUN_TIME], run[RUN_PRODUCER], run[RUN_REDELIVERIES]
    keys, attrs = run[RUN_KEYS], run[RUN_ATTRS]
    return [[first + i, 1, time_ms, producer, redeliveries, b"\x91" + _pack(payload),
             [keys[i]] if keys else None, [attrs[i]] if attrs else None]
            for i, payload in enumerate(unpack_payloads(run[RUN_PAYLOADS]))]


def coalesce_runs(runs):
    """Adjacent runs that continue each other (next offset, same time, producer, redeliveries)
    merged into one: single-record runs of a reliable subscription go out as few runs."""
    if len(runs) < 2:
        return runs
    out = []
    group = [runs[0]]
    for run in runs[1:]:
        last = group[-1]
        if run[RUN_FIRST] == last[RUN_FIRST] + last[RUN_COUNT] and run[RUN_TIME] == last[RUN_TIME] \
                and run[RUN_PRODUCER] == last[RUN_PRODUCER] and run[RUN_REDELIVERIES] == last[RUN_REDELIVERIES]:
            group.append(run)
        else:
            out.append(_merge(group))
            group = [run]
    out.append(_merge(group))
    return out


def _array_body(blob):
    """The elements of a msgpack array, without its header."""
    tag = blob[0]
    return blob[1:] if tag < 0xdc else blob[3:] if tag == 0xdc else blob[5:]


def _merge(group):
    if len(group) == 1:
        return group[0]
    count = sum(run[RUN_COUNT] for run in group)
    keyed = any(run[RUN_KEYS] for run in group)
    with_attrs = any(run[RUN_ATTRS] for run in group)
    head = group[0]
    return [head[RUN_FIRST], count, head[RUN_TIME], head[RUN_PRODUCER], head[RUN_REDELIVERIES],
            _array_header(count) + b"".join(_array_body(run[RUN_PAYLOADS]) for run in group),
            [k for run in group for k in (run[RUN_KEYS] or [None] * run[RUN_COUNT])] if keyed else None,
            [a for run in group for a in (run[RUN_ATTRS] or [{}] * run[RUN_COUNT])] if with_attrs else None]


def with_run_redeliveries(run, count):
    again = list(run)
    again[RUN_REDELIVERIES] = count
    return again


def run_records(run):
    """(offset, payload, key, attrs) of each record of a run."""
    payloads = unpack_payloads(run[RUN_PAYLOADS])
    n = len(payloads)
    keys, attrs = run[RUN_KEYS] or [None] * n, run[RUN_ATTRS] or [{}] * n
    return [(run[RUN_FIRST] + i, payloads[i], keys[i], attrs[i] or {}) for i in range(n)]


def run_from_tail(offset, key, time_ms, tail):
    """The one-record run of a record stored as a v1 tail (the reliable log's format)."""
    fields = msgpack.unpackb(b"\x85" + tail, raw=False, strict_map_key=False)
    attrs = fields.get("attrs") or None
    return [offset, 1, time_ms, fields["producer"], fields.get("redeliveries", 0),
            b"\x91" + _pack(fields["payload"]), None if key is None else [key],
            None if attrs is None else [attrs]]


_BIN_LEN = {0xc4: (1, 2), 0xc5: (2, 3), 0xc6: (4, 5)}   # bin header: (length bytes, header size)


def runs_from_tails(records):
    """Runs of the log's records [(offset, key, time_ms, v1 tail)]: consecutive plain records (no
    key, no attrs, not redelivered) of one producer and time become one run, their payloads cut
    out of the tails as they are (a bin is the same bytes in both); the others one run each."""
    runs = []
    suffixes = {}     # record suffix after the payload -> producer, for the plain ones
    group = None      # [first, time, producer, suffix, [payload elements]]
    for offset, key, time_ms, tail in records:
        producer = None
        if key is None and tail.startswith(_PAYLOAD_KEY):
            start = len(_PAYLOAD_KEY)
            size, head = _BIN_LEN.get(tail[start], (0, 0))
            if size:
                end = start + head + int.from_bytes(tail[start + 1:start + 1 + size], "big")
                suffix = tail[end:]
                producer = suffixes.get(suffix)
                if producer is None:
                    rest = msgpack.unpackb(b"\x84" + suffix, raw=False, strict_map_key=False)
                    if rest.get("key") is None and not rest.get("attrs") and not rest.get("redeliveries") \
                            and len(rest) == 4:
                        producer = suffixes[suffix] = rest["producer"]
        if producer is not None and group is not None and group[1] == time_ms and group[3] == suffix \
                and group[0] + len(group[4]) == offset:
            group[4].append(tail[start:end])
            continue
        if group is not None:
            runs.append(_group_run(group))
            group = None
        if producer is not None:
            group = [offset, time_ms, producer, suffix, [tail[start:end]]]
        else:
            runs.append(run_from_tail(offset, key, time_ms, tail))
    if group is not None:
        runs.append(_group_run(group))
    return runs


def _group_run(group):
    first, time_ms, producer, _, elements = group
    return [first, len(elements), time_ms, producer, 0, _array_header(len(elements)) + b"".join(elements),
            None, None]


def run_tails(run):
    """The v1 record tails of a run's records (what the reliable log stores)."""
    producer = run[RUN_PRODUCER]
    payloads = unpack_payloads(run[RUN_PAYLOADS])
    if run[RUN_KEYS] is None and run[RUN_ATTRS] is None and not run[RUN_REDELIVERIES]:
        plain = plain_tail_encoder(producer)
        return [plain(p) for p in payloads]
    return [encode_record_tail(payload, key, attrs or {}, producer, run[RUN_REDELIVERIES])
            for _, payload, key, attrs in run_records(run)]


_RUN_PUSH_PREFIX = b"\x83" + msgpack.packb("op") + msgpack.packb("message") + msgpack.packb("consumer")
_RUNS_KEY = msgpack.packb("runs")


def encode_run(run):
    """A run as the 7-element array of a v2 push."""
    return b"".join((b"\x97", _pack(run[RUN_FIRST]), _pack(run[RUN_TIME]), _pack(run[RUN_PRODUCER]),
                     _pack(run[RUN_REDELIVERIES]), run[RUN_PAYLOADS], _pack(run[RUN_KEYS]),
                     _pack(run[RUN_ATTRS])))


def encode_run_frames(consumer_id, runs, max_frame=DEFAULT_MAX_FRAME):
    """v2 `message` push frames carrying `runs`, none larger than max_frame (a run too large for
    one frame is split; a single record always fits, as the session checked at send)."""
    head = _RUN_PUSH_PREFIX + _pack(consumer_id) + _RUNS_KEY
    limit = max_frame - PUSH_OVERHEAD
    frames, part, size = [], [], 0
    pending = list(reversed(runs))
    while pending:
        run = pending.pop()
        blob = encode_run(run)
        if len(blob) > limit and run[RUN_COUNT] > 1:
            head_run, tail_run = split_run(run, run[RUN_COUNT] // 2)
            pending += [tail_run, head_run]
            continue
        if part and size + len(blob) > limit:
            frames.append(_push(head, part))
            part, size = [], 0
        part.append(blob)
        size += len(blob)
    if part:
        frames.append(_push(head, part))
    return frames


def encode_runs_v1(consumer_id, runs, max_frame=DEFAULT_MAX_FRAME):
    """v1 `message` push frames (a map per record) carrying `runs`: for v1 clients."""
    blobs = []
    for run in runs:
        time_ms = run[RUN_TIME]
        if run[RUN_KEYS] is None and run[RUN_ATTRS] is None and not run[RUN_REDELIVERIES]:
            plain = plain_tail_encoder(run[RUN_PRODUCER])
            blobs += record_blobs(run[RUN_FIRST], time_ms, [plain(p) for p in unpack_payloads(run[RUN_PAYLOADS])])
        else:
            producer, redeliveries = run[RUN_PRODUCER], run[RUN_REDELIVERIES]
            blobs += [encode_record(offset, payload, key, attrs, time_ms, producer, redeliveries)
                      for offset, payload, key, attrs in run_records(run)]
    return encode_message_frames(consumer_id, blobs, max_frame)
