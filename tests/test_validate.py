"""transport/validate.py as pure logic: every op's schema, its bounds, and the clean copy of a
control op that is all an actor ever sees of a client's frame."""
import pytest

from actorbroker.transport import validate as V


def code_of(check, frame):
    with pytest.raises(V.Invalid) as info:
        check(frame)
    return info.value.code, info.value.message


@pytest.mark.parametrize("name,ok", [
    ("/a/b", True), ("/" + "a" * 126 + "/" + "b" * 127, True), ("/" + "a" * 126 + "/" + "b" * 128, False),
    ("/a/b\n", False), ("/a/b\r\n", False), ("\n/a/b", False), ("/a/b/c", False), ("/a/", False),
    ("/a/b c", False), ("/é/b", False), (b"/a/b", False), (None, False),
])
def test_topic_names(name, ok):
    assert V.valid_topic(name) is ok


def test_names_are_bounded_in_bytes_and_free_of_control_characters():
    assert V.name_problem("x" * 255, "n") is None
    assert "255 bytes" in V.name_problem("x" * 256, "n")
    assert V.name_problem("é" * 127, "n") is None            # 254 bytes
    assert "255 bytes" in V.name_problem("é" * 128, "n")     # 256 bytes in 128 characters
    assert "control" in V.name_problem("a\nb", "n")
    assert "control" in V.name_problem("a\x7fb", "n")
    assert "empty" in V.name_problem("", "n")
    assert V.name_problem("", "n", empty_ok=True) is None
    assert "str" in V.name_problem(["a"], "n")


def test_a_control_op_is_a_clean_copy_of_its_known_fields():
    frame = {"op": "producer", "rid": 3, "topic": "/a/b", "name": "p", "extra": [[[[]]]], "access": "exclusive"}
    assert V.control(frame) == {"op": "producer", "rid": 3, "topic": "/a/b", "name": "p", "dispatch": None,
                                "access": "exclusive"}
    sub = V.control({"op": "subscribe", "rid": 1, "topic": "/a/b", "subscription": "s", "type": "shared",
                     "consumer": "c", "nested": {"x": [1]}})
    assert "nested" not in sub and sub["start"] == "latest" and sub["dead_letter_topic"] is None


@pytest.mark.parametrize("frame,code,field", [
    ({"op": "producer", "topic": "/a/b\n"}, "BAD_TOPIC", "topic"),
    ({"op": "producer", "topic": ["/a/b"]}, "BAD_REQUEST", "topic"),
    ({"op": "producer", "topic": "/a/b", "name": "p" * 256}, "BAD_REQUEST", "name"),
    ({"op": "producer", "topic": "/a/b", "dispatch": 1}, "BAD_REQUEST", "dispatch"),
    ({"op": "close_producer", "producer": [1]}, "BAD_REQUEST", "producer"),
    ({"op": "close_producer", "producer": True}, "BAD_REQUEST", "producer"),
    ({"op": "close_consumer", "consumer": {}}, "BAD_REQUEST", "consumer"),
    ({"op": "subscribe", "topic": "/a/b", "subscription": "s", "type": "shared", "consumer": "c",
      "ack_timeout_ms": V.MAX_DELAY_MS + 1}, "BAD_REQUEST", "ack_timeout_ms"),
    ({"op": "subscribe", "topic": "/a/b", "subscription": "s", "type": "shared", "consumer": "c",
      "max_unacked": 2**32}, "BAD_REQUEST", "max_unacked"),
    ({"op": "subscribe", "topic": "/a/b", "subscription": "s", "type": "shared", "consumer": "c",
      "max_redeliveries": -1}, "BAD_REQUEST", "max_redeliveries"),
    ({"op": "subscribe", "topic": "/a/b", "subscription": "s", "type": "shared", "consumer": "c",
      "dead_letter_topic": "/d/l\n"}, "BAD_TOPIC", "dead_letter_topic"),
    ({"op": "subscribe", "topic": "/a/b", "subscription": "s", "type": None, "consumer": "c"}, "BAD_REQUEST", "type"),
    ({"op": "stats", "topic": None}, "BAD_REQUEST", "topic"),
])
def test_control_ops_refused_naming_the_field(frame, code, field):
    got_code, message = code_of(V.control, dict(frame, rid=1))
    assert got_code == code and field in message


def test_control_needs_a_rid_and_a_known_op():
    assert code_of(V.control, {"op": "topics"})[0] == "BAD_REQUEST"
    assert code_of(V.control, {"op": "topics", "rid": -1})[0] == "BAD_REQUEST"
    assert code_of(V.control, {"op": "send", "rid": 1})[0] == "UNKNOWN_OP"
    assert code_of(V.control, [1])[0] == "BAD_REQUEST"


def test_consumer_op_fields():
    assert V.credits({"credits": V.MAX_CREDITS}) == V.MAX_CREDITS
    assert code_of(V.credits, {"credits": V.MAX_CREDITS + 1})[0] == "BAD_REQUEST"
    assert V.ids({"ids": [3, 1, 3, 3]}) == [3, 1]             # a repeated id counts once
    assert code_of(V.ids, {"ids": [1, -1]})[0] == "BAD_REQUEST"
    assert code_of(V.ids, {"ids": [True]})[0] == "BAD_REQUEST"
    assert V.delay({}) == 0 and V.delay({"delay_ms": V.MAX_DELAY_MS}) == V.MAX_DELAY_MS
    assert code_of(V.delay, {"delay_ms": 2**31})[0] == "BAD_REQUEST"


def test_message_checks():
    limit = 1000
    assert V.message_problem(b"x", "k" * 255, {"a" * 255: "v" * 255}, limit) is None
    assert V.message_problem(b"x", "a\nb", None, limit) is None    # a key is data
    assert "key" in V.message_problem(b"x", "k" * 256, None, limit)
    assert "key" in V.message_problem(b"x", 5, None, limit)
    assert "attrs" in V.message_problem(b"x", None, {"a": "v" * 256}, limit)
    assert "attrs" in V.message_problem(b"x", None, {"a": ["v"]}, limit)
    assert "payload" in V.message_problem("x", None, None, limit)
    assert "too large" in V.message_problem(b"x" * 1001, None, None, limit)
