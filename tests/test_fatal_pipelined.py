"""Requests pipelined ahead of a fatal frame (PROTOCOL.md: every request with a `rid` gets exactly
one answer). A client writes several frames at once and a later one is fatal (BAD_FRAME,
FRAME_TOO_LARGE): the requests read before it took effect, so they are answered, then comes the
error frame, then the close (docs/protocol.md, "Session")."""
from tests.test_protocol import assert_error, connect
from tests.test_reliable import producer, receive, subscribe
from tests.wire import RawConnection

NOT_A_MAP = (3).to_bytes(4, "big") + b"\x01\x02\x03"   # a whole frame, not one msgpack map: BAD_FRAME
TOO_LARGE = (64 * 1024 * 1024).to_bytes(4, "big")     # a header past max_frame: FRAME_TOO_LARGE


def until_closed(conn, timeout=10.0):
    """Every frame up to the broker's close (its pings left out)."""
    frames = []
    while True:
        frame = conn.recv_frame(timeout=timeout)
        if frame is None:
            return frames
        if frame["op"] != "ping":
            frames.append(frame)


def answered_then_error(frames, rids, code):
    """The frames are one answer per rid, in any order, then the fatal error (no rid), last.
    Returns {rid: answer}."""
    assert frames, "closed without a word"
    assert_error(frames[-1], code)
    got = {}
    for frame in frames[:-1]:
        assert frame.get("rid") in rids, f"not an answer to {sorted(rids)}: {frame} (all: {frames})"
        assert frame["rid"] not in got, f"rid {frame['rid']} answered twice: {frames}"
        got[frame["rid"]] = frame
    assert set(got) == set(rids), f"unanswered before the error: {set(rids) - set(got)}; got {frames}"
    return got


def one_write(conn, frames, tail):
    conn.send_raw(b"".join(RawConnection.encode(f) for f in frames) + tail)


def test_a_producer_and_sends_before_a_bad_frame_are_answered_then_the_error_then_the_close(broker, topic):
    reader = connect(broker)
    subscribe(reader, topic, "s", "shared", start="earliest")
    producer(reader, topic + "-2")   # (the topics exist: no process start-up to wait for)
    conn = connect(broker)
    pid = producer(conn, topic)
    one_write(conn, [{"op": "producer", "rid": 10, "topic": topic + "-2", "dispatch": "reliable"},
                     {"op": "send", "rid": 11, "producer": pid, "msgs": [{"payload": b"a"}]},
                     {"op": "send", "rid": 12, "producer": pid, "msgs": [{"payload": b"b"}, {"payload": b"c"}]}],
              NOT_A_MAP)
    got = answered_then_error(until_closed(conn), {10, 11, 12}, "BAD_FRAME")
    assert got[10]["op"] == "producer_ok", got[10]
    assert (got[11]["op"], got[11]["count"]) == ("receipt", 1), got[11]
    assert (got[12]["op"], got[12]["count"]) == ("receipt", 2), got[12]
    # receipted: stored, and delivered
    assert [payload for _, payload, _ in receive(reader, 3)] == [b"a", b"b", b"c"]


def test_an_exclusive_producer_opened_before_a_bad_frame_leaves_its_place_free_with_the_close(broker, topic):
    """Answered producer_ok and then closed with the connection: its topic frees the exclusive
    place when the connection ends, as for any producer, so a client that takes over at once is
    let in (it got PRODUCER_BUSY for 20-35 ms, in 18 of 20 tries of a probe)."""
    for attempt in range(3):
        name = f"{topic}-{attempt}"
        first = connect(broker)
        one_write(first, [{"op": "producer", "rid": 41, "topic": name, "access": "exclusive"}], NOT_A_MAP)
        got = answered_then_error(until_closed(first), {41}, "BAD_FRAME")
        assert got[41]["op"] == "producer_ok", got[41]
        second = connect(broker)
        reply = second.request({"op": "producer", "topic": name, "access": "exclusive"}, expect_error=True)
        assert reply["op"] == "producer_ok", reply
        second.close()


def test_a_send_before_a_frame_too_large_is_receipted_then_the_error_then_the_close(broker, topic):
    reader = connect(broker)
    subscribe(reader, topic, "s", "shared", start="earliest")
    conn = connect(broker)
    pid = producer(conn, topic)
    one_write(conn, [{"op": "send", "rid": 21, "producer": pid, "msgs": [{"payload": b"x"}]}], TOO_LARGE)
    got = answered_then_error(until_closed(conn), {21}, "FRAME_TOO_LARGE")
    assert got[21]["op"] == "receipt", got[21]
    assert [payload for _, payload, _ in receive(reader, 1)] == [b"x"]


