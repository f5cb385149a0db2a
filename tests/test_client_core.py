"""The sans-IO client core (transport/client/core.py) on its own: bytes and times in, bytes and
events out. No sockets, threads or event loop."""
import logging

import msgpack
import pytest

from actorbroker.transport import errors as E
from actorbroker.transport.client.core import (
    ACTIVE, BROKEN, CLOSED, LOST, MESSAGES, RECEIPT, REOPEN, REPLY, WRITE, Batch, ClientCore, ConsumerCore,
    Message, ProducerCore, dispatch, end_unopened, open_consumer, open_producer)
from actorbroker.transport.codec import FrameDecoder, encode_frame, encode_message_frames, encode_record


def frames_of(data):
    decoder = FrameDecoder()
    decoder.feed(data)
    return list(decoder)


def feed(core, *frames, now=0.0):
    return core.receive_data(b"".join(encode_frame(f) for f in frames), now)


class Producer(ProducerCore):
    """A producer with recording stand-ins for the I/O hooks."""

    def __init__(self, client, reply, name=None, linger_ms=2, max_batch=500, max_pending=10000):
        super().__init__(reply, name, linger_ms, max_batch, max_pending, client.max_frame)
        self.calls = []

    def _receipt(self, batch, reply, error):
        self.calls.append(("receipt", self._settle(batch, reply, error)))

    def _ended(self, cls, arg):
        self._set_end(cls, arg)
        self.calls.append(("ended", cls, arg))

    def _fail_unsent(self):
        self.calls.append(("fail_unsent",))


class Consumer(ConsumerCore):
    def __init__(self, client, reply, topic="/a/b", subscription="s", sub_type="failover", name="c",
                 receiver_queue=4, on_active=None):
        super().__init__(reply, topic, subscription, sub_type, name, receiver_queue, on_active)
        self.calls = []

    def _deliver(self, messages):
        self.calls.append(("deliver", messages))

    def _ended(self, reason, raises=None):
        if self._set_end(reason, raises):
            self.calls.append(("ended", reason))


class IO:
    """The I/O layer's hooks of dispatch, recorded."""

    def __init__(self):
        self.settled, self.written = [], []
        self.name = "io"

    def _settle(self, waiter, result, error):
        self.settled.append((waiter, result, error))

    def _write_quietly(self, data):
        self.written.append(data)

    def _reopen_later(self, obj):
        self.reopening = getattr(self, "reopening", []) + [obj]


def open_(core, kind, rid_reply, waiter="w"):
    """Open a producer or consumer through the core; returns (events, object)."""
    io = IO()
    if kind == "producer":
        frame, make = open_producer(core, Producer, "/a/b", None, None, None, 2, 3, 10)
    else:
        frame, make = open_consumer(core, Consumer, "/a/b", "s", "failover", "c", 4, True, None, {})
    rid, data = core.request(frame, waiter, make, kind)
    assert frames_of(data)[0]["rid"] == rid
    events = feed(core, dict(rid_reply, rid=rid))
    dispatch(events, io)
    return events, io.settled[-1][1]


# --- requests ---------------------------------------------------------------------------------

def test_hello_welcome_and_unique_rids():
    core = ClientCore("me")
    rid, data = core.request({"op": "hello", "version": 1, "client": "me"}, "hello-waiter")
    [hello] = frames_of(data)
    assert hello == {"op": "hello", "version": 1, "client": "me", "rid": rid}
    welcome = {"op": "welcome", "rid": rid, "version": 1, "broker": "b", "heartbeat_ms": 800,
               "max_frame": 1 << 20}
    assert feed(core, welcome) == [(REPLY, "hello-waiter", welcome, None)]
    core.welcomed(welcome)
    assert (core.max_frame, core.heartbeat_ms) == (1 << 20, 800)
    rids = {core.request({"op": "ping"}, None)[0] for _ in range(100)}
    assert len(rids) == 100 and rid not in rids


def test_the_caller_frame_is_not_modified():
    core = ClientCore("me")
    frame = {"op": "topics"}
    core.request(frame, None)
    assert frame == {"op": "topics"}


