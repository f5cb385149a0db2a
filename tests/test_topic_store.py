"""A reliable topic's directory: names of 255 bytes fit (digest file names), and the hex-named
layout written by earlier versions still opens, with its log and cursors (issue 10, case 6)."""
import json
import os

from actorbroker.storage.topic_store import TopicStore, digest, stored_topics, topic_dir, topics_root
from tests.test_reliable import connect, producer, receive, send, subscribe

LONG_TOPIC = "/" + "n" * 100 + "/" + "t" * 153
LONG_SUB = "s" * 255


def test_names_of_255_bytes_fit_on_disk(tmp_path):
    store = TopicStore(str(tmp_path), LONG_TOPIC, "reliable", 1 << 20)
    store.log.append([(None, b"tail")], 1)
    store.save_cursor(LONG_SUB, {"floor": 1, "acked": []})
    store.close()
    assert os.path.basename(store.directory) == digest(LONG_TOPIC) and len(digest(LONG_TOPIC)) == 64
    again = TopicStore(str(tmp_path), LONG_TOPIC, "reliable", 1 << 20)
    assert again.cursors()[LONG_SUB]["floor"] == 1 and again.log.next_offset == 1
    assert stored_topics(str(tmp_path)) == [(LONG_TOPIC, "reliable")]
    again.close()


def to_legacy_layout(data_dir, topic, subscriptions):
    """Rename a topic's files as earlier versions named them (hex of the name); the contents of
    the files were the same."""
    legacy = os.path.join(topics_root(data_dir), topic.encode().hex())
    os.rename(topic_dir(data_dir, topic), legacy)
    for sub in subscriptions:
        os.rename(os.path.join(legacy, "cursors", digest(sub) + ".json"),
                  os.path.join(legacy, "cursors", sub.encode().hex() + ".json"))
    return legacy


def test_the_hex_layout_is_renamed_when_the_topic_opens(tmp_path):
    data = str(tmp_path)
    store = TopicStore(data, "/old/topic", "reliable", 1 << 20)
    store.log.append([(None, b"a"), (None, b"b")], 1)
    store.save_cursor("sub", {"floor": 1, "acked": []})
    store.close()
    legacy = to_legacy_layout(data, "/old/topic", ["sub"])
    assert stored_topics(data) == [("/old/topic", "reliable")]   # found by its topic.json
    store = TopicStore(data, "/old/topic", "reliable", 1 << 20)
    assert not os.path.exists(legacy) and store.directory == topic_dir(data, "/old/topic")
    assert os.listdir(store.cursor_dir) == [digest("sub") + ".json"]
    assert store.cursors()["sub"]["floor"] == 1 and store.log.next_offset == 2
    store.save_cursor("sub", {"floor": 2, "acked": []})
    assert store.cursors()["sub"]["floor"] == 2   # one cursor file, the new one
    store.close()


def test_a_broker_opens_a_data_directory_of_the_hex_layout(start_broker, tmp_path, topic):
    data = tmp_path / "data"
    b = start_broker(data_dir=data)
    conn = connect(b)
    consumer = subscribe(conn, topic, "s", "exclusive", credits=10)
    send(conn, producer(conn, topic), [b"m0", b"m1", b"m2"])
    got = receive(conn, 3)
    assert conn.request({"op": "ack", "consumer": consumer, "ids": [got[0][0]]})["op"] == "ok"
    b.stop()
    to_legacy_layout(str(data), topic, ["s"])
    b2 = start_broker(data_dir=data)
    again = connect(b2)
    assert again.request({"op": "stats", "topic": topic})["subscriptions"][0]["cursor"] == 1
    subscribe(again, topic, "s", "exclusive", credits=10)
    assert [p for _, p, _ in receive(again, 2)] == [b"m1", b"m2"]
    assert json.loads((data / "topics" / digest(topic) / "topic.json").read_text())["name"] == topic


def cut_segments_at_batch(log_dir, batches):
    """Keep the first `batches` batches of the (single) segment, as a machine crash under --fsync
    interval may (acc-disk t4)."""
    from actorbroker.storage.segment_log import HEADER
    (path,) = [os.path.join(log_dir, n) for n in os.listdir(log_dir)]
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    for _ in range(batches):
        pos += HEADER.size + HEADER.unpack_from(data, pos)[0]
    os.truncate(path, pos)


def test_a_log_that_lost_its_tail_below_a_cursor_continues_above_every_cursor(tmp_path, caplog):
    data = str(tmp_path)
    store = TopicStore(data, "/t", "reliable", 1 << 20)
    for i in range(10):
        store.log.append([(None, b"m%d" % (i * 10 + j)) for j in range(10)], 1)
    store.save_cursor("all-acked", {"floor": 100, "acked": []})
    store.save_cursor("behind", {"floor": 20, "acked": [120]})   # 120 is not even in the log: known all the same
    store.save_cursor("lagging", {"floor": 10, "acked": []})
    store.close()
    cut_segments_at_batch(os.path.join(store.directory, "log"), 5)
    with caplog.at_level("WARNING", logger="actorbroker.storage"):
        again = TopicStore(data, "/t", "reliable", 1 << 20)
    assert again.log.next_offset == 121 and again.gap == (50, 121)
    assert any("/t" in r.getMessage() and "50..120" in r.getMessage() for r in caplog.records)
    assert again.log.append([(None, b"new")], 2) == 121   # never an offset a cursor counts as acknowledged
    assert again.log.lost_between(10, 122) == [(50, 121)]   # a lagging subscription moves past the gap
    assert [r[0] for r in again.log.read(45)] == [45, 46, 47, 48, 49, 121]
    again.close()
    third = TopicStore(data, "/t", "reliable", 1 << 20)   # and it stays so
    assert third.log.next_offset == 122 and third.gap is None and third.log.lost_between(0, 122) == [(50, 121)]
    third.close()


def test_a_log_whose_every_segment_is_gone_starts_above_the_cursors(tmp_path):
    data = str(tmp_path)
    store = TopicStore(data, "/t", "reliable", 1 << 20)
    store.log.append([(None, b"a"), (None, b"b"), (None, b"c")], 1)
    store.save_cursor("s", {"floor": 3, "acked": []})
    store.close()
    log_dir = os.path.join(store.directory, "log")
    for name in os.listdir(log_dir):
        os.unlink(os.path.join(log_dir, name))
    again = TopicStore(data, "/t", "reliable", 1 << 20)
    assert again.log.first_offset == 3 and again.log.append([(None, b"d")], 2) == 3
    again.close()
