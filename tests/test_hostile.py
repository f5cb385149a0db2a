"""Hostile input over real TCP against a running broker (issue 10, cases 1-9 and 15): every
request is answered exactly once, a bad frame harms neither the frames around it nor anyone
else, nothing the broker cannot represent gets in, and every topic a request touches is checked
against the token."""
import json
import time

import pytest

from actorbroker.transport.validate import MAX_CREDITS, MAX_DELAY_MS
from tests.test_protocol import assert_alive, assert_error, connect
from tests.test_reliable import producer, receive, send, subscribe
from tests.wire import RawConnection


def nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def answers(conn, rids, timeout=10.0):
    """{rid: the frame answering it} for every rid; fails if one is answered twice."""
    got = {}
    while set(got) != set(rids):
        frame = conn.recv_frame(timeout=timeout)
        assert frame is not None, f"connection closed; unanswered: {set(rids) - set(got)}"
        if frame["op"] == "ping":   # a live client answers them: a slow answer must not end it
            conn.send_frame({"op": "pong", "rid": frame["rid"]})
            continue
        if frame.get("rid") not in rids:
            continue
        assert frame["rid"] not in got, f"rid {frame['rid']} answered twice: {got[frame['rid']]}, {frame}"
        got[frame["rid"]] = frame
    return got


# --- case 1: the 129th redelivery ------------------------------------------------------------------

def test_case1_a_message_redelivered_past_128_times_is_still_valid_msgpack(broker, topic):
    conn = connect(broker)
    consumer = subscribe(conn, topic, "s", "exclusive", credits=0, start="earliest")
    send(conn, producer(conn, topic), [b"poison"])
    for count in range(0, 131):   # 129 needs two bytes in the record, 256 three
        conn.send_frame({"op": "flow", "consumer": consumer, "credits": 1})
        [(offset, payload, redeliveries)] = receive(conn, 1)
        assert (payload, redeliveries) == (b"poison", count)
        conn.send_frame({"op": "nack", "consumer": consumer, "ids": [offset]})
    assert_alive(conn)


# --- case 2: an error answering an op before hello carries its rid ------------------------------------

@pytest.mark.parametrize("op", ["ping", "send", "producer", "subscribe", "flow", "ack", "topics", "frob"])
def test_case2_an_op_before_hello_is_answered_with_its_rid(broker, op):
    conn = connect(broker, hello=False)
    conn.send_frame({"op": op, "rid": 77})
    assert_error(conn.recv_frame(), "NOT_CONNECTED", 77)
    assert conn.expect_closed()


# --- case 3: a failing frame never affects the frames before or after it --------------------------------

@pytest.mark.parametrize("bad", [[1], {"a": 1}, "1", 1.5, None, True])
def test_case3_close_producer_with_a_bad_id_between_sends_in_one_write(broker, topic, bad):
    conn = connect(broker)
    pid = producer(conn, topic)
    frames = [{"op": "send", "rid": 101, "producer": pid, "msgs": [{"payload": b"before"}]},
              {"op": "close_producer", "rid": 102, "producer": bad},
              {"op": "send", "rid": 103, "producer": pid, "msgs": [{"payload": b"after"}]}]
    conn.send_raw(b"".join(RawConnection.encode(f) for f in frames))   # one socket read
    got = answers(conn, {101, 102, 103})
    assert got[101]["op"] == "receipt" and got[103]["op"] == "receipt"
    assert_error(got[102], "BAD_REQUEST", 102)
    assert "producer" in got[102]["message"]


HOSTILE = [None, True, -1, 2**64 - 1, 1.5, "", "x" * 300, "a\nb", b"bin", [1], {"k": [1]}, nested(450)]


def _templates(topic, pid, cid):
    """One valid frame per op; each field is replaced in turn by hostile values."""
    return [
        {"op": "producer", "topic": topic, "name": "p", "dispatch": "non_reliable", "access": "shared"},
        {"op": "send", "producer": pid, "msgs": [{"payload": b"x", "key": "k", "attrs": {"a": "b"}}]},
        {"op": "subscribe", "topic": topic, "subscription": "s", "type": "shared", "consumer": "c",
         "start": "latest", "dispatch": "non_reliable", "max_unacked": 5, "ack_timeout_ms": 100,
         "max_redeliveries": 3, "dead_letter_topic": topic + "-dlq"},
        {"op": "flow", "consumer": cid, "credits": 1},
        {"op": "ack", "consumer": cid, "ids": [0]},
        {"op": "nack", "consumer": cid, "ids": [0], "delay_ms": 0},
        {"op": "stats", "topic": topic},
        {"op": "close_producer", "producer": pid},
        {"op": "close_consumer", "consumer": cid},
        {"op": "unsubscribe", "consumer": cid},
        {"op": "hello", "version": 1, "client": "again"},
        {"op": "ping"},
        {"op": "topics"},
    ]