def test_error_replies_become_typed_errors_and_forgotten_requests_are_dropped():
    core = ClientCore("me")
    rid, _ = core.request({"op": "subscribe"}, "w")
    [(kind, waiter, result, error)] = feed(core, {"op": "error", "rid": rid, "code": "CONSUMER_BUSY",
                                                  "message": "taken"})
    assert (kind, waiter, result) == (REPLY, "w", None)
    assert isinstance(error, E.ConsumerBusy) and error.message == "taken"
    rid, _ = core.request({"op": "topics"}, "late")
    core.forget(rid)                                   # timed out
    assert feed(core, {"op": "topics", "rid": rid, "topics": []}) == []


def test_errors_without_rid(caplog):
    core = ClientCore("me")
    with caplog.at_level(logging.WARNING, logger="actorbroker.client"):
        assert feed(core, {"op": "error", "code": "UNKNOWN_CONSUMER", "message": "x"}) == []
    assert "one-way op" in caplog.text and core.last_error is None
    feed(core, {"op": "error", "code": "AUTH_FAILED", "message": "bad token"})
    assert isinstance(core.last_error, E.AuthFailed)
    assert core.hello_error(E.ConnectionLost("gone")) is core.last_error
    other = ValueError("x")
    assert core.hello_error(other) is other
    assert core.end_reason("closed") == "closed (after AUTH_FAILED: bad token)"


def test_broker_ping_is_answered_with_its_rid():
    core = ClientCore("me")
    [(kind, data, wait)] = feed(core, {"op": "ping", "rid": 41})
    assert kind is WRITE and frames_of(data) == [{"op": "pong", "rid": 41}]
    assert wait is False   # skipped while another thread writes: the reader never waits behind it


# --- producers --------------------------------------------------------------------------------

def test_producer_open_send_and_receipts():
    core = ClientCore("me")
    _, producer = open_(core, "producer", {"op": "producer_ok", "producer": 5, "topic": "/a/b",
                                           "dispatch": "reliable"})
    assert (producer.id, producer.name, producer.dispatch) == (5, "producer-5", "reliable")
    assert core.producers() == [producer]
    batches = []
    for i in range(7):                                 # max_batch 3: two full batches, one filling
        batch, index, ready, lingering = producer._add(*producer._record(f"m{i}", None, None))
        assert lingering == (index == 0)
        batches.extend(ready)
    assert [len(b.records) for b in batches] == [3, 3] and producer._outstanding == 7
    data = core.send_request(producer, batches[0])
    [send] = frames_of(data)
    assert send["op"] == "send" and send["producer"] == 5
    assert send["msgs"] == [{"payload": b"m0"}, {"payload": b"m1"}, {"payload": b"m2"}]
    [event] = feed(core, {"op": "receipt", "rid": send["rid"], "first": 10, "count": 3})
    assert event == (RECEIPT, producer, batches[0], {"op": "receipt", "rid": send["rid"], "first": 10,
                                                     "count": 3}, None)
    dispatch([event], IO())
    assert producer.calls == [("receipt", True)] and producer._outstanding == 4
    assert [batches[0].offset(i) for i in range(3)] == [10, 11, 12]
    assert producer._settle(batches[0], error=E.ConnectionLost("late")) is False   # settled once


def test_a_receipt_with_the_wrong_count_fails_the_batch():
    core = ClientCore("me")
    _, producer = open_(core, "producer", {"op": "producer_ok", "producer": 1})
    batch, *_ = producer._add(*producer._record(b"x", None, None))
    assert producer._settle(batch, {"op": "receipt", "first": 0, "count": 2}) is True
    with pytest.raises(E.BrokerError, match="receipt counts 2 messages"):
        batch.offset(0)


def test_a_send_error_settles_the_batch_with_it():
    core = ClientCore("me")
    _, producer = open_(core, "producer", {"op": "producer_ok", "producer": 1})
    batch, *_ = producer._add(*producer._record(b"x", "k", {"a": "b"}))
    rid = frames_of(core.send_request(producer, batch))[0]["rid"]
    [(kind, _, _, reply, error)] = feed(core, {"op": "error", "rid": rid, "code": "UNKNOWN_PRODUCER"})
    assert kind is RECEIPT and reply is None and isinstance(error, E.UnknownProducer)


