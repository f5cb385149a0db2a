"""Sans-IO frame codec of protocol v1: fed bytes, yields frames; no sockets here.

A frame is a 4-byte big-endian length N, then N bytes holding one msgpack map with a str "op".
"""
import struct

import msgpack

from actorbroker.transport.errors import BAD_FRAME, FRAME_TOO_LARGE, ProtocolError

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 4 * 1024 * 1024
_HEADER = struct.Struct(">I")

_packer_opts = dict(use_bin_type=True)


def encode_frame(obj):
    """One frame (header + msgpack map) as bytes."""
    body = msgpack.packb(obj, **_packer_opts)
    return _HEADER.pack(len(body)) + body


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
