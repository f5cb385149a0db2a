"""Property-based fuzzing (Hypothesis) of the codec and of every op against a live broker.

5,000 frames against the broker in CI; 100,000 with ACTORBROKER_SLOW=1 (and then a random seed
each run instead of the fixed one CI uses). The frames are well-framed msgpack maps whose fields
are plausible (ids this connection really holds, existing topics) or hostile (wrong types,
integers at every width, long and odd strings, deep nesting). After every batch of frames:

- the connection is still open and every request carrying a rid was answered exactly once
  (`flow` is one-way: at most once), never with INTERNAL;
- another client's traffic is unaffected (a round trip on its own topic);
- no process of the broker's skeleton (serve, admin, root, listener, connection actors, shards)
  died.
At the end, every message receipted on a reliable topic before the fuzzing is still readable,
and the broker logged no error.
"""
import os
import time
import uuid

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from actorbroker.scripts import proctree
from actorbroker.transport.codec import (FrameDecoder, encode_frame, encode_message_frames,
                                         encode_record, with_redeliveries)
from actorbroker.transport.errors import ProtocolError
from tests.util import processes_of_kind
from tests.wire import RawConnection

SLOW = os.environ.get("ACTORBROKER_SLOW") == "1"
FRAMES_PER_BATCH = 50
LIVE_FRAMES = 100_000 if SLOW else 5_000
ANSWER_DEADLINE_S = 30.0
SKELETON = ("ab-admin", "ab-root", "ab-listener", "ab-conn", "ab-shard")
MIN_INT, MAX_INT = -2 ** 63, 2 ** 64 - 1


def _settings(examples):
    # No shrinking: against a live broker it takes minutes, and the failing batch is printed whole.
    return settings(max_examples=examples, deadline=None, database=None, derandomize=not SLOW,
                    suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])