def test_a_message_too_large_for_max_frame_is_refused_before_it_is_counted():
    core = ClientCore("me")
    core.welcomed({"max_frame": 4096})
    _, producer = open_(core, "producer", {"op": "producer_ok", "producer": 1})
    with pytest.raises(E.BadRequest, match="larger than"):
        producer._record(b"x" * 4096, None, None)
    assert producer._outstanding == 0


def test_producer_closed_by_the_broker():
    core = ClientCore("me")
    _, producer = open_(core, "producer", {"op": "producer_ok", "producer": 3})
    events = feed(core, {"op": "closed", "producer": 3, "reason": "topic_deleted"})
    assert events == [(CLOSED, producer, "topic_deleted")]
    assert core.producers() == []                        # detached: later pushes are dropped
    dispatch(events, IO())
    assert producer.closed_reason == "topic_deleted"
    assert producer.calls == [("ended", E.ProducerClosed, "topic_deleted"), ("fail_unsent",)]
    assert isinstance(producer._end_error(), E.ProducerClosed)


# --- consumers --------------------------------------------------------------------------------

def push_bytes(consumer_id, n, start=0):
    blobs = [encode_record(start + i, f"m{start + i}".encode(), "k" if i % 2 else None,
                           {"a": "b"} if i % 3 == 0 else {}, 1000 + i, "prod", i % 2)
             for i in range(n)]
    return b"".join(encode_message_frames(consumer_id, blobs))


def test_message_pushes_become_messages_even_when_split_anywhere():
    core = ClientCore("me")
    _, consumer = open_(core, "consumer", {"op": "subscribed", "consumer": 9, "dispatch": "reliable"})
    data = push_bytes(9, 5) + push_bytes(9, 3, start=5)
    events = []
    for i in range(len(data)):                           # one byte at a time
        events += core.receive_data(data[i:i + 1], float(i))
    assert [e[0] for e in events] == [MESSAGES, MESSAGES] and core.last_received == len(data) - 1
    messages = events[0][2] + events[1][2]
    assert [m.id for m in messages] == list(range(8))
    first = messages[1]
    assert first == Message(id=1, payload=b"m1", key="k", attrs={}, time=1001, producer="prod",
                            redeliveries=1, consumer_id=9)
    assert (first.text, messages[0].key, messages[0].attrs) == ("m1", None, {"a": "b"})
    with pytest.raises(AttributeError):
        first.id = 2


def test_records_without_the_optional_fields_get_defaults():
    core = ClientCore("me")
    _, consumer = open_(core, "consumer", {"op": "subscribed", "consumer": 9})
    [(_, _, [msg])] = feed(core, {"op": "message", "consumer": 9, "msgs": [{"id": 4, "payload": b"p"}]})
    assert msg == Message(4, b"p", None, {}, 0, "", 0, 9)
    assert Message(1, b"x").attrs == {} and Message(1, b"x").attrs is not Message(2, b"x").attrs


def test_pushes_that_overtake_the_subscribed_reply_are_held_then_handed_over_first():
    core = ClientCore("me")
    frame, make = open_consumer(core, Consumer, "/a/b", "s", "failover", "c", 4, True, None,
                                {"start": "earliest"})
    assert frame["start"] == "earliest" and frame["consumer"] == "c"
    rid, _ = core.request(frame, "w", make, "consumer")
    assert feed(core, {"op": "active", "consumer": 9, "active": False}) == []    # held
    events = feed(core, {"op": "subscribed", "rid": rid, "consumer": 9})
    consumer = events[-1][2]
    assert events == [(ACTIVE, consumer, False), (REPLY, "w", consumer, None)]
    assert feed(core, {"op": "active", "consumer": 77, "active": True}) == []   # none opening: dropped
    seen = []
    consumer.on_active = lambda c, active: seen.append((c.id, active))
    dispatch(feed(core, {"op": "active", "consumer": 9, "active": True}), IO())
    assert consumer.active is True and seen == [(9, True)]


def test_a_failed_open_settles_the_waiter_with_the_error_and_holds_nothing():
    core = ClientCore("me")
    rid, _ = core.request({"op": "subscribe"}, "w", lambda reply: 1 / 0, "consumer")
    [(_, _, _, error)] = feed(core, {"op": "subscribed", "rid": rid, "consumer": 9})
    assert isinstance(error, ZeroDivisionError)
    assert feed(core, {"op": "message", "consumer": 9, "msgs": []}) == []


