"""Protocol version 2 (docs/protocol.md): columnar `send`, `message` pushes of runs.

The codec, the session and the client core without sockets first; then a real broker, with raw
frames and through both Python clients, next to v1 connections on the same topics."""
import asyncio
import time

import msgpack
import pytest

from actorbroker.actors.config import BrokerConfig
from actorbroker.actors.policies import ConsumerState, make_policy
from actorbroker.transport import codec
from actorbroker.transport.client import AsyncClient, Client
from actorbroker.transport.client.core import (ClientCore, ConsumerCore, Message, ProducerCore, hello_frame,
                                               messages_of_runs)
from actorbroker.transport.codec import (FrameDecoder, encode_frame, encode_message_frames, encode_record,
                                         encode_record_tail, encode_run_frames, encode_runs_v1, make_run)
from actorbroker.transport.session import Session, SessionConfig
from tests.wire import RawConnection

TIME = 1_700_000_000_000


def decoded(frames):
    decoder = FrameDecoder(max_frame=1 << 30)
    for frame in frames:
        decoder.feed(frame)
    return list(decoder)


def v1_fields(record):
    return (record["id"], record["payload"], record["key"], record["attrs"], record["time"],
            record["producer"], record["redeliveries"])


# --- codec ----------------------------------------------------------------------------------------

def test_a_run_push_carries_the_seven_fields_of_each_message():
    run = make_run(40, TIME, "prod", [b"a", b"bb", b"ccc"], keys=[None, "k", ""], attrs=[{}, {"x": "y"}, {}],
                   redeliveries=2)
    (push,) = decoded(encode_run_frames(9, [run]))
    assert push == {"op": "message", "consumer": 9, "runs": [
        [40, TIME, "prod", 2, [b"a", b"bb", b"ccc"], [None, "k", ""], [{}, {"x": "y"}, {}]]]}
    assert messages_of_runs(push["runs"], 9) == [
        Message(40, b"a", None, {}, TIME, "prod", 2, 9), Message(41, b"bb", "k", {"x": "y"}, TIME, "prod", 2, 9),
        Message(42, b"ccc", "", {}, TIME, "prod", 2, 9)]


def test_the_same_runs_as_v1_pushes_are_the_records_v1_always_sent():
    runs = [make_run(0, TIME, "p", [b"x" * i for i in range(5)]),
            make_run(5, TIME + 1, "q", [b"y", b"z"], keys=["k", None], attrs=[{"a": "b"}, {}], redeliveries=3)]
    v1 = [v1_fields(r) for push in decoded(encode_runs_v1(4, runs)) for r in push["msgs"]]
    expected = [v1_fields(r) for push in decoded(encode_message_frames(4, [
        *(encode_record(i, b"x" * i, None, {}, TIME, "p") for i in range(5)),
        encode_record(5, b"y", "k", {"a": "b"}, TIME + 1, "q", 3),
        encode_record(6, b"z", None, {}, TIME + 1, "q", 3)])) for r in push["msgs"]]
    assert v1 == expected
    v2 = [tuple(m[:7]) for push in decoded(encode_run_frames(4, runs)) for m in messages_of_runs(push["runs"], 4)]
    assert v2 == expected


def test_run_pushes_stay_within_max_frame_and_keep_every_message_in_order():
    runs = [make_run(i * 50, TIME, "p", [bytes([i]) * 100] * 50) for i in range(6)]
    frames = encode_run_frames(1, runs, max_frame=2000)
    assert all(len(f) <= 2000 for f in frames) and len(frames) > 3
    ids = [m.id for push in decoded(frames) for m in messages_of_runs(push["runs"], 1)]
    assert ids == list(range(300))


def test_split_explode_and_coalesce_keep_the_records():
    run = make_run(10, TIME, "p", [b"a", b"b", b"c", b"d"], keys=["k1", None, "k3", None])
    head, tail = codec.split_run(run, 1)
    assert (head[0], head[1], tail[0], tail[1]) == (10, 1, 11, 3)
    assert codec.run_records(tail) == [(11, b"b", None, {}), (12, b"c", "k3", {}), (13, b"d", None, {})]
    ones = codec.explode_run(run)
    assert [codec.run_key(r) for r in ones] == ["k1", None, "k3", None]
    (merged,) = codec.coalesce_runs(ones)
    assert codec.run_records(merged) == codec.run_records(run)
    # a gap, another time or another redelivery count starts a new run
    parts = codec.coalesce_runs([ones[0], ones[2], codec.with_run_redeliveries(ones[3], 1)])
    assert [(r[0], r[1]) for r in parts] == [(10, 1), (12, 1), (13, 1)]


