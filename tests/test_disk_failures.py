"""Reliable topics on a disk that refuses writes (full, files not writable): the requests are
answered at once with OVERLOADED naming the cause (not INTERNAL, not after the 30 s deadline),
nothing receipted is lost, and the topic works again once the cause is gone, without a restart.

A full disk is a tmpfs of a few MiB of the test's own (root only: skipped otherwise); a file the
broker cannot write is `chattr +i` (root, a file system that has it)."""
import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from actorbroker.scripts.local_broker import LocalBroker
from actorbroker.storage.topic_store import topic_dir
from actorbroker.transport import errors as E
from actorbroker.transport.client import Client
from tests.util import wait_for

# well below --request-deadline-ms (30 s): a request the topic never answered fails with TimeoutError
ANSWER_WITHIN_S = 5


def _umount(path):
    for _ in range(50):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.2)   # busy a moment longer (a process of the broker still ending): again
    subprocess.run(["umount", "-l", str(path)], capture_output=True)   # never left mounted


@pytest.fixture
def small_disk(tmp_path):
    """A broker whose data directory is a 4 MiB tmpfs: (broker, mount point). The broker is
    stopped (none of its processes left) before the tmpfs is unmounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount not permitted here: {done.stderr.strip()}")
    broker = None
    try:
        broker = LocalBroker(mount / "data")
        yield broker, mount
    finally:
        try:
            if broker is not None:
                left = broker.stop()
                assert not left, f"broker processes left behind: {left}"
        finally:
            _umount(mount)


def fill(mount):
    """Write a file until the disk is full; returns its path (unlink it to free the space)."""
    path = mount / "filler"
    with open(path, "wb", buffering=0) as f:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return path


def refused(call):
    """The BrokerError `call` raised (a TimeoutError, an answer never given, fails the test)."""
    with pytest.raises(E.BrokerError) as info:
        call()
    return info.value


def test_a_new_reliable_topic_on_a_full_disk_is_refused_then_works(small_disk, topic):
    broker, mount = small_disk
    filler = fill(mount)
    try:
        with Client(*broker.address) as client:
            error = refused(lambda: client.producer(topic, dispatch="reliable", timeout=ANSWER_WITHIN_S))
            assert error.code == E.OVERLOADED, error
            assert "disk full" in error.message and topic in error.message, error
            # the topic is not wedged: it answers, with the same cause
            error = refused(lambda: client.stats(topic, timeout=ANSWER_WITHIN_S))
            assert error.code == E.OVERLOADED and "disk full" in error.message, error
            # other topics are served
            assert client.producer(topic + "-nr").send_sync(b"z", timeout=ANSWER_WITHIN_S) == 0
    finally:
        os.unlink(filler)
    # the space is back: the same request works, without a restart
    with Client(*broker.address) as client:
        producer = client.producer(topic, dispatch="reliable", timeout=ANSWER_WITHIN_S)
        offsets = [producer.send_sync(b"m%d" % i, timeout=ANSWER_WITHIN_S) for i in range(3)]
        assert offsets == [0, 1, 2]
        consumer = client.subscribe(topic, "s", dispatch="reliable", start="earliest",
                                    timeout=ANSWER_WITHIN_S)
        assert [consumer.receive(10).payload for _ in range(3)] == [b"m0", b"m1", b"m2"]
        assert client.stats(topic, timeout=ANSWER_WITHIN_S)["msgs_in"] == 3


def test_sends_and_acks_on_a_full_disk_are_overloaded_and_nothing_receipted_is_lost(small_disk, topic):
    broker, mount = small_disk
    receipted = {}   # offset -> payload
    with Client(*broker.address) as client:
        consumer = client.subscribe(topic, "dur", dispatch="reliable", start="earliest")
        producer = client.producer(topic, dispatch="reliable")
        for i in range(20):
            payload = b"before-%d" % i
            receipted[producer.send_sync(payload)] = payload
        first = consumer.receive(10)
        filler = fill(mount)
        try:
            # an ack that asks for an answer: its cursor cannot be saved
            error = refused(lambda: consumer.ack(first, sync=True, timeout=ANSWER_WITHIN_S))
            assert error.code == E.OVERLOADED and "disk full" in error.message, error
            # sends: what still fits in pages already allocated is receipted, then refused
            error = None
            for i in range(5000):
                payload = b"full-%d-" % i + b"x" * 200
                try:
                    receipted[producer.send_sync(payload, timeout=ANSWER_WITHIN_S)] = payload
                except E.BrokerError as exc:
                    error = exc
                    break
            assert error is not None, "every send was receipted on a full disk"
            assert error.code == E.OVERLOADED and "disk full" in error.message, error
        finally:
            os.unlink(filler)
        # the space is back: the same producer and consumer go on
        for i in range(5):
            payload = b"after-%d" % i
            receipted[producer.send_sync(payload, timeout=ANSWER_WITHIN_S)] = payload
        consumer.ack(first, sync=True, timeout=ANSWER_WITHIN_S)
        got = {first.id: first.payload}
        while not receipted.keys() <= got.keys():   # a receipted message missing: TimeoutError
            message = consumer.receive(10)
            got[message.id] = message.payload
        assert {offset: got[offset] for offset in receipted} == receipted
        assert sorted(receipted) == list(range(len(receipted)))   # no offset lost or reused
    # and on disk: read back after a restart, from the start
    left = broker.stop()
    assert not left, f"broker processes left behind: {left}"
    again = LocalBroker(mount / "data")
    try:
        with Client(*again.address) as client:
            consumer = client.subscribe(topic, "check", dispatch="reliable", start="earliest")
            back = [consumer.receive(10) for _ in range(len(receipted))]
            assert {m.id: m.payload for m in back} == receipted
    finally:
        left = again.stop()
        assert not left, f"broker processes left behind: {left}"


def test_a_log_that_cannot_be_opened_at_start_is_refused_then_works(start_broker, tmp_path, topic):
    if os.geteuid() != 0:
        pytest.skip("chattr +i needs root")
    data = tmp_path / "data"
    broker = start_broker(data_dir=data)
    with Client(*broker.address) as client:
        client.subscribe(topic, "dur", dispatch="reliable", start="earliest")
        producer = client.producer(topic)
        assert [producer.send_sync(b"m%d" % i) for i in range(10)] == list(range(10))
    assert not broker.stop()
    segment = sorted((Path(topic_dir(str(data), topic)) / "log").glob("*.log"))[-1]
    done = subprocess.run(["chattr", "+i", str(segment)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i not possible here: {done.stderr.strip()}")
    try:
        broker = start_broker(data_dir=data)
        with Client(*broker.address) as client:
            # listed, and said in broker.log
            assert topic in [t["name"] for t in client.topics(timeout=ANSWER_WITHIN_S)]
            wait_for(lambda: (data / "broker.log").read_text(errors="replace"),
                     lambda text: f"ERROR actorbroker: topic {topic}: its log cannot be opened" in text)
            error = refused(lambda: client.subscribe(topic, "dur", dispatch="reliable",
                                                     timeout=ANSWER_WITHIN_S))
            assert error.code == E.OVERLOADED and "not permitted" in error.message, error
            error = refused(lambda: client.producer(topic, timeout=ANSWER_WITHIN_S))
            assert error.code == E.OVERLOADED, error
            assert client.producer(topic + "-other", dispatch="reliable").send_sync(b"x") == 0
            subprocess.run(["chattr", "-i", str(segment)], check=True)
            # writable again: the durable subscription is back, with every message unacknowledged
            consumer = client.subscribe(topic, "dur", dispatch="reliable", timeout=ANSWER_WITHIN_S)
            assert [consumer.receive(10).payload for _ in range(10)] == [b"m%d" % i for i in range(10)]
            assert client.producer(topic, timeout=ANSWER_WITHIN_S).send_sync(b"new") == 10
    finally:
        subprocess.run(["chattr", "-i", str(segment)], capture_output=True)