def test_a_subscribe_and_admin_ops_before_a_bad_frame_are_answered_first(broker, topic):
    subscribe(connect(broker), topic, "s", "shared")   # (it exists: no process start-up to wait for)
    conn = connect(broker)
    one_write(conn, [{"op": "subscribe", "rid": 31, "topic": topic, "subscription": "s", "type": "shared",
                      "consumer": "c", "dispatch": "reliable"},
                     {"op": "topics", "rid": 32},
                     {"op": "stats", "rid": 33, "topic": topic},
                     {"op": "ping", "rid": 34},
                     {"op": "close_producer", "rid": 35, "producer": 999}],   # refused, answered too
              NOT_A_MAP)
    got = answered_then_error(until_closed(conn), {31, 32, 33, 34, 35}, "BAD_FRAME")
    assert [got[rid]["op"] for rid in (31, 32, 33, 34)] == ["subscribed", "topics", "stats", "pong"], got
    assert_error(got[35], "UNKNOWN_PRODUCER", 35)


def test_an_ack_before_a_bad_frame_is_answered_and_saved_and_the_rest_is_redelivered(broker, topic):
    conn = connect(broker)
    consumer = subscribe(conn, topic, "s", "shared", start="earliest")
    pid = producer(conn, topic)
    conn.request({"op": "send", "producer": pid, "msgs": [{"payload": b"acked"}, {"payload": b"not acked"}]})
    (first, _, _), _ = receive(conn, 2)
    one_write(conn, [{"op": "ack", "rid": 41, "consumer": consumer, "ids": [first]}], NOT_A_MAP)
    got = answered_then_error(until_closed(conn), {41}, "BAD_FRAME")
    assert got[41]["op"] == "ok", got[41]
    # the failed connection's consumer is gone; the next one gets only what was not acked
    other = connect(broker)
    subscribe(other, topic, "s", "shared")
    assert [payload for _, payload, _ in receive(other, 1)] == [b"not acked"]
    other.send_frame({"op": "ping", "rid": 99})
    assert other.recv_frame()["op"] == "pong"   # (nothing else came first)


def test_a_bad_frame_with_nothing_pending_is_answered_at_once(broker):
    conn = connect(broker)
    conn.send_raw(RawConnection.encode({"op": "ping", "rid": 51}) + NOT_A_MAP)
    answered_then_error(until_closed(conn), {51}, "BAD_FRAME")


def test_answers_slower_than_the_wait_do_not_hold_the_error_and_the_close(broker):
    """1,000 `broker_stats` pipelined before a bad frame: served 16 at a time, most are not
    answered within the wait (1 s here): the error and the close come anyway, after the answers
    written so far, each once; the requests left are dropped, and the broker serves on."""
    conn = connect(broker)
    rids = set(range(1000, 2000))
    one_write(conn, [{"op": "broker_stats", "rid": rid} for rid in sorted(rids)], NOT_A_MAP)
    frames = until_closed(conn, timeout=30)
    assert_error(frames[-1], "BAD_FRAME")
    answered = [frame["rid"] for frame in frames[:-1]]
    assert len(set(answered)) == len(answered) and set(answered) <= rids, frames[:-1]
    assert all(frame["op"] == "broker_stats" for frame in frames[:-1])
    other = connect(broker)
    assert other.request({"op": "broker_stats"})["op"] == "broker_stats"


# --- the session's part, sans-IO ------------------------------------------------------------------

def test_the_session_holds_a_fatal_error_frame_back_behind_later_answers_and_writes_nothing_after_it():
    from actorbroker.actors.config import BrokerConfig
    from actorbroker.transport.codec import FrameDecoder, encode_frame
    from actorbroker.transport.session import Session, SessionConfig
    s = Session(1, SessionConfig(BrokerConfig()), now=0.0)
    s.receive_data(encode_frame({"op": "hello", "rid": 1, "version": 1, "client": "t"}), 0.0)
    events = s.receive_data(encode_frame({"op": "ping", "rid": 2}) + NOT_A_MAP, 0.0)
    assert [e[0] for e in events] == ["closed"] and not s.open
    assert s.hold_fatal() and not s.hold_fatal()   # (once)
    s.write(encode_frame({"op": "receipt", "rid": 3, "first": 0, "count": 1}))   # an answer from elsewhere
    s.release_fatal()
    s.write(encode_frame({"op": "ok", "rid": 4}))   # too late: nothing after the error
    decoder = FrameDecoder()
    decoder.feed(bytes(s.outbox))
    got = list(decoder)
    assert [(f["op"], f.get("rid")) for f in got] == [("welcome", 1), ("pong", 2), ("receipt", 3), ("error", None)]
    assert got[-1]["code"] == "BAD_FRAME"


def test_the_session_does_not_hold_back_slow_consumer():
    from actorbroker.actors.config import BrokerConfig
    from actorbroker.transport.codec import encode_frame
    from actorbroker.transport.session import Session, SessionConfig
    s = Session(1, SessionConfig(BrokerConfig(max_pending_bytes=1000)), now=0.0)
    s.receive_data(encode_frame({"op": "hello", "rid": 1, "version": 1, "client": "t"}), 0.0)
    s.write(encode_frame({"op": "pong", "rid": 0, "pad": "x" * 2000}))   # a client that does not read
    assert [e[0] for e in s.check_outbox()] == ["closed"]
    assert not s.hold_fatal()