def test_consumer_closed_by_the_broker_gets_no_more_messages():
    core = ClientCore("me")
    _, consumer = open_(core, "consumer", {"op": "subscribed", "consumer": 9})
    closed = encode_frame({"op": "closed", "consumer": 9, "reason": "replaced"})
    events = core.receive_data(push_bytes(9, 2) + closed + push_bytes(9, 2), 0.0)
    assert [e[0] for e in events] == [MESSAGES, CLOSED]
    dispatch(events, IO())
    assert consumer.closed_reason == "replaced" and consumer.calls[-1] == ("ended", "replaced")
    with pytest.raises(E.ConsumerClosed):
        raise consumer._end_error()


def test_receiver_queue_credits_and_settle_frames():
    core = ClientCore("me")
    _, consumer = open_(core, "consumer", {"op": "subscribed", "consumer": 9})   # receiver_queue 4
    assert [consumer._grant() for _ in range(6)] == [0, 2, 0, 2, 0, 2]
    assert consumer._flow_frame(2) == {"op": "flow", "consumer": 9, "credits": 2}
    msg = Message(7, b"x")
    assert consumer._ack_frame("ack", [msg, 8]) == {"op": "ack", "consumer": 9, "ids": [7, 8]}
    assert consumer._ack_frame("nack", 7, delay_ms=50) == {"op": "nack", "consumer": 9, "ids": [7],
                                                              "delay_ms": 50}
    assert consumer._ack_frame("ack", []) is None
    consumer._ended("closed")
    assert consumer._grant() == 0                        # no credits once closed
    assert frames_of(core.one_way(consumer._flow_frame(1))) == [consumer._flow_frame(1)]


def test_acks_and_nacks_of_many_ids_are_split_into_frames_within_max_frame():
    """One frame over max_frame made the broker close the whole connection (FRAME_TOO_LARGE)."""
    core = ClientCore("me")
    _, consumer = open_(core, "consumer", {"op": "subscribed", "consumer": 9})
    for ids in (list(range(5000)), [2**40 + i for i in range(3000)], [Message(i, b"x") for i in range(900)]):
        frames = consumer._ack_frames("nack", ids, 1024, delay_ms=2**31)
        assert len(frames) > 1
        for frame in frames:
            assert len(encode_frame(dict(frame, rid=2**40))) - 4 <= 1024
            assert {k: v for k, v in frame.items() if k != "ids"} == {"op": "nack", "consumer": 9,
                                                                       "delay_ms": 2**31}
        assert [i for f in frames for i in f["ids"]] == [getattr(i, "id", i) for i in ids]
    assert consumer._ack_frames("ack", [1, 2], 8192) == [{"op": "ack", "consumer": 9, "ids": [1, 2]}]
    assert consumer._ack_frames("ack", [], 8192) == []


# --- opens nobody waits for any more ------------------------------------------------------------

@pytest.mark.parametrize("kind, reply", [("producer", {"op": "producer_ok", "producer": 5}),
                                         ("consumer", {"op": "subscribed", "consumer": 6})])
def test_an_abandoned_open_is_closed_again_when_its_reply_comes(kind, reply):
    """A producer()/subscribe() that timed out: what the broker opened for it is closed, or an
    exclusive producer or subscription would stay taken with nobody holding it."""
    core = ClientCore("me")
    if kind == "producer":
        frame, make = open_producer(core, Producer, "/a/b", "p", None, "exclusive", 2, 3, 10)
    else:
        frame, make = open_consumer(core, Consumer, "/a/b", "s", "exclusive", "c", 4, True, None, {})
    rid, _ = core.request(frame, "w", make, kind)
    assert core.forget(rid) is True                            # timed out: still pending
    [(event, data)] = feed(core, dict(reply, rid=rid))
    [close] = frames_of(data)
    assert event == WRITE and close == {"op": f"close_{kind}", kind: reply[kind], "rid": close["rid"]}
    assert feed(core, {"op": "ok", "rid": close["rid"]}) == []           # nobody waits for it
    assert core.producers() == [] and core._attachments.by_id == {}
    rid, _ = core.request(frame, "w", make, kind)              # refused: nothing to close
    core.forget(rid)
    assert feed(core, {"op": "error", "rid": rid, "code": "PRODUCER_BUSY", "message": "x"}) == []
    rid, _ = core.request(frame, "w", make, kind)              # lost first: nothing to settle
    core.forget(rid)
    assert core.connection_lost(E.ConnectionLost("gone")) == []
    assert core.forget(rid) is False