def test_reliable_log_tails_are_the_v1_tails_and_read_back_as_runs():
    run = make_run(3, TIME, "prod", [b"p1", b"p2"], keys=["k", None], attrs=[{}, {"a": "b"}])
    assert codec.run_tails(run) == [encode_record_tail(b"p1", "k", {}, "prod"),
                                    encode_record_tail(b"p2", None, {"a": "b"}, "prod")]
    plain = make_run(3, TIME, "prod", [b"p1", b"p2"])
    assert codec.run_tails(plain) == [encode_record_tail(p, None, {}, "prod") for p in (b"p1", b"p2")]
    back = codec.run_from_tail(4, None, TIME, encode_record_tail(b"p2", None, {"a": "b"}, "prod"))
    assert codec.run_records(back) == [(4, b"p2", None, {"a": "b"})] and back[3] == "prod"


# --- policies over runs -------------------------------------------------------------------------------

def test_exclusive_hands_runs_out_whole_and_splits_only_where_credits_end():
    policy = make_policy("exclusive", 1000)
    consumer = ConsumerState(1, "c", None, credits=7)
    policy.add(consumer)
    policy.enqueue([make_run(0, TIME, "p", [b"x"] * 5), make_run(5, TIME, "p", [b"y"] * 5)])
    ((who, runs),) = policy.take()
    assert [(r[0], r[1]) for r in runs] == [(0, 5), (5, 2)] and policy.backlog_size() == 3
    consumer.credits = 10
    ((_, runs),) = policy.take()
    assert [(r[0], r[1]) for r in runs] == [(7, 3)] and policy.backlog_size() == 0


def test_non_reliable_bound_drops_the_newest_records_of_a_run():
    policy = make_policy("failover", 6)
    policy.enqueue([make_run(0, TIME, "p", [b"x"] * 4), make_run(4, TIME, "p", [b"y"] * 4)])
    assert policy.trim() == 2 and policy.backlog_size() == 6
    policy.add(ConsumerState(1, "c", None, credits=100))
    ((_, runs),) = policy.take()
    assert [m[0] for r in runs for m in codec.run_records(r)] == [0, 1, 2, 3, 4, 5]


# --- the session (broker side, sans-IO) -------------------------------------------------------------

def session(version):
    s = Session(1, SessionConfig(BrokerConfig()), now=0.0)
    events = s.receive_data(encode_frame({"op": "hello", "rid": 1, "version": version, "client": "t"}), 0.0)
    welcome = decoded([bytes(s.outbox)])[0]
    s.outbox.clear()
    s.producers[5] = "prod"
    return s, events, welcome


def test_hello_version_2_is_welcomed_as_2_and_1_as_1():
    for version in (1, 2):
        s, events, welcome = session(version)
        assert welcome["op"] == "welcome" and welcome["version"] == version and s.version == version
        assert events[0][0] == "hello"


def test_a_columnar_send_is_one_publish_event_with_the_payloads_packed_once():
    s, _, _ = session(2)
    events = s.receive_data(encode_frame({"op": "send", "rid": 2, "producer": 5,
                                          "payloads": [b"a", b"bb"], "keys": [None, "k"],
                                          "attrs": [None, {"x": "y"}]}), 0.0)
    ((kind, producer, rid, send),) = events
    assert (kind, producer, rid) == ("publish", 5, 2)
    count, payloads, keys, attrs, size = send
    assert (count, msgpack.unpackb(payloads), keys, attrs, size) == (2, [b"a", b"bb"], [None, "k"],
                                                                    [{}, {"x": "y"}], 3)
    events = s.receive_data(encode_frame({"op": "send", "rid": 3, "producer": 5, "payloads": [b"a"],
                                          "keys": [None], "attrs": [{}]}), 0.0)
    assert events[0][3][2:4] == [None, None]   # no key, no attrs: columns dropped