def _hostile_frames(topic, pid, cid):
    for template in _templates(topic, pid, cid):
        if template["op"] in ("close_producer", "close_consumer", "unsubscribe"):
            # a valid one would close what the others use: only hostile values here
            fields = [f for f in template if f != "op"]
        else:
            fields = [f for f in template if f != "op"] + ["extra"]
        for field in fields:
            for value in HOSTILE:
                yield dict(template, **{field: value})
        if template["op"] == "send":
            for field in ("payload", "key", "attrs"):
                for value in HOSTILE:
                    yield dict(template, msgs=[dict(template["msgs"][0], **{field: value})])


@pytest.mark.parametrize("dispatch", ["non_reliable", "reliable"])
def test_case3_every_hostile_field_of_every_op_is_answered_once_and_harms_no_neighbour(broker, topic, dispatch):
    conn = connect(broker)
    bystander = connect(broker)
    pid = conn.request({"op": "producer", "topic": topic, "dispatch": dispatch})["producer"]
    cid = conn.request({"op": "subscribe", "topic": topic, "subscription": "keep", "type": "shared",
                        "consumer": "k"})["consumer"]
    frames, rid = [], 1000
    for frame in _hostile_frames(topic, pid, cid):
        rid += 1
        frames.append(dict(frame, rid=rid))
        rid += 1   # and a valid send after each: it must be receipted all the same
        frames.append({"op": "send", "rid": rid, "producer": pid, "msgs": [{"payload": b"ok"}]})
    for start in range(0, len(frames), 50):   # 50 frames per write: many in one socket read
        batch = frames[start:start + 50]
        conn.send_raw(b"".join(RawConnection.encode(f) for f in batch))
        got = answers(conn, {f["rid"] for f in batch})
        for f in batch:
            reply = got[f["rid"]]
            if f["op"] == "send" and f["msgs"] == [{"payload": b"ok"}]:
                assert reply["op"] == "receipt", (f, reply)
            assert reply["op"] != "error" or reply["code"] != "INTERNAL", (f, reply)
    assert_alive(conn)
    assert_alive(bystander)
    stats = conn.request({"op": "stats", "topic": topic})   # no handler of the topic's actors failed
    assert stats["handler_errors"] == 0 and stats["poison_messages"] == 0


# --- case 4: nack with duplicate ids and a delay -----------------------------------------------------------

def test_case4_nack_with_duplicate_ids_and_a_delay_redelivers(broker, topic):
    conn = connect(broker)
    consumer = subscribe(conn, topic, "s", "exclusive", credits=10)
    send(conn, producer(conn, topic), [b"m"])
    [(offset, _, _)] = receive(conn, 1)
    conn.request({"op": "nack", "consumer": consumer, "ids": [offset, offset, offset], "delay_ms": 50})
    assert receive(conn, 1) == [(offset, b"m", 1)]
    conn.request({"op": "ack", "consumer": consumer, "ids": [offset]})
    stats = conn.request({"op": "stats", "topic": topic})
    assert stats["subscriptions"][0]["backlog"] == 0


# --- case 5: delays and timeouts beyond what a timer can hold ----------------------------------------------

def test_case5_huge_nack_delay_is_refused_and_the_subscription_lives_on(broker, topic):
    conn = connect(broker)
    consumer = subscribe(conn, topic, "s", "exclusive", credits=10)
    pid = producer(conn, topic)
    send(conn, pid, [b"a"])
    [(offset, _, _)] = receive(conn, 1)
    for delay in (2**31, 2**63, MAX_DELAY_MS + 1):
        reply = conn.request({"op": "nack", "consumer": consumer, "ids": [offset], "delay_ms": delay},
                             expect_error=True)
        assert_error(reply, "BAD_REQUEST", conn.last_rid)
        assert "delay_ms" in reply["message"]
    # the longest delay allowed parks the message without harming the dispatcher
    conn.request({"op": "nack", "consumer": consumer, "ids": [offset], "delay_ms": MAX_DELAY_MS})
    send(conn, pid, [b"b"])
    assert [p for _, p, _ in receive(conn, 1)] == [b"b"]
    assert conn.request({"op": "ack", "consumer": consumer, "ids": [offset + 1]})["op"] == "ok"
    assert conn.request({"op": "stats", "topic": topic})["subscriptions"][0]["name"] == "s"