def test_forget_tells_whether_the_reply_was_taken_already():
    core = ClientCore("me")
    rid, _ = core.request({"op": "topics"}, "w")
    assert feed(core, {"op": "topics", "rid": rid, "topics": []})[0][:2] == (REPLY, "w")
    assert core.forget(rid) is False      # the waiter is settled: the I/O layer uses its outcome


def test_a_reopen_refused_as_busy_is_retried_until_the_old_connection_must_be_gone():
    """After a network cut the broker holds the old connection until its heartbeat finds it dead
    (two beats, checked up to one late): an exclusive producer or consumer reopened meanwhile is
    refused as busy, and retried with the reconnect's backoff until then (and a margin)."""
    from actorbroker.transport.client.core import BUSY_RETRY_MARGIN_S, Reconnect
    core = ClientCore("me")
    core.welcomed({"heartbeat_ms": 1000})
    _, producer = open_(core, "producer", {"op": "producer_ok", "producer": 1})
    plan = Reconnect([("h", 1)], initial=0.1, maximum=0.5)
    busy = E.error_for("PRODUCER_BUSY", "taken")
    assert [core.reopen_retry(producer, busy, 100.0 + t, plan) for t in (0, 0.1, 0.3, 0.7, 1.2)] == \
        [0.1, 0.2, 0.4, 0.5, 0.5]
    deadline = 100.0 + 3 + BUSY_RETRY_MARGIN_S
    assert core.reopen_retry(producer, busy, deadline - 0.2, plan) == pytest.approx(0.2)  # not past it
    assert core.reopen_retry(producer, busy, deadline, plan) is None                   # given up
    assert core.reopen_failed(producer, busy) is True                                  # ends as today
    assert core.reopen_retry(producer, busy, 200.0, plan) == 0.1     # a later refusal: afresh
    core.reopened(producer)
    consumer_busy = E.error_for("CONSUMER_BUSY", "taken")
    assert core.reopen_retry(producer, consumer_busy, 300.0, plan) == 0.1
    core.restart(301.0)                                              # a new connection: afresh
    assert core.reopen_retry(producer, consumer_busy, 301.0, plan) == 0.1
    for final in (E.error_for("TYPE_MISMATCH", "no"), E.ConnectionLost("again")):
        assert core.reopen_retry(producer, final, 302.0, plan) is None


# --- heartbeat, broken input, the end ---------------------------------------------------------

def test_heartbeat_pings_when_quiet_and_gives_up_after_three_beats():
    core = ClientCore("me")
    core.welcomed({"heartbeat_ms": 1000})
    core.last_received = 100.0
    assert core.heartbeat(100.5) == (None, None)
    ping, dead = core.heartbeat(101.0)
    [frame] = frames_of(ping)
    assert frame["op"] == "ping" and dead is None
    assert core.heartbeat(101.5) == (None, None)         # one ping per beat
    assert feed(core, {"op": "pong", "rid": frame["rid"]}, now=101.6) == []   # nobody waits for it
    assert core.heartbeat(102.0) == (None, None)         # heard from the broker at 101.6
    ping, dead = core.heartbeat(104.7)
    assert ping is None and isinstance(dead, E.ConnectionLost) and "3.1s" in str(dead)


def test_a_bad_frame_breaks_the_connection_after_the_frames_before_it():
    core = ClientCore("me")
    rid, _ = core.request({"op": "topics"}, "w")
    good = encode_frame({"op": "topics", "rid": rid, "topics": []})
    bad = b"\x00\x00\x00\x01\xc1"                         # not msgpack
    events = core.receive_data(good + bad, 0.0)
    assert events[0] == (REPLY, "w", {"op": "topics", "rid": rid, "topics": []}, None)
    assert events[1][0] is BROKEN and isinstance(events[1][1], E.ProtocolError)
    io = IO()
    with pytest.raises(E.ProtocolError):
        dispatch(events, io)
    assert io.settled == [events[0][1:]]                  # the reply before it was carried out


