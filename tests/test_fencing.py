"""Fencing of a reliable topic's log in a shared folder (storage/fencing.py): pure storage logic
on real files, no broker. The cluster tests check the same through real nodes."""
import os

import pytest

from actorbroker.storage import fencing
from actorbroker.storage.topic_store import TopicStore, stored_topics, topic_dir

SEGMENT = 64 * 1024 * 1024


def open_store(folder, node, live=None, segment_bytes=SEGMENT):
    return TopicStore(str(folder), "/orders", "reliable", segment_bytes, (node, node + "-1", live))


def append(store, *payloads):
    first = store.log.append([(None, p) for p in payloads])
    store.log.sync()
    return first


def records(store):
    return [tail for _, _, _, tail in store.log.read(0, 10_000)]


def test_claims_follow_the_rules(tmp_path):
    a = open_store(tmp_path, "a")
    assert a.epoch.number == 1 and a.fenced_by() is None
    a.close()
    # the holder may reopen (a restart); another node only if the holder is not live to it
    a = open_store(tmp_path, "a")
    assert a.epoch.number == 2
    with pytest.raises(fencing.Fenced) as refused:
        open_store(tmp_path, "b", live=("a", "b", "c"))
    assert refused.value.owner == "a"
    with pytest.raises(fencing.Fenced):
        open_store(tmp_path, "b", live=None)   # None: every other node counts as live
    b = open_store(tmp_path, "b", live=("b", "c"))   # a is lost: b takes the log over
    assert b.epoch.number == 3
    assert a.fenced_by() == "b"
    assert fencing.latest_owner(topic_dir(str(tmp_path), "/orders")) == "b"


def test_two_claims_of_one_epoch_one_wins(tmp_path):
    """Both read epoch 1 as the latest; the second to create epoch 2's claim is fenced."""
    open_store(tmp_path, "a").close()
    directory = topic_dir(str(tmp_path), "/orders")
    won = fencing.claim(directory, "b", "b-1", live=("b", "c"))
    real_claimed = fencing.claimed
    fencing.claimed = lambda d: [1]   # c read the epochs before b's claim landed
    try:
        with pytest.raises(fencing.Fenced) as lost:
            fencing.claim(directory, "c", "c-1", live=("b", "c"))
    finally:
        fencing.claimed = real_claimed
    assert lost.value.owner == "b" and won.number == 2


@pytest.mark.parametrize("roll", [False, True])
def test_a_fenced_writer_adds_nothing_to_the_log(tmp_path, roll):
    """What the old owner wrote before the takeover's claim is in the log; what it writes after
    (even in a new segment of its own) is not, and it can tell it is fenced before it would
    send the receipt."""
    seg = 200 if roll else SEGMENT
    a = open_store(tmp_path, "a", segment_bytes=seg)
    append(a, b"a0", b"a1", b"a2")
    assert a.fenced_by() is None           # the check a makes after the fsync: receipted
    b = open_store(tmp_path, "b", live=("b",), segment_bytes=seg)
    assert records(b) == [b"a0", b"a1", b"a2"]
    append(a, b"late-1", b"late-2" * 50)   # a, stopped meanwhile, writes on...
    append(a, b"late-3")
    assert a.fenced_by() == "b"            # ... and its check refuses those sends
    append(b, b"b0", b"b1")
    assert records(b) == [b"a0", b"a1", b"a2", b"b0", b"b1"]
    a.close()
    b.close()
    # whoever opens it next reads the same log
    c = open_store(tmp_path, "c", live=("c",))
    assert records(c) == [b"a0", b"a1", b"a2", b"b0", b"b1"]
    assert c.log.next_offset == 5
    append(c, b"c0")
    assert records(c)[-1] == b"c0" and c.log.read(5, 10)[0][0] == 5


def test_a_claim_that_never_wrote_hides_nothing(tmp_path):
    """A node that died between its claim and its first write leaves an epoch without a start:
    the next owner still reads everything before it."""
    a = open_store(tmp_path, "a")
    append(a, b"x", b"y")
    directory = topic_dir(str(tmp_path), "/orders")
    fencing.claim(directory, "b", "b-1", live=("b",))   # b claimed, then died
    c = open_store(tmp_path, "c", live=("c",))
    assert records(c) == [b"x", b"y"] and c.epoch.number == 3


def test_stored_topics_of_one_node(tmp_path):
    open_store(tmp_path, "a").close()
    other = TopicStore(str(tmp_path), "/b-topic", "reliable", SEGMENT, ("b", "b-1", None))
    other.close()
    assert stored_topics(str(tmp_path), owner="a") == [("/orders", "reliable")]
    assert stored_topics(str(tmp_path), owner="b") == [("/b-topic", "reliable")]
    assert sorted(stored_topics(str(tmp_path))) == [("/b-topic", "reliable"), ("/orders", "reliable")]
    open_store(tmp_path, "b", live=("b",)).close()   # b took /orders over
    assert stored_topics(str(tmp_path), owner="a") == []


def test_a_log_without_epochs_is_read_whole(tmp_path):
    """A topic written by a single broker (no shared folder) and later opened in one: its
    segments (epoch 0) are part of the log."""
    plain = TopicStore(str(tmp_path), "/orders", "reliable", SEGMENT)
    append(plain, b"old")
    plain.close()
    shared = open_store(tmp_path, "a")
    assert records(shared) == [b"old"]
    append(shared, b"new")
    assert records(shared) == [b"old", b"new"]
    assert sorted(os.listdir(os.path.join(shared.directory, "log")))[0] == f"{0:020d}.log"