def test_case5_huge_ack_timeout_is_refused_and_the_longest_allowed_works(broker, topic):
    conn = connect(broker)
    for timeout in (2**31, 2**64 - 1):
        reply = conn.request({"op": "subscribe", "topic": topic, "subscription": "s", "type": "shared",
                              "consumer": "c", "dispatch": "reliable", "ack_timeout_ms": timeout},
                             expect_error=True)
        assert_error(reply, "BAD_REQUEST", conn.last_rid)
        assert "ack_timeout_ms" in reply["message"]
    consumer = subscribe(conn, topic, "s", "shared", credits=10, ack_timeout_ms=MAX_DELAY_MS)
    pid = producer(conn, topic)
    send(conn, pid, [b"a"])
    [(offset, _, _)] = receive(conn, 1)   # its ack timeout is armed now
    assert conn.request({"op": "ack", "consumer": consumer, "ids": [offset]})["op"] == "ok"
    send(conn, pid, [b"b"])
    assert [p for _, p, _ in receive(conn, 1)] == [b"b"]
    assert conn.request({"op": "stats", "topic": topic})["subscriptions"][0]["name"] == "s"


# --- case 6: names of 255 characters on a reliable topic -------------------------------------------------

def test_case6_longest_names_work_on_a_reliable_topic_and_survive_a_restart(start_broker, tmp_path):
    data = tmp_path / "data"
    topic = "/" + "n" * 100 + "/" + "t" * 153
    sub = "s" * 255
    assert len(topic) == 255
    b = start_broker(data_dir=data)
    conn = connect(b)
    consumer = subscribe(conn, topic, sub, "exclusive", name="c" * 255, credits=10)
    send(conn, producer(conn, topic), [b"m0", b"m1", b"m2"])
    got = receive(conn, 3)
    assert conn.request({"op": "ack", "consumer": consumer, "ids": [got[0][0]]})["op"] == "ok"
    assert topic in [t["name"] for t in conn.request({"op": "topics"})["topics"]]
    b.stop()
    b2 = start_broker(data_dir=data)
    again = connect(b2)
    stats = again.request({"op": "stats", "topic": topic})
    assert [s["name"] for s in stats["subscriptions"]] == [sub] and stats["subscriptions"][0]["cursor"] == 1
    subscribe(again, topic, sub, "exclusive", name="c" * 255, credits=10)
    assert [p for _, p, _ in receive(again, 2)] == [b"m1", b"m2"]


@pytest.mark.parametrize("field,value", [("subscription", "s" * 256), ("consumer", "c" * 256),
                                         ("subscription", "é" * 128)])
def test_case6_names_past_255_bytes_are_bad_request(broker, topic, field, value):
    conn = connect(broker)
    frame = {"op": "subscribe", "topic": topic, "subscription": "s", "type": "shared", "consumer": "c"}
    reply = conn.request(dict(frame, **{field: value}), expect_error=True)
    assert_error(reply, "BAD_REQUEST", conn.last_rid)
    assert field in reply["message"]


def test_case6_producer_name_key_and_attrs_past_255_bytes_are_bad_request(broker, topic):
    conn = connect(broker)
    reply = conn.request({"op": "producer", "topic": topic, "name": "p" * 256}, expect_error=True)
    assert_error(reply, "BAD_REQUEST", conn.last_rid)
    pid = producer(conn, topic)
    for msg, field in [({"payload": b"x", "key": "k" * 256}, "key"),
                       ({"payload": b"x", "attrs": {"a" * 256: "v"}}, "attrs"),
                       ({"payload": b"x", "attrs": {"a": "v" * 256}}, "attrs")]:
        reply = conn.request({"op": "send", "producer": pid, "msgs": [msg]}, expect_error=True)
        assert_error(reply, "BAD_REQUEST", conn.last_rid)
        assert field in reply["message"]
    assert conn.request({"op": "send", "producer": pid, "msgs": [
        {"payload": b"x", "key": "k" * 255, "attrs": {"a" * 255: "v" * 255}}]})["op"] == "receipt"


# --- case 7: credits past what the broker holds ----------------------------------------------------------

def test_case7_flow_credits_are_bounded_and_stats_still_answer(broker, topic):
    conn = connect(broker)
    consumer = conn.request({"op": "subscribe", "topic": topic, "subscription": "s", "type": "shared",
                             "consumer": "c"})["consumer"]
    reply = conn.request({"op": "flow", "consumer": consumer, "credits": 2**64 - 1}, expect_error=True)
    assert_error(reply, "BAD_REQUEST", conn.last_rid)
    assert "credits" in reply["message"]
    for credits in (MAX_CREDITS, MAX_CREDITS, 1):
        assert conn.request({"op": "flow", "consumer": consumer, "credits": credits})["op"] == "ok"
    stats = conn.wait_for(lambda: conn.request({"op": "stats", "topic": topic}),
                          lambda s: s["subscriptions"][0]["consumers"][0]["credits"] == 2 * MAX_CREDITS + 1)
    assert stats["subscriptions"][0]["consumers"][0]["credits"] == 2 * MAX_CREDITS + 1