def test_connection_lost_fails_everything_once():
    core = ClientCore("me")
    _, producer = open_(core, "producer", {"op": "producer_ok", "producer": 1})
    _, consumer = open_(core, "consumer", {"op": "subscribed", "consumer": 2})
    core.request({"op": "topics"}, "w")
    batch, *_ = producer._add(*producer._record(b"x", None, None))
    core.send_request(producer, batch)
    core.heartbeat(100.0)                                  # a ping in flight: nobody to tell
    error = E.ConnectionLost("connection closed by the broker")
    events = core.connection_lost(error)
    kinds = [(e[0], e[1]) for e in events]
    assert kinds == [(REPLY, "w"), (RECEIPT, producer), (LOST, producer), (LOST, consumer)]
    assert isinstance(events[0][3], E.ConnectionLost) and isinstance(events[1][4], E.ConnectionLost)
    assert events[2][2:] == (error, False)
    assert core.connection_lost(E.ConnectionLost("again")) is None
    with pytest.raises(E.ConnectionLost):
        core.request({"op": "topics"}, "w")
    with pytest.raises(E.ConnectionLost):
        core.one_way({"op": "flow"})
    dispatch(events[2:], IO())
    assert producer.closed_reason == "connection_lost"
    assert consumer.closed_reason == "connection_lost"
    assert isinstance(consumer._end_error(), E.ConnectionLost)


def test_closing_a_producer_or_consumer_the_broker_no_longer_has_is_no_error():
    core = ClientCore("me")
    _, producer = open_(core, "producer", {"op": "producer_ok", "producer": 1})
    _, consumer = open_(core, "consumer", {"op": "subscribed", "consumer": 2})
    rid, data = core.close_request(producer, "p")
    assert frames_of(data) == [{"op": "close_producer", "producer": 1, "rid": rid}]
    assert core.producers() == []                              # detached at once
    gone = {"op": "error", "rid": rid, "code": "UNKNOWN_PRODUCER"}
    assert feed(core, gone) == [(REPLY, "p", None, None)]
    rid, _ = core.close_request(consumer, "c")
    [(_, _, _, error)] = feed(core, {"op": "error", "rid": rid, "code": "INTERNAL", "message": "bug"})
    assert isinstance(error, E.Internal)                        # other errors are told
    rid, _ = core.close_request(consumer, "c2")
    assert core.connection_lost(E.ConnectionLost("x")) == [(REPLY, "c2", None, None)]
    assert core.close_request(consumer, "c3") is None           # the connection closed it


def test_closing_client_marks_the_end_as_client_closed():
    core = ClientCore("me")
    _, consumer = open_(core, "consumer", {"op": "subscribed", "consumer": 2})
    core.closing = True
    dispatch(core.connection_lost(E.ConnectionLost("client closed")), IO())
    assert consumer.closed_reason == "client_closed"
    assert isinstance(consumer._end_error(), E.ConsumerClosed)


def test_send_frames_pack_like_the_protocol_says():
    core = ClientCore("me")
    _, producer = open_(core, "producer", {"op": "producer_ok", "producer": 1})
    batch = Batch()
    batch.add(*producer._record("é", "k", {"x": "y"}))
    body = core.send_request(producer, batch)[4:]
    assert msgpack.unpackb(body)["msgs"] == [{"payload": "é".encode(), "key": "k", "attrs": {"x": "y"}}]


def test_an_on_active_callback_that_raises_is_logged_and_the_events_after_it_still_happen(caplog):
    """The reply to the subscribe came after the `active` push in one read: the callback's
    exception left the reply unsettled and abandoned the connection."""
    core = ClientCore("me")
    frame, make = open_consumer(core, Consumer, "/a/b", "s", "failover", "c", 4, True,
                                lambda consumer, active: 1 / 0, {})
    rid, _ = core.request(frame, "w", make, "consumer")
    io = IO()
    with caplog.at_level(logging.ERROR, logger="actorbroker.client"):
        dispatch(feed(core, {"op": "active", "consumer": 9, "active": True},
                      {"op": "subscribed", "rid": rid, "consumer": 9}), io)
    [(waiter, consumer, error)] = io.settled
    assert waiter == "w" and error is None and consumer.active is True
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)