def _nested(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


# --- values -----------------------------------------------------------------------------------

hostile = st.one_of(
    st.none(), st.booleans(),
    st.integers(MIN_INT, MAX_INT),
    st.sampled_from([-1, 2 ** 31, 2 ** 32, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, MIN_INT]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["", "/", "//", "/fz/n\n", "/fz/\x00", "/" + "a" * 300, "/a/" + "b" * 252,
                     "x" * 70_000, "\udcff".encode("utf-8", "surrogatepass").decode("latin-1")]),
    st.binary(max_size=40),
    st.lists(st.integers(MIN_INT, MAX_INT), max_size=6),
    st.dictionaries(st.text(max_size=6), st.one_of(st.integers(-5, 5), st.text(max_size=4)), max_size=3),
    st.sampled_from([_nested(30), _nested(450)]),
)

PRODUCER_REF, CONSUMER_REF = "$producer", "$consumer"   # replaced by this connection's real ids


def field(plausible):
    """Mostly a plausible value (to reach deep into the broker), sometimes a hostile one."""
    return st.one_of(plausible, plausible, hostile)


topic = field(st.sampled_from(["/fz/n", "/fz/r", "/fz/other"]))
name = field(st.sampled_from(["a", "b", "c"]))
producer_id = field(st.sampled_from([PRODUCER_REF, PRODUCER_REF, 10 ** 9]))
consumer_id = field(st.sampled_from([CONSUMER_REF, CONSUMER_REF, 10 ** 9]))
small_int = field(st.integers(0, 1000))
ids = field(st.lists(st.integers(0, 200), max_size=8))
msg = st.fixed_dictionaries({"payload": field(st.binary(max_size=64))},
                            optional={"key": name, "attrs": field(st.dictionaries(st.sampled_from("xyz"),
                                                                                  st.text(max_size=8), max_size=2))})
msgs = field(st.lists(msg, min_size=1, max_size=5))

OPS = {
    "hello": {"version": field(st.just(1)), "client": name, "token": name, "heartbeat_ms": small_int},
    "ping": {},
    "producer": {"topic": topic, "name": name, "dispatch": field(st.sampled_from(["non_reliable", "reliable"])),
                 "access": field(st.sampled_from(["shared", "exclusive"]))},
    "send": {"producer": producer_id, "msgs": msgs},
    "close_producer": {"producer": producer_id},
    "subscribe": {"topic": topic, "subscription": name,
                  "type": field(st.sampled_from(["exclusive", "shared", "failover", "key_shared"])),
                  "consumer": name, "start": field(st.sampled_from(["latest", "earliest"])),
                  "dispatch": field(st.sampled_from(["non_reliable", "reliable"])),
                  "max_unacked": small_int, "ack_timeout_ms": small_int, "max_redeliveries": small_int,
                  "dead_letter_topic": topic},
    "flow": {"consumer": consumer_id, "credits": small_int},
    "ack": {"consumer": consumer_id, "ids": ids},
    "nack": {"consumer": consumer_id, "ids": ids, "delay_ms": small_int},
    "close_consumer": {"consumer": consumer_id},
    "unsubscribe": {"consumer": consumer_id},
    "topics": {},
    "stats": {"topic": topic},
    "delete_topic": {"topic": topic},
}


@st.composite
def request(draw):
    op = draw(st.one_of(st.sampled_from(sorted(OPS)), st.sampled_from(sorted(OPS)), st.text(max_size=12)))
    fields = OPS.get(op, {})
    frame = {"op": op}
    for key, strategy in fields.items():
        if draw(st.integers(0, 9)) < 8:      # a field is sometimes missing
            frame[key] = draw(strategy)
    if draw(st.integers(0, 19)) == 0:        # and sometimes one nobody asked for
        frame[draw(st.text(max_size=8).filter(lambda k: k not in ("op", "rid")))] = draw(hostile)
    return frame


batches = st.lists(request(), min_size=FRAMES_PER_BATCH, max_size=FRAMES_PER_BATCH)


# --- the live broker --------------------------------------------------------------------------

class Bystander:
    """Another client's traffic: a producer and a consumer on a topic the fuzz never names."""

    def __init__(self, broker):
        self.topic = f"/bystander/t-{uuid.uuid4().hex[:8]}"
        self.conn = RawConnection(*broker.address)
        self.conn.hello()
        self.producer = self.conn.request({"op": "producer", "topic": self.topic})["producer"]
        self.consumer = self.conn.request({"op": "subscribe", "topic": self.topic, "subscription": "s",
                                           "type": "exclusive", "consumer": "c"})["consumer"]
        self.conn.send_frame({"op": "flow", "consumer": self.consumer, "credits": 1_000_000})
        self.sent = 0

    def round_trip(self):
        payload = b"bystander %d" % self.sent
        self.sent += 1
        self.conn.request({"op": "send", "producer": self.producer, "msgs": [{"payload": payload}]})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            frame = self.conn.recv_frame(timeout=max(0.01, deadline - time.monotonic()))
            assert frame is not None, "the bystander's connection was closed"
            if frame["op"] == "ping":
                self.conn.send_frame({"op": "pong", "rid": frame["rid"]})
            elif frame["op"] == "message":
                assert [m["payload"] for m in frame["msgs"]] == [payload]
                return
        raise AssertionError("the bystander's message did not arrive")


@pytest.fixture(scope="module")
def fuzz_broker(tmp_path_factory):
    from actorbroker.scripts.local_broker import LocalBroker
    broker = LocalBroker(tmp_path_factory.mktemp("fuzz"), "--heartbeat-ms", "60000")
    witness = f"/witness/t-{uuid.uuid4().hex[:8]}"
    conn = RawConnection(*broker.address)
    conn.hello()
    producer = conn.request({"op": "producer", "topic": witness, "dispatch": "reliable"})["producer"]
    receipted = []
    for i in range(20):
        receipt = conn.request({"op": "send", "producer": producer, "msgs": [{"payload": b"w%d" % i}]})
        receipted.append((receipt["first"], b"w%d" % i))
    conn.close()
    skeleton = {pid for kind in SKELETON for pid in processes_of_kind(broker, kind)} | {broker.proc.pid}
    yield broker, Bystander(broker), skeleton, (witness, receipted)
    left = broker.stop()
    assert not left, f"broker processes left behind: {left}"


def _open_connection(broker):
    """A connection holding a producer and a consumer, so that id fields can name real ids."""
    conn = RawConnection(*broker.address, timeout=ANSWER_DEADLINE_S)
    conn.hello()
    refs = {
        PRODUCER_REF: conn.request({"op": "producer", "topic": "/fz/r", "dispatch": "reliable"}, expect_error=True),
        CONSUMER_REF: conn.request({"op": "subscribe", "topic": "/fz/r", "subscription": f"s-{uuid.uuid4().hex[:6]}",
                                    "type": "shared", "consumer": "a", "dispatch": "reliable"},
                                   expect_error=True),
    }
    ids = {ref: reply.get("producer", reply.get("consumer")) for ref, reply in refs.items()}
    return conn, ids


def _resolve(value, ids):
    return ids.get(value, value) if isinstance(value, str) else value


def _send_batch(conn, frames, ids):
    """Send the batch in one write; returns {rid: op} and {rid: frame as sent}."""
    expected, sent = {}, {}
    data = []
    for frame in frames:
        conn.last_rid += 1
        rid = conn.last_rid
        frame = {k: _resolve(v, ids) for k, v in frame.items()}
        frame["rid"] = rid
        expected[rid] = frame["op"]
        sent[rid] = frame
        data.append(encode_frame(frame))
    conn.send_raw(b"".join(data))
    return expected, sent


def _collect_answers(conn, expected, sent):
    """Read until every request but `flow` is answered; returns {rid: [answers]}."""
    answers = {}
    waiting = {rid for rid, op in expected.items() if op != "flow"}
    deadline = time.monotonic() + ANSWER_DEADLINE_S
    # A last ping: its pong comes after every answer the shard itself writes, and bounds the wait
    # for `flow` errors (the only answers that may or may not come).
    conn.last_rid += 1
    marker = conn.last_rid
    conn.send_frame({"op": "ping", "rid": marker})
    marker_seen = False
    while waiting or not marker_seen:
        left = deadline - time.monotonic()
        assert left > 0, f"requests never answered: {[sent[r] for r in sorted(waiting)]}"
        try:
            frame = conn.recv_frame(timeout=left)
        except TimeoutError:
            frame = False
        assert frame is not False, f"requests never answered: {[sent[r] for r in sorted(waiting)]}"
        assert frame is not None, f"the broker closed the connection; unanswered: {sorted(waiting)}"
        op, rid = frame["op"], frame.get("rid")
        if op == "ping":
            conn.send_frame({"op": "pong", "rid": rid})
        elif rid == marker and op == "pong":
            marker_seen = True
        elif rid in expected and op not in ("message", "active", "closed"):
            answers.setdefault(rid, []).append(frame)
            waiting.discard(rid)
    return answers


def _drain(conn):
    """Answers that came after the marker (flow errors, late duplicates) with a short look."""
    extra = []
    conn.sock.settimeout(0.05)
    try:
        while True:
            frame = conn.recv_frame(timeout=0.05)
            if frame is None:
                break
            extra.append(frame)
    except (TimeoutError, OSError):
        pass
    return extra


@pytest.mark.timeout(7200 if SLOW else 600)
@given(frames=batches)
@_settings(LIVE_FRAMES // FRAMES_PER_BATCH)
def test_every_request_is_answered_once_and_nothing_else_is_harmed(fuzz_broker, frames):
    broker, bystander, skeleton, _ = fuzz_broker
    conn, ids = _open_connection(broker)
    try:
        expected, sent = _send_batch(conn, frames, ids)
        answers = _collect_answers(conn, expected, sent)
        for frame in _drain(conn):
            if frame.get("rid") in expected and frame["op"] not in ("message", "active", "closed", "ping"):
                answers.setdefault(frame["rid"], []).append(frame)
        for rid, got in answers.items():
            assert len(got) == 1, f"{expected[rid]} (rid {rid}) answered {len(got)} times: {got}"
            assert got[0].get("code") != "INTERNAL", f"{expected[rid]} (rid {rid}): {got[0]}"
    finally:
        conn.close()
    bystander.round_trip()
    dead = [pid for pid in skeleton if not proctree.alive(pid)]
    assert not dead, f"broker processes died: {dead}"


def test_receipted_messages_survive_the_fuzzing_and_nothing_was_logged_as_an_error(fuzz_broker):
    broker, bystander, skeleton, (witness, receipted) = fuzz_broker
    conn = RawConnection(*broker.address)
    conn.hello()
    consumer = conn.request({"op": "subscribe", "topic": witness, "subscription": "check", "type": "exclusive",
                             "consumer": "c", "start": "earliest", "dispatch": "reliable"})["consumer"]
    conn.send_frame({"op": "flow", "consumer": consumer, "credits": 1000})
    got = {}
    deadline = time.monotonic() + 20
    while len(got) < len(receipted) and time.monotonic() < deadline:
        frame = conn.recv_frame(timeout=max(0.01, deadline - time.monotonic()))
        if frame is not None and frame["op"] == "message":
            got.update((m["id"], m["payload"]) for m in frame["msgs"])
    conn.close()
    assert [got.get(offset) for offset, _ in receipted] == [payload for _, payload in receipted]
    log = (broker.data_dir / "broker.log").read_text(errors="replace")
    errors = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]
    assert not errors, "\n".join(errors[:20])


@given(data=st.binary(min_size=1, max_size=600))
@_settings(100 if SLOW else 30)
def test_garbage_bytes_get_an_error_then_close_and_harm_nobody(fuzz_broker, data):
    broker, bystander, skeleton, _ = fuzz_broker
    conn = RawConnection(*broker.address)
    conn.hello()
    try:
        # A header announcing more than is sent is a partial frame, not garbage: make it whole.
        conn.send_raw(len(data).to_bytes(4, "big") + data)
        frames = []
        while (frame := conn.recv_frame(timeout=10)) is not None:
            frames.append(frame)
        # Whatever the bytes decode to, the broker answers; a framing error closes with its code.
        errors = [f for f in frames if f["op"] == "error"]
        assert errors or frames, "no answer to a frame"
    except (TimeoutError, ConnectionResetError):
        pass   # a frame that decoded to a valid one-way op (nothing to answer): the conn stays open
    finally:
        conn.close()
    bystander.round_trip()


# --- the codec, without sockets ---------------------------------------------------------------

plain = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(MIN_INT, MAX_INT), st.text(max_size=10),
                               st.binary(max_size=10)),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                     max_leaves=20)