# --- case 8: deep nesting -----------------------------------------------------------------------------

def test_case8_deeply_nested_fields_are_answered(broker, topic):
    conn = connect(broker)
    deep = nested(450)
    for frame, expected in [({"op": "producer", "topic": topic, "extra": deep}, "producer_ok"),
                            ({"op": "producer", "topic": deep}, "error"),
                            ({"op": "subscribe", "topic": topic, "subscription": "s", "type": "shared",
                              "consumer": "c", "extra": {"x": deep}}, "subscribed"),
                            ({"op": "stats", "topic": topic, "extra": deep}, "stats"),
                            ({"op": "topics", "extra": deep}, "topics")]:
        reply = conn.request(frame, expect_error=True)
        assert reply["op"] == expected, (frame["op"], reply)
    pid = producer(conn, topic)
    reply = conn.request({"op": "send", "producer": pid, "msgs": [{"payload": b"x", "attrs": {"a": deep}}]},
                         expect_error=True)
    assert_error(reply, "BAD_REQUEST", conn.last_rid)
    assert_alive(conn)


def test_case8_nesting_msgpack_cannot_decode_closes_only_the_offender(broker):
    bystander = connect(broker)
    conn = connect(broker)
    body = b"\x83\xa2op\xa6topics\xa3rid\x07\xa1x" + b"\x91" * 2000 + b"\xc0"   # 2000 levels
    conn.send_raw(len(body).to_bytes(4, "big") + body)
    assert_error(conn.recv_frame(), "BAD_FRAME")
    assert conn.expect_closed()
    assert_alive(bystander)


# --- case 9: control characters in names --------------------------------------------------------------

@pytest.mark.parametrize("bad", [lambda t: t + "\n", lambda t: t + "\r", lambda t: t.replace("/t-", "/\tt-"),
                                 lambda t: t + "\x00", lambda t: "\n" + t],
                         ids=["newline", "cr", "tab", "nul", "leading-newline"])
def test_case9_topic_names_with_control_characters_are_bad_topic(broker, topic, bad):
    name = bad(topic)   # "/nl/b\n" and its kind
    conn = connect(broker)
    for frame in ({"op": "producer", "topic": name},
                  {"op": "subscribe", "topic": name, "subscription": "s", "type": "shared", "consumer": "c"},
                  {"op": "stats", "topic": name},
                  {"op": "delete_topic", "topic": name},
                  {"op": "subscribe", "topic": topic, "subscription": "s", "type": "shared", "consumer": "c",
                   "dispatch": "reliable", "dead_letter_topic": name}):
        assert_error(conn.request(frame, expect_error=True), "BAD_TOPIC", conn.last_rid)
    assert name not in [t["name"] for t in conn.request({"op": "topics"})["topics"]]


@pytest.mark.parametrize("field", ["subscription", "consumer"])
def test_case9_other_names_with_control_characters_are_bad_request(broker, topic, field):
    conn = connect(broker)
    frame = {"op": "subscribe", "topic": topic, "subscription": "s", "type": "shared", "consumer": "c"}
    reply = conn.request(dict(frame, **{field: "a\nb"}), expect_error=True)
    assert_error(reply, "BAD_REQUEST", conn.last_rid)
    assert field in reply["message"]


# --- case 15 and authorization everywhere ------------------------------------------------------------

def auth_broker(start_broker, tmp_path, tokens):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(tokens))
    return start_broker("--auth-file", str(path))


def test_case15_a_dead_letter_topic_needs_produce_permission(start_broker, tmp_path):
    b = auth_broker(start_broker, tmp_path, {"root": ["admin"], "orders": ["consume:/orders/*"],
                                             "orders-dlq": ["consume:/orders/*", "produce:/dlq/*"]})
    conn = connect(b, token="orders")
    reply = conn.request({"op": "subscribe", "topic": "/orders/a", "subscription": "s", "type": "shared",
                          "consumer": "c", "dispatch": "reliable", "max_redeliveries": 0,
                          "dead_letter_topic": "/secret/target"}, expect_error=True)
    assert_error(reply, "NOT_AUTHORIZED", conn.last_rid)
    assert "/secret/target" in reply["message"]
    root = connect(b, token="root")
    names = [t["name"] for t in root.request({"op": "topics"})["topics"]]
    assert "/secret/target" not in names and "/orders/a" not in names   # nothing was created
    # with produce permission on it, the dead-letter topic gets the message
    allowed = connect(b, token="orders-dlq")
    consumer = subscribe(allowed, "/orders/b", "s", "shared", credits=10, max_redeliveries=0,
                         dead_letter_topic="/dlq/orders")
    send(root, producer(root, "/orders/b"), [b"bad"])
    [(offset, _, _)] = receive(allowed, 1)
    allowed.request({"op": "nack", "consumer": consumer, "ids": [offset]})
    stats = root.wait_for(lambda: root.request({"op": "stats", "topic": "/dlq/orders"}, expect_error=True),
                          lambda s: s["op"] == "stats" and s["msgs_in"] == 1)
    assert stats["msgs_in"] == 1