@pytest.mark.parametrize("frame, text", [
    ({"payloads": []}, "'payloads' must be a non-empty list"),
    ({"payloads": [b"a", "b"]}, "message 1: 'payload' must be bin"),
    ({"payloads": [b"a"], "keys": ["k", "l"]}, "'keys' must be a list as long as 'payloads'"),
    ({"payloads": [b"a"], "attrs": {"a": "b"}}, "'attrs' must be a list as long as 'payloads'"),
    ({"payloads": [b"a"], "keys": [7]}, "message 0: 'key' must be a str"),
    ({"payloads": [b"a"], "attrs": [{"a": 1}]}, "message 0: 'attrs' must be a map of str to str"),
    ({"payloads": [b"a"], "attrs": [[]]}, "message 0: 'attrs' must be a map of str to str"),
    ({"payloads": [b"a", b"b"], "attrs": [None, False]}, "message 1: 'attrs' must be a map of str to str"),
    ({"payloads": [b"a"], "attrs": [""]}, "message 0: 'attrs' must be a map of str to str"),
    ({"payloads": [b"x" * (4 * 1024 * 1024)]}, "message 0: message of"),
])
def test_a_bad_columnar_send_is_refused_whole(frame, text):
    s, _, _ = session(2)
    s.decoder.max_frame = 8 * 1024 * 1024
    events = s.receive_data(encode_frame(dict({"op": "send", "rid": 9, "producer": 5}, **frame)), 0.0)
    assert events == []
    (error,) = decoded([bytes(s.outbox)])
    assert error["code"] == "BAD_REQUEST" and error["rid"] == 9 and error["message"].startswith(text), error


def test_a_v1_session_knows_no_payloads_column():
    s, _, _ = session(1)
    assert s.receive_data(encode_frame({"op": "send", "rid": 2, "producer": 5, "payloads": [b"a"]}), 0.0) == []
    (error,) = decoded([bytes(s.outbox)])
    assert error["code"] == "BAD_REQUEST" and "'msgs'" in error["message"]


# --- the client core (sans-IO) --------------------------------------------------------------------------

class _Producer(ProducerCore):
    pass


def test_the_client_asks_for_v2_and_sends_columns_once_welcomed():
    assert hello_frame("c")["version"] == 2 and hello_frame("c", version=1)["version"] == 1
    core = ClientCore("c")
    assert core.version == 1
    core.welcomed({"op": "welcome", "version": 2, "max_frame": 1 << 20, "heartbeat_ms": 5000})
    producer = _Producer({"producer": 3}, None, 2, 10, 100, 1 << 20)
    for args in ((b"a", None, None), ("é", None, None)):
        producer._add(*producer._record(*args))
    plain = producer._batcher.take()
    frame = decoded([core.send_request(producer, plain)])[0]
    assert frame == {"op": "send", "rid": 1, "producer": 3, "payloads": [b"a", "é".encode()]}
    for args in ((b"a", None, None), (b"b", "k", None), (b"c", None, {"x": "y"})):
        producer._add(*producer._record(*args))
    mixed = producer._batcher.take()
    frame = decoded([core.send_request(producer, mixed)])[0]
    assert frame["payloads"] == [b"a", b"b", b"c"] and frame["keys"] == [None, "k", None]
    assert frame["attrs"] == [{}, {}, {"x": "y"}]
    v1 = decoded([encode_frame(producer._send_frame(mixed, 1))])[0]
    assert v1["msgs"] == [{"payload": b"a"}, {"payload": b"b", "key": "k"}, {"payload": b"c", "attrs": {"x": "y"}}]


class _Consumer(ConsumerCore):
    def __init__(self, reply):
        super().__init__(reply, "/t/t", "s", "exclusive", "c", None, None)


def test_the_client_core_turns_a_run_push_into_messages():
    core = ClientCore("c")
    _, data = core.request({"op": "subscribe"}, None, _Consumer, "consumer")
    core.receive_data(encode_frame({"op": "subscribed", "rid": 1, "consumer": 7}), 0.0)
    run = make_run(100, TIME, "p", [b"m0", b"m1"], keys=["k", None])
    events = core.receive_data(b"".join(encode_run_frames(7, [run])), 0.0)
    ((kind, consumer, messages),) = events
    assert kind == "messages" and consumer.id == 7
    assert messages == [Message(100, b"m0", "k", {}, TIME, "p", 0, 7), Message(101, b"m1", None, {}, TIME, "p", 0, 7)]


# --- a real broker ---------------------------------------------------------------------------------------