frames_st = st.lists(st.dictionaries(st.text(max_size=5), plain, max_size=5).map(lambda d: dict(d, op="x")),
                     min_size=1, max_size=6)


@given(frames=frames_st, cuts=st.lists(st.integers(0, 400), max_size=8))
@_settings(300)
def test_frames_survive_any_split_into_reads(frames, cuts):
    data = b"".join(encode_frame(f) for f in frames)
    decoder, out, start = FrameDecoder(), [], 0
    for cut in sorted(set(cuts)) + [len(data)]:
        decoder.feed(data[start:cut])
        start = max(start, cut)
        out.extend(decoder)
    assert out == frames


@given(data=st.binary(max_size=300), chunk=st.integers(1, 64))
@_settings(500)
def test_decoder_raises_only_protocol_errors(data, chunk):
    decoder = FrameDecoder(max_frame=256)
    try:
        for i in range(0, len(data), chunk):
            decoder.feed(data[i:i + chunk])
            for frame in decoder:
                assert isinstance(frame, dict) and isinstance(frame["op"], str)
    except ProtocolError as exc:
        assert exc.code in ("BAD_FRAME", "FRAME_TOO_LARGE")


@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=40), max_frame=st.integers(4200, 20000))
@_settings(200)
def test_pushes_split_below_max_frame_and_keep_every_record(sizes, max_frame):
    blobs = [encode_record(i, b"p" * n, None, {}, 1, "prod") for i, n in enumerate(sizes)]
    frames = encode_message_frames(7, blobs, max_frame)
    assert all(len(f) <= max_frame for f in frames)
    records = [m for f in frames for m in msgpack.unpackb(f[4:])["msgs"]]
    assert [(r["id"], len(r["payload"])) for r in records] == list(enumerate(sizes))


@given(counts=st.lists(st.integers(1, 2 ** 32 - 1), min_size=1, max_size=4))
@_settings(200)
def test_any_redelivery_count_is_pushed_as_valid_msgpack(counts):
    # A record is re-marked each time it is redelivered: the count grows past one byte's worth.
    blob = encode_record(5, b"x", "k", {"a": "b"}, 1, "prod")
    for count in sorted(counts):
        blob = with_redeliveries(blob, count)
        record = msgpack.unpackb(blob)
        assert record["redeliveries"] == count and record["payload"] == b"x"