# Which ops each token may do: (frame, the permission it needs, or None when only admin does)
AUTH_WALK = [
    ({"op": "producer", "topic": "/p/t"}, "produce:/p/t"),
    ({"op": "producer", "topic": "/c/t"}, "produce:/c/t"),
    ({"op": "subscribe", "topic": "/c/t", "subscription": "s", "type": "shared", "consumer": "c"}, "consume:/c/t"),
    ({"op": "subscribe", "topic": "/p/t", "subscription": "s", "type": "shared", "consumer": "c"}, "consume:/p/t"),
    ({"op": "subscribe", "topic": "/c/t", "subscription": "d", "type": "shared", "consumer": "c",
      "dead_letter_topic": "/p/dlq"}, "consume:/c/t produce:/p/dlq"),
    ({"op": "subscribe", "topic": "/c/t", "subscription": "e", "type": "shared", "consumer": "c",
      "dead_letter_topic": "/c/dlq"}, "consume:/c/t produce:/c/dlq"),
    ({"op": "topics"}, None),
    ({"op": "stats", "topic": "/p/t"}, None),
    ({"op": "delete_topic", "topic": "/no/such"}, None),
]
TOKENS = {"none": [], "producer": ["produce:/p/*"], "consumer": ["consume:/c/*"],
          "both": ["produce:/p/*", "consume:/c/*"], "admin": ["admin"]}


def _may(permissions, needed):
    if "admin" in permissions:
        return True
    if needed is None:
        return False
    from fnmatch import fnmatchcase
    return all(any(p.split(":")[0] == want.split(":")[0] and fnmatchcase(want.split(":", 1)[1], p.split(":", 1)[1])
                   for p in permissions) for want in needed.split())


def test_auth_walk_of_every_op_and_permission(start_broker, tmp_path):
    b = auth_broker(start_broker, tmp_path, TOKENS)
    root = connect(b, token="admin")
    root.request({"op": "producer", "topic": "/p/t"})   # so that stats has a topic to find
    for token, permissions in TOKENS.items():
        conn = connect(b, token=token)
        for frame, needed in AUTH_WALK:
            reply = conn.request(frame, expect_error=True)
            if _may(permissions, needed):
                assert reply["op"] != "error" or reply["code"] == "TOPIC_NOT_FOUND", (token, frame, reply)
            else:
                assert_error(reply, "NOT_AUTHORIZED", conn.last_rid)
        # ids opened by another connection are not this one's, whatever the token
        other = root.request({"op": "producer", "topic": "/p/t"})["producer"]
        conn.send_frame({"op": "send", "rid": 5, "producer": other, "msgs": [{"payload": b"x"}]})
        assert_error(conn.recv_frame(), "UNKNOWN_PRODUCER", 5)
        conn.close()


# --- found by the fuzz suite: an ack racing the end of its consumer is answered exactly once --------

@pytest.mark.parametrize("closing_op", ["close_consumer", "unsubscribe"])
def test_acks_pipelined_behind_the_close_of_their_consumer_are_answered_once(broker, topic, closing_op):
    conn = connect(broker)
    consumer = subscribe(conn, topic, "s", "shared", start="earliest")
    send(conn, producer(conn, topic), [b"a", b"b", b"c"])
    ids = [offset for offset, _, _ in receive(conn, 3)]
    frames = [{"op": "ack", "rid": 201, "consumer": consumer, "ids": ids[:1]},
              {"op": closing_op, "rid": 202, "consumer": consumer},
              {"op": "ack", "rid": 203, "consumer": consumer, "ids": ids[1:2]},
              {"op": "ack", "rid": 204, "consumer": consumer, "ids": []}]
    conn.send_raw(b"".join(RawConnection.encode(f) for f in frames))   # one socket read
    got = answers(conn, {201, 202, 203, 204})
    assert got[202]["op"] == "ok"
    if closing_op == "close_consumer":   # the subscription lives on: the ack before is saved
        assert got[201]["op"] == "ok", got[201]
    for rid in (201, 203, 204):   # an unsubscribe may end the cursor before the first is saved
        assert got[rid]["op"] == "ok" or got[rid]["code"] == "UNKNOWN_CONSUMER", got[rid]
    assert_alive(conn)