def raw(broker, version):
    conn = RawConnection(*broker.address)
    assert conn.hello(version=version)["version"] == version
    return conn


def next_push(conn):
    while True:
        frame = conn.recv_frame()
        if frame["op"] == "message":
            return frame


def test_v2_and_v1_connections_share_a_topic_each_in_its_own_format(broker, topic):
    v1, v2 = raw(broker, 1), raw(broker, 2)
    c1 = v1.request({"op": "subscribe", "topic": topic, "subscription": "one", "type": "exclusive",
                     "consumer": "c"})["consumer"]
    c2 = v2.request({"op": "subscribe", "topic": topic, "subscription": "two", "type": "exclusive",
                     "consumer": "c"})["consumer"]
    v1.send_frame({"op": "flow", "consumer": c1, "credits": 10})
    v2.send_frame({"op": "flow", "consumer": c2, "credits": 10})
    producer = v2.request({"op": "producer", "topic": topic, "name": "prod"})["producer"]
    receipt = v2.request({"op": "send", "producer": producer, "payloads": [b"a", b"b", b"c"],
                          "keys": [None, "k", None], "attrs": [{}, {}, {"x": "y"}]})
    assert receipt["op"] == "receipt" and receipt["count"] == 3
    first = receipt["first"]
    push = next_push(v2)
    assert push["consumer"] == c2 and len(push["runs"]) == 1
    run_first, stamp, name, redeliveries, payloads, keys, attrs = push["runs"][0]
    assert (run_first, name, redeliveries, payloads, keys, attrs) == (
        first, "prod", 0, [b"a", b"b", b"c"], [None, "k", None], [{}, {}, {"x": "y"}])
    push = next_push(v1)
    assert [v1_fields(r) for r in push["msgs"]] == [
        (first, b"a", None, {}, stamp, "prod", 0), (first + 1, b"b", "k", {}, stamp, "prod", 0),
        (first + 2, b"c", None, {"x": "y"}, stamp, "prod", 0)]
    # a v1 send on the v1 connection reaches the v2 consumer as a run
    p1 = v1.request({"op": "producer", "topic": topic, "name": "old"})["producer"]
    v1.request({"op": "send", "producer": p1, "msgs": [{"payload": b"d", "key": "kk"}]})
    push = next_push(v2)
    assert push["runs"][0][2] == "old" and push["runs"][0][4:6] == [[b"d"], ["kk"]]
    for conn in (v1, v2):
        conn.close()


@pytest.mark.parametrize("sub_type", ["exclusive", "shared", "failover", "key_shared"])
@pytest.mark.parametrize("dispatch", ["non_reliable", "reliable"])
def test_every_subscription_type_delivers_everything_once_to_v2_and_v1_clients(broker, topic, sub_type, dispatch):
    n = 1200
    with Client(*broker.address) as client, Client(*broker.address, protocol_version=1) as old:
        assert client.welcome["version"] == 2 and old.welcome["version"] == 1
        consumers = [client.subscribe(topic, "s", sub_type, "a", dispatch=dispatch)]
        if sub_type in ("shared", "key_shared"):
            consumers.append(old.subscribe(topic, "s", sub_type, "b", dispatch=dispatch))
        producer = client.producer(topic, dispatch=dispatch)
        futures = [producer.send(f"m{i}".encode(), key=f"k{i % 7}" if i % 3 else None,
                                 attrs={"i": str(i)} if i % 5 == 0 else None) for i in range(n)]
        producer.flush()
        offsets = [f.result() for f in futures]
        got = {}
        deadline = time.monotonic() + 60
        while sum(len(v) for v in got.values()) < n and time.monotonic() < deadline:
            took = 0
            for c in consumers:   # all that each has now; a short wait only while nothing came
                try:
                    while True:
                        msg = c.receive(timeout=0 if took else 0.02)
                        took += 1
                        got.setdefault(c.name, []).append(msg)
                        if dispatch == "reliable":
                            c.ack(msg)
                except TimeoutError:
                    pass
        messages = [m for msgs in got.values() for m in msgs]
        assert sorted(m.id for m in messages) == offsets
        for m in messages:
            i = int(m.payload[1:])
            assert m.id == offsets[i] and m.key == (f"k{i % 7}" if i % 3 else None)
            assert m.attrs == ({"i": str(i)} if i % 5 == 0 else {}) and m.producer == producer.name
        for msgs in got.values():   # in order per consumer (key_shared: per key)
            for key in ({m.key for m in msgs} if sub_type == "key_shared" else [...]):
                ids = [m.id for m in msgs if key is ... or m.key == key]
                assert ids == sorted(ids)
        if sub_type == "key_shared":   # one key, one consumer
            owners = {}
            for name, msgs in got.items():
                for m in msgs:
                    if m.key is not None:
                        assert owners.setdefault(m.key, name) == name


