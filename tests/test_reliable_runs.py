"""A real broker on a reliable log holding both batch formats (storage/segment_log.py): a data
directory written by an earlier version (batches of records) is served and appended to (batches
of runs), and a catch-up read keeps runs whole or cuts them around what was acknowledged."""

from actorbroker.storage.topic_store import TopicStore
from actorbroker.transport.codec import encode_record_tail
from tests.test_reliable import assert_nothing_more, connect, producer, receive, send, subscribe


def receive_full(conn, count, timeout=10):
    """The next `count` messages: (id, payload, key, attrs, producer, redeliveries)."""
    return receive(conn, count, timeout, ("id", "payload", "key", "attrs", "producer", "redeliveries"))


def test_a_log_of_the_earlier_format_is_served_and_appended_to(start_broker, tmp_path, topic):
    data = tmp_path / "data"
    store = TopicStore(str(data), topic, "reliable", 1 << 20)   # as an earlier version wrote it
    store.log.append([(None, encode_record_tail(b"old0", None, {}, "p-old")),
                      (None, encode_record_tail(b"old1", None, {}, "p-old")),
                      ("k", encode_record_tail(b"old2", "k", {"h": "v"}, "p-old"))], 1_700_000_000_000)
    store.log.append([(None, encode_record_tail(b"old3", None, {}, "p-old", 1))], 1_700_000_000_001)
    store.close()
    b = start_broker(data_dir=data)
    conn = connect(b)
    pid = producer(conn, topic)
    assert send(conn, pid, [b"new4", b"new5", b"new6"])["first"] == 4
    conn.request({"op": "send", "producer": pid, "msgs": [{"payload": b"new7", "key": "q", "attrs": {"a": "b"}}]})
    want = [(0, b"old0", None, {}, "p-old", 0), (1, b"old1", None, {}, "p-old", 0),
            (2, b"old2", "k", {"h": "v"}, "p-old", 0), (3, b"old3", None, {}, "p-old", 1)]
    reader = connect(b)
    subscribe(reader, topic, "audit", "exclusive", start="earliest")
    got = receive_full(reader, 8)
    assert got[:4] == want
    assert [(o, p, k, a) for o, p, k, a, _, _ in got[4:]] == [
        (4, b"new4", None, {}), (5, b"new5", None, {}), (6, b"new6", None, {}), (7, b"new7", "q", {"a": "b"})]
    assert_nothing_more(reader)
    b.stop()
    # both formats in one log, read back after a restart, from the middle of a run too
    b2 = start_broker(data_dir=data)
    again = connect(b2)
    subscribe(again, topic, "late", "exclusive", start="earliest")
    assert receive_full(again, 8) == got
    b2.stop()
    store = TopicStore(str(data), topic, "reliable", 1 << 20)
    assert [r[:2] for r in store.log.read_runs(5, 100)] == [[5, 2], [7, 1]]
    store.close()


def test_a_restart_skips_the_acknowledged_records_inside_a_run(start_broker, tmp_path, topic):
    data = tmp_path / "data"
    b = start_broker(data_dir=data)
    conn = connect(b)
    consumer = subscribe(conn, topic, "s", "exclusive")
    pid = producer(conn, topic)
    send(conn, pid, [f"m{i}".encode() for i in range(8)])      # one run of 8 on disk
    send(conn, pid, [f"n{i}".encode() for i in range(3)])      # and one of 3
    got = receive_full(conn, 11)
    assert [g[0] for g in got] == list(range(11))
    # acked out of order: the cursor keeps floor 0 and the set {1, 3, 6}
    conn.request({"op": "ack", "consumer": consumer, "ids": [1, 3, 6]})
    b.stop()
    b2 = start_broker(data_dir=data)
    again = connect(b2)
    subscribe(again, topic, "s", "exclusive")
    back = receive_full(again, 8)
    assert [(o, p) for o, p, _, _, _, _ in back] == [
        (0, b"m0"), (2, b"m2"), (4, b"m4"), (5, b"m5"), (7, b"m7"), (8, b"n0"), (9, b"n1"), (10, b"n2")]
    assert_nothing_more(again)