def test_a_burst_of_admin_requests_is_answered_and_takes_nothing_down(start_broker):
    """3,000 pipelined broker_stats (each once measured the memory of every broker process, and
    the root, busy with them, missed serve's liveness ping: serve took the broker down). Every one
    is answered once: served, or OVERLOADED beyond 1024 waiting for an answer."""
    b = start_broker()
    bystander = connect(b, heartbeat_ms=60_000)   # idle meanwhile: it answers no ping
    flooder = connect(b)
    flooder.send_raw(b"".join(flooder.encode({"op": "broker_stats", "rid": 10_000 + i}) for i in range(3000)))
    got = answers(flooder, set(range(10_000, 13_000)), timeout=60)
    refused = [f for f in got.values() if f["op"] == "error"]
    # beyond 1024 waiting for an answer, the connection's requests are refused until answers come
    assert {f["code"] for f in refused} <= {"OVERLOADED"}
    assert refused and len(got) - len(refused) >= 1024
    assert flooder.request({"op": "broker_stats"})["op"] == "broker_stats"   # and then served again
    assert b.proc.poll() is None, "serve exited"
    assert_alive(bystander)
    assert_alive(connect(b))


@pytest.mark.parametrize("op", ["close_producer", "close_consumer", "unsubscribe"])
def test_closing_another_connections_ids_leaves_its_producer_and_consumer_working(start_broker, topic, op):
    """One shard holds both connections. A close naming the victim's ids got UNKNOWN_* all right,
    but the shard had dropped their routes first (its tables are for all its connections): the
    victim's sends got UNKNOWN_PRODUCER, its consumer got nothing more, no `closed` either, and a
    third client could take its exclusive subscription (hostile probe, 3 of 3)."""
    b = start_broker("--io-shards", "1")
    victim = connect(b)
    producer = victim.request({"op": "producer", "topic": topic})["producer"]
    consumer = victim.request({"op": "subscribe", "topic": topic, "subscription": "s", "type": "exclusive",
                               "consumer": "owner"})["consumer"]
    victim.send_frame({"op": "flow", "consumer": consumer, "credits": 100})
    attacker = connect(b)
    target = {"producer": producer} if op == "close_producer" else {"consumer": consumer}
    assert_error(attacker.request(dict(target, op=op), expect_error=True),
                 "UNKNOWN_PRODUCER" if op == "close_producer" else "UNKNOWN_CONSUMER", attacker.last_rid)
    assert victim.request({"op": "send", "producer": producer, "msgs": [{"payload": b"still mine"}]})["op"] == "receipt"
    frame = victim.recv_frame(timeout=5)
    while frame["op"] == "ping":
        frame = victim.recv_frame(timeout=5)
    assert frame["op"] == "message" and frame["consumer"] == consumer, frame
    thief = connect(b)
    assert_error(thief.request({"op": "subscribe", "topic": topic, "subscription": "s", "type": "exclusive",
                                "consumer": "thief"}, expect_error=True), "CONSUMER_BUSY", thief.last_rid)


@pytest.mark.parametrize("dispatch", ["reliable", "non_reliable"])
def test_two_acks_with_one_rid_in_flight_get_an_answer_each(start_broker, topic, dispatch):
    """The second of two pipelined acks with the same rid was never answered (the shard keeps
    the rids of a consumer's acks in flight in a set): it is refused now, as a reused rid is."""
    b = start_broker()
    conn = connect(b)
    consumer = conn.request({"op": "subscribe", "topic": topic, "subscription": "s", "type": "shared",
                             "consumer": "c", "dispatch": dispatch})["consumer"]
    conn.send_raw(b"".join(conn.encode({"op": "ack", "rid": 5, "consumer": consumer, "ids": ids})
                           for ids in ([0, 1], [2, 3])))
    answers = [conn.recv_frame(timeout=10) for _ in range(2)]
    answers = [f for f in answers if f["op"] != "ping"]
    assert sorted((f["op"], f.get("code")) for f in answers) == [("error", "BAD_REQUEST"), ("ok", None)], answers
    assert all(f["rid"] == 5 for f in answers)
    assert_alive(conn)