def test_v2_redelivery_counts_and_acks_by_message_id(broker, topic):
    with Client(*broker.address) as client:
        consumer = client.subscribe(topic, "s", "shared", "c", dispatch="reliable")
        producer = client.producer(topic, dispatch="reliable")
        for i in range(10):
            producer.send(f"m{i}".encode())
        producer.flush()
        first = [consumer.receive(timeout=5) for _ in range(10)]
        consumer.ack(first[:5], sync=True)
        consumer.nack(first[5:], sync=True)
        again = [consumer.receive(timeout=5) for _ in range(5)]
        assert [m.id for m in again] == [m.id for m in first[5:]]
        assert all(m.redeliveries == 1 and m.payload == f.payload and m.time == f.time
                   for m, f in zip(again, first[5:]))
        consumer.ack(again, sync=True)
        assert client.stats(topic)["subscriptions"][0]["backlog"] == 0


def test_the_asyncio_client_speaks_v2_too(broker, topic):
    async def scenario():
        async with await AsyncClient.connect(*broker.address) as client:
            assert client.welcome["version"] == 2
            consumer = await client.subscribe(topic, "s", "exclusive", "c")
            producer = await client.producer(topic)
            futures = [await producer.send(f"m{i}".encode(), key="k" if i == 3 else None,
                                           attrs={"a": "b"} if i == 4 else None) for i in range(300)]
            await producer.flush()
            offsets = [await f for f in futures]
            got = []
            async for msg in consumer:
                got.append(msg)
                if len(got) == 300:
                    break
            assert [m.id for m in got] == offsets
            assert got[3].key == "k" and got[4].attrs == {"a": "b"} and got[5].attrs == {}
    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_run_larger_than_max_frame_reaches_the_consumer_in_several_pushes(start_broker, topic):
    broker = start_broker("--max-frame", str(64 * 1024))
    with Client(*broker.address) as client:
        consumer = client.subscribe(topic, "s", "exclusive", "c", receiver_queue=5000)
        producer = client.producer(topic, max_batch=5000, linger_ms=50)
        payloads = [bytes([i % 256]) * 200 for i in range(1000)]
        for p in payloads:
            producer.send(p)
        producer.flush()
        got = [consumer.receive(timeout=10).payload for _ in payloads]
        assert got == payloads


def test_log_records_come_back_as_runs_whatever_their_fields():
    plain = [encode_record_tail(b"p%d" % i, None, {}, "prod") for i in range(4)]
    records = [(0, None, TIME, plain[0]), (1, None, TIME, plain[1]), (2, None, TIME + 1, plain[2]),
               (3, "k", TIME + 1, encode_record_tail(b"q", "k", {}, "prod")),
               (4, None, TIME + 1, encode_record_tail(b"r", None, {"a": "b"}, "other")),
               (5, None, TIME + 1, plain[3]), (6, None, TIME + 1, encode_record_tail(b"x" * 300, None, {}, "prod")),
               (8, None, TIME + 1, encode_record_tail(b"y", None, {}, "prod"))]
    runs = codec.runs_from_tails(records)
    assert [(r[0], r[1]) for r in runs] == [(0, 2), (2, 1), (3, 1), (4, 1), (5, 2), (8, 1)]
    got = [(m, r[2], r[3]) for r in runs for m in codec.run_records(r)]
    assert got == [((0, b"p0", None, {}), TIME, "prod"), ((1, b"p1", None, {}), TIME, "prod"),
                   ((2, b"p2", None, {}), TIME + 1, "prod"), ((3, b"q", "k", {}), TIME + 1, "prod"),
                   ((4, b"r", None, {"a": "b"}), TIME + 1, "other"), ((5, b"p3", None, {}), TIME + 1, "prod"),
                   ((6, b"x" * 300, None, {}), TIME + 1, "prod"), ((8, b"y", None, {}), TIME + 1, "prod")]
