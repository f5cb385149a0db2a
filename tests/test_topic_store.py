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