def test_messages_of_megabytes_of_attrs_are_delivered_in_batches_within_bounds(start_broker, topic):
    """20 messages of ~3 MB of attrs each (every name and value within 255 bytes, as allowed) and
    a consumer granting 1000 credits: delivery batches were bounded by payload bytes only, one
    went over the lane's frame limit, the lane ended, and the consumer got `closed`
    subscription_lost with nothing delivered (hostile probe, 4 of 4)."""
    from actorbroker.transport.client import Client
    b = start_broker()
    attrs = {f"{i:04d}" + "n" * 246: "v" * 250 for i in range(6000)}   # ~3 MB
    with Client(*b.address) as client:
        producer = client.producer(topic, dispatch="reliable", linger_ms=0, max_batch=1)
        consumer = client.subscribe(topic, "s", "exclusive", "c", dispatch="reliable", auto_credit=False)
        for i in range(25):   # ~75 MB waiting, then all of it asked for at once
            producer.send(b"", attrs=attrs)
        producer.flush(60)
        consumer.flow(1000)
        got = [consumer.receive(timeout=30) for _ in range(25)]
        assert [m.id for m in got] == list(range(25)) and got[-1].attrs == attrs
        assert consumer.closed_reason is None


def test_a_rid_reused_while_its_request_waits_is_refused_and_holds_up_no_one(start_broker, topic):
    """20,000 `topics` all with rid 7, in one write: counted once, as one request waiting, they
    passed the limits of 1024 waiting and 16 at the root, and another client's `producer` waited
    for minutes (INTERNAL after 30 s, three times over). A rid already waiting for its answer on
    the connection is now refused with BAD_REQUEST."""
    b = start_broker()
    bystander = connect(b)
    flooder = connect(b)
    n = 20_000
    flooder.send_raw(b"".join(flooder.encode({"op": "topics", "rid": 7}) for _ in range(n)))
    first = flooder.recv_frame(timeout=30)
    assert first["rid"] == 7, first
    start = time.monotonic()
    bystander.send_frame({"op": "producer", "rid": 8, "topic": topic})
    reply = bystander.recv_frame(timeout=60)
    assert reply["op"] == "producer_ok" and reply["rid"] == 8, reply
    assert time.monotonic() - start < 20, "the bystander's producer waited behind the flood"
    # the flooder: one answer per request, the reused ones refused (unless its unread answers
    # got it closed as a slow consumer first)
    seen, codes = 1, {first.get("code", first["op"])}
    while seen < n and (frame := flooder.recv_frame(timeout=30)) is not None:
        seen += 1
        codes.add(frame.get("code", frame["op"]))
    assert "BAD_REQUEST" in codes and codes <= {"topics", "BAD_REQUEST", "SLOW_CONSUMER", "ping"}, codes
    assert b.proc.poll() is None
    assert_alive(bystander)


@pytest.mark.parametrize("dispatch", ["reliable", "non_reliable"])
def test_a_close_refused_for_a_reused_rid_leaves_its_producer_and_consumer_open(start_broker, topic, dispatch):
    """close_producer and close_consumer with the rid of a request still waiting were refused
    (BAD_REQUEST), yet the shard had stopped routing both when it read them: later sends got
    UNKNOWN_PRODUCER, flow UNKNOWN_CONSUMER, and the consumer, still attached, got nothing more.
    A refused close has no effect now."""
    b = start_broker()
    conn = connect(b)
    consumer = conn.request({"op": "subscribe", "topic": topic, "subscription": "s", "type": "exclusive",
                             "consumer": "c", "dispatch": dispatch})["consumer"]
    producer_id = conn.request({"op": "producer", "topic": topic, "dispatch": dispatch})["producer"]
    conn.send_raw(b"".join(conn.encode(frame) for frame in (
        {"op": "topics", "rid": 7000},   # waits for the root's answer while the closes come in
        {"op": "close_consumer", "rid": 7000, "consumer": consumer},
        {"op": "close_producer", "rid": 7000, "producer": producer_id})))
    got = []
    while len(got) < 3:
        frame = conn.recv_frame(timeout=10)
        assert frame is not None, got
        if frame.get("rid") == 7000:
            got.append(frame)
    assert sorted(f.get("code", f["op"]) for f in got) == ["BAD_REQUEST", "BAD_REQUEST", "topics"], got
    # both still open, on the broker and on this connection
    conn.send_frame({"op": "flow", "consumer": consumer, "credits": 10})
    assert conn.request({"op": "send", "producer": producer_id, "msgs": [{"payload": b"after"}]})["op"] == "receipt"
    frame = conn.recv_frame(timeout=10)
    while frame is not None and frame["op"] != "message":
        assert frame["op"] in ("ping", "ok"), frame
        frame = conn.recv_frame(timeout=10)
    assert frame is not None and [m["payload"] for m in frame["msgs"]] == [b"after"], frame
    stats = conn.request({"op": "stats", "topic": topic})
    assert [c["name"] for s in stats["subscriptions"] for c in s["consumers"]] == ["c"], stats
    # and closed for good with a rid of their own
    assert conn.request({"op": "close_consumer", "consumer": consumer})["op"] == "ok"
    assert conn.request({"op": "close_producer", "producer": producer_id})["op"] == "ok"
    assert_error(conn.request({"op": "flow", "consumer": consumer, "credits": 1}, expect_error=True),
                 "UNKNOWN_CONSUMER", conn.last_rid)
    assert_alive(conn)


