"""The sans-IO frame codec, without sockets."""
import struct

import msgpack
import pytest

from actorbroker.transport.codec import (FrameDecoder, encode_frame, encode_message_frames, encode_record, with_redeliveries,
                             fits_in_push)
from actorbroker.transport.errors import BAD_FRAME, FRAME_TOO_LARGE, ProtocolError


def test_frames_split_anywhere_are_reassembled():
    data = b"".join(encode_frame({"op": "ping", "rid": i}) for i in range(50))
    decoder = FrameDecoder()
    got = []
    for i in range(0, len(data), 7):  # odd-sized pieces cut through headers and bodies
        decoder.feed(data[i:i + 7])
        got.extend(decoder)
    assert [f["rid"] for f in got] == list(range(50))
    assert decoder.buffered == 0


def test_partial_frame_is_kept_until_complete():
    frame = encode_frame({"op": "hello", "rid": 1})
    decoder = FrameDecoder()
    decoder.feed(frame[:-1])
    assert decoder.next_frame() is None
    assert decoder.buffered == len(frame) - 1
    decoder.feed(frame[-1:])
    assert decoder.next_frame() == {"op": "hello", "rid": 1}


def test_length_over_max_frame_fails_before_the_body_arrives():
    decoder = FrameDecoder(max_frame=100)
    decoder.feed(struct.pack(">I", 101))
    with pytest.raises(ProtocolError) as exc:
        decoder.next_frame()
    assert exc.value.code == FRAME_TOO_LARGE


@pytest.mark.parametrize("body", [
    msgpack.packb([1, 2, 3]),                       # not a map
    msgpack.packb({"rid": 1}),                      # no op
    msgpack.packb({"op": 5}),                       # op not a str
    msgpack.packb({"op": "ping"}) + b"\x01",        # trailing bytes
    b"\xc1",                                        # never-used msgpack byte
    b"\xa3ab",                                      # truncated str inside the body
])
def test_bad_bodies_are_bad_frame(body):
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(ProtocolError) as exc:
        decoder.next_frame()
    assert exc.value.code == BAD_FRAME


def test_message_push_is_split_to_respect_max_frame():
    blobs = [encode_record(i, b"x" * 100, "k", {"a": "b"}, 1, "p") for i in range(100)]
    frames = encode_message_frames(9, blobs, max_frame=1000)
    assert len(frames) > 1
    decoder = FrameDecoder(max_frame=1000)
    ids = []
    for frame in frames:
        assert len(frame) - 4 <= 1000
        decoder.feed(frame)
        for push in decoder:
            assert push["op"] == "message" and push["consumer"] == 9
            ids.extend(m["id"] for m in push["msgs"])
    assert ids == list(range(100))


def test_pushed_record_has_every_field_of_the_protocol():
    decoder = FrameDecoder()
    decoder.feed(encode_message_frames(3, [encode_record(7, b"\x00\xff", None, {}, 123, "prod", 2)])[0])
    (msg,) = decoder.next_frame()["msgs"]
    assert msg == {"id": 7, "payload": b"\x00\xff", "key": None, "attrs": {}, "time": 123,
                   "producer": "prod", "redeliveries": 2}


def test_fits_in_push():
    assert fits_in_push(100, max_frame=1000)
    assert not fits_in_push(1000, max_frame=1000)


def test_redelivery_count_is_rewritten_in_place():
    blob = encode_record(5, b"p", "k", {"a": "b"}, 9, "prod")
    for count in (1, 200, 70000):
        decoder = FrameDecoder()
        decoder.feed(encode_message_frames(1, [with_redeliveries(blob, count)])[0])
        (msg,) = decoder.next_frame()["msgs"]
        assert msg["redeliveries"] == count and msg["payload"] == b"p" and msg["id"] == 5


def test_redelivery_count_is_rewritten_again_and_again():
    # the dispatcher re-marks the blob it delivered last time: past 127 the count takes 2 bytes,
    # past 255 three, ... (the 129th redelivery used to be cut to invalid msgpack)
    blob = encode_record(5, b"p", None, {}, 9, "producer ending in \u0301 and \xac")
    for count in [*range(1, 300), 70000, 2**32, 2**40, 3, 0]:
        blob = with_redeliveries(blob, count)
        decoder = FrameDecoder()
        decoder.feed(encode_message_frames(1, [blob])[0])
        (msg,) = decoder.next_frame()["msgs"]
        assert msg["redeliveries"] == count and msg["producer"].endswith("\xac")
    assert blob == encode_record(5, b"p", None, {}, 9, "producer ending in \u0301 and \xac")


def test_record_tail_round_trips():
    from actorbroker.transport.codec import record_blob, record_tail
    blob = encode_record(5, b"p", None, {}, 9, "prod")
    assert record_blob(5, 9, record_tail(blob)) == blob


def test_the_fast_record_encoders_make_the_same_bytes():
    from actorbroker.transport.codec import (encode_record_tail, plain_tail_encoder, record_blob,
                                             record_blobs)
    encode = plain_tail_encoder("producer-7")
    for n in (0, 1, 255, 256, 65535, 65536, 70000):
        payload = bytes(i % 251 for i in range(n))
        assert encode(payload) == encode_record_tail(payload, None, {}, "producer-7")
    tails = [encode_record_tail(b"x" * i, None, {}, "p") for i in range(5)]
    assert record_blobs(41, 1_700_000_000_000, tails) == \
        [record_blob(41 + i, 1_700_000_000_000, t) for i, t in enumerate(tails)]