def test_a_reopen_lost_with_its_connection_keeps_the_object_once():
    """The loss put the (attached) consumer among the detached ones, then its reopen's failure did
    again: the next connection subscribed it twice, and the second replaced the first."""
    core = ClientCore("me")
    _, consumer = open_(core, "consumer", {"op": "subscribed", "consumer": 9})
    core.connection_lost(E.ConnectionLost("gone"), keep=True)
    assert core.detached == [consumer]
    assert core.reopen_failed(consumer, E.ConnectionLost("gone again")) is False
    assert core.take_detached() == [consumer]


def test_a_client_that_reconnects_reopens_what_a_dead_broker_process_closed():
    """`closed` with topic_lost, subscription_lost or node_lost (a broker process died, a node was
    lost): a client that reconnects keeps the producer or consumer and opens it again; any other
    reason (or a client that does not reconnect) ends it, as before."""
    core = ClientCore("me")
    _, producer = open_(core, "producer", {"op": "producer_ok", "producer": 1})
    assert feed(core, {"op": "closed", "producer": 1, "reason": "topic_lost"}) == [(CLOSED, producer, "topic_lost")]

    core = ClientCore("me")
    core.reopens = True
    _, producer = open_(core, "producer", {"op": "producer_ok", "producer": 1})
    _, consumer = open_(core, "consumer", {"op": "subscribed", "consumer": 2})
    _, other = open_(core, "consumer", {"op": "subscribed", "consumer": 3})
    events = feed(core, {"op": "closed", "producer": 1, "reason": "topic_lost"},
                  {"op": "closed", "consumer": 2, "reason": "subscription_lost"},
                  {"op": "closed", "consumer": 3, "reason": "unsubscribed"})
    assert events == [(REOPEN, producer, "topic_lost"), (REOPEN, consumer, "subscription_lost"),
                      (CLOSED, other, "unsubscribed")]
    io = IO()
    dispatch(events, io)
    assert io.reopening == [producer, consumer] and other.closed_reason == "unsubscribed"
    assert producer.closed_reason is None and consumer.closed_reason is None
    assert core.take_detached() == [producer, consumer]
    # the topic's restart is waited for (INTERNAL, TOPIC_UNAVAILABLE) as a busy refusal is
    from actorbroker.transport.client.core import Reconnect
    plan = Reconnect([("h", 1)], initial=0.1)
    assert [core.reopen_retry(producer, E.error_for(code, "again"), 10.0, plan)
            for code in ("INTERNAL", "TOPIC_UNAVAILABLE")] == [0.1, 0.2]
    # reopened: the new id is the broker's; refused for good: it ends with the reason it was closed for
    assert core.reopened(producer) is None
    refused = E.error_for("NOT_AUTHORIZED", "no")
    assert core.reopen_failed(consumer, refused) is True
    end_unopened(consumer, core.reopen_reason(consumer), refused)
    assert consumer.closed_reason == "subscription_lost"


def test_a_producer_or_consumer_closed_by_the_application_while_it_is_reopened_stays_closed():
    core = ClientCore("me")
    core.reopens = True
    _, consumer = open_(core, "consumer", {"op": "subscribed", "consumer": 2})
    _, kept = open_(core, "consumer", {"op": "subscribed", "consumer": 4})
    feed(core, {"op": "closed", "consumer": 2, "reason": "topic_lost"},
         {"op": "closed", "consumer": 4, "reason": "topic_lost"})
    kept._ended("closed")                 # closed before its reopen was sent: not sent at all
    assert core.take_detached() == [consumer]
    rid, _ = core.reopen_request(consumer, "w")
    consumer._ended("closed")             # closed while its reopen was on its way: closed again
    dispatch(feed(core, {"op": "subscribed", "rid": rid, "consumer": 7}), IO())
    [close] = frames_of(core.reopened(consumer))
    assert (close["op"], close["consumer"]) == ("close_consumer", 7)


def test_payloads_are_bytes_str_or_buffers():
    from actorbroker.transport.client.core import record_for
    assert record_for(bytearray(b"ab"))[0]["payload"] == b"ab"
    assert record_for(memoryview(b"cd"), key="k")[0]["payload"] == b"cd"
    for wrong in (3, [1, 2], None, 2.5, {"x": 1}):
        with pytest.raises(TypeError):
            record_for(wrong)