def test_a_close_refused_then_sent_again_with_its_own_rid_closes(start_broker, topic):
    """A close refused for a reused rid and, pipelined behind it, the same close with a fresh rid
    (answered `ok`): the refusal put the route back after the second close had been read, so the
    closed producer's sends were receipted and the closed consumer's flow answered (regression
    probe). Closed is closed."""
    b = start_broker()
    conn = connect(b)
    consumer = conn.request({"op": "subscribe", "topic": topic, "subscription": "s", "type": "shared",
                             "consumer": "c"})["consumer"]
    conn.request({"op": "subscribe", "topic": topic, "subscription": "s", "type": "shared", "consumer": "d"})
    producer_id = conn.request({"op": "producer", "topic": topic})["producer"]
    conn.send_raw(b"".join(conn.encode(frame) for frame in (
        {"op": "topics", "rid": 7000},
        {"op": "close_consumer", "rid": 7000, "consumer": consumer},
        {"op": "close_producer", "rid": 7000, "producer": producer_id},
        {"op": "close_consumer", "rid": 7001, "consumer": consumer},
        {"op": "close_producer", "rid": 7002, "producer": producer_id})))
    got = []   # three answers for rid 7000 (topics, two refusals), one each for the others
    while len(got) < 5:
        frame = conn.recv_frame(timeout=10)
        assert frame is not None, got
        if frame.get("rid") in (7000, 7001, 7002):
            got.append((frame["rid"], frame.get("code", frame["op"])))
    assert sorted(got) == [(7000, "BAD_REQUEST"), (7000, "BAD_REQUEST"), (7000, "topics"),
                           (7001, "ok"), (7002, "ok")], got
    assert_error(conn.request({"op": "send", "producer": producer_id, "msgs": [{"payload": b"x"}]},
                              expect_error=True), "UNKNOWN_PRODUCER", conn.last_rid)
    assert_error(conn.request({"op": "ack", "consumer": consumer, "ids": [0]}, expect_error=True),
                 "UNKNOWN_CONSUMER", conn.last_rid)
    stats = conn.request({"op": "stats", "topic": topic})
    assert stats["producers"] == 0 and [c["name"] for s in stats["subscriptions"] for c in s["consumers"]] == ["d"]
    assert_alive(conn)


def test_a_burst_of_admin_requests_does_not_hold_up_another_clients_producer(start_broker, topic):
    """A client pipelining 1,000 `stats` once put all of them (1024 allowed to wait) ahead of every
    other client's requests at the root: another client's `producer` was answered after them
    (2.6 s median). The root now gets at most 16 of one connection's requests at a time, so the
    bystander's `producer` is answered while the flood is still being served."""
    b = start_broker()
    bystander = connect(b)
    bystander.request({"op": "producer", "topic": topic})   # the topic exists: no process start-up
    flooder = connect(b)
    n = 1000
    flooder.send_raw(b"".join(flooder.encode({"op": "stats", "rid": 10_000 + i, "topic": topic})
                              for i in range(n)))
    first = flooder.recv_frame(timeout=30)   # the flood is being served
    assert first["op"] == "stats", first
    bystander.send_frame({"op": "producer", "rid": 7, "topic": topic})
    reply = bystander.recv_frame(timeout=60)
    assert reply["op"] == "producer_ok" and reply["rid"] == 7, reply
    # what the broker had written to the flooder by then lies in its socket: few of the 1,000
    before = 0
    flooder.sock.setblocking(False)
    while True:
        try:
            data = flooder.sock.recv(1 << 20)
        except BlockingIOError:
            break
        flooder.decoder.feed(data)
    while (frame := flooder.decoder.next_frame()) is not None:
        flooder.skipped.append(frame)
        before += frame.get("op") == "stats"
    assert before < n // 2, f"{before} of the flood's {n} answers came before the bystander's"
    rest = answers(flooder, set(range(10_000, 10_000 + n)) - {first["rid"]}, timeout=60)
    assert all(f["op"] == "stats" for f in rest.values())
    assert b.proc.poll() is None
