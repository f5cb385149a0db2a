"""Pure logic of the Python clients (no sockets): batching arithmetic, receiver-queue credits,
push routing, frame builders, typed errors, CLI argument parsing."""
import argparse

import msgpack
import pytest

from actorbroker.transport import errors as E
from actorbroker.transport.client.core import (
    SEND_OVERHEAD, Attachments, Batcher, CreditWindow, ids_of, max_message_size,
    message_from_record, parse_address, parse_url, record_for, subscribe_frame)
from actorbroker.transport.codec import encode_frame


def test_record_size_is_an_upper_bound_of_the_packed_size():
    cases = [(b"", None, None), (b"x" * 70000, "k" * 255, None), ("héllo", "ключ", {"a": "b" * 40, "é": ""}),
             (b"p", None, {f"k{i}": "v" * i for i in range(50)})]
    for payload, key, attrs in cases:
        record, size = record_for(payload, key, attrs)
        assert size >= len(msgpack.packb(record, use_bin_type=True))
    assert record_for("é")[0] == {"payload": "é".encode()}


def test_batches_respect_max_batch_and_max_frame():
    max_frame = 10_000
    batcher = Batcher(max_frame, max_batch=5)
    sent = []
    for i in range(23):
        record, size = record_for(b"x" * (1500 if i % 3 else 10))
        batch, index, ready = batcher.add(record, size)
        assert batch.records[index] is record
        sent.extend(ready)
    sent.append(batcher.take())
    assert batcher.take() is None
    assert sum(len(b.records) for b in sent) == 23
    for batch in sent:
        assert 1 <= len(batch.records) <= 5
        frame = encode_frame({"op": "send", "rid": 2**40, "producer": 2**40, "msgs": batch.records})
        assert len(frame) <= batch.size <= max_frame


def test_a_record_larger_than_half_a_frame_goes_alone():
    batcher = Batcher(1000, max_batch=100)
    big, size = record_for(b"x" * 600)
    _, _, ready = batcher.add(big, size)
    assert ready == []
    _, _, ready = batcher.add(big, size)
    assert [len(b.records) for b in ready] == [1]


def test_max_message_size_leaves_room_for_the_send_and_push_envelopes():
    limit = max_message_size(4096, "producer-1")
    assert limit + SEND_OVERHEAD < 4096


def test_credit_window_never_exceeds_the_receiver_queue():
    window = CreditWindow(10)
    credited = window.initial()
    taken = 0
    for _ in range(1000):
        taken += 1
        credited += window.take()
        assert credited - taken <= 10          # outstanding: credited but not yet taken
    assert credited - taken >= 5               # and it refills once half is consumed


def test_credit_window_of_one_grants_each_message_back():
    window = CreditWindow(1)
    assert [window.take() for _ in range(3)] == [1, 1, 1]


def test_pushes_for_an_unknown_id_are_held_only_while_an_open_is_in_flight():
    att = Attachments()
    push = {"op": "message", "consumer": 7, "msgs": []}
    assert att.route(push) is None and att.held == {}          # nothing opening: dropped
    att.begin_open(1)
    assert att.route(push) is None
    target = object()
    assert att.attach("consumer", 7, target) == [push]
    assert att.route(push) is target
    att.route({"op": "closed", "consumer": 8, "reason": "x"})
    att.end_open(1)
    assert att.held == {}
    assert att.route({"op": "closed", "producer": 7, "reason": "x"}) is None   # ids are per kind


def test_subscribe_frame_includes_only_given_options():
    frame = subscribe_frame("/a/b", "s", "shared", "c", start="earliest", max_unacked=None)
    assert frame == {"op": "subscribe", "topic": "/a/b", "subscription": "s", "type": "shared",
                     "consumer": "c", "start": "earliest"}


def test_message_from_a_push_record():
    msg = message_from_record({"id": 3, "payload": b"hi", "key": None, "attrs": {}, "time": 5,
                               "producer": "p", "redeliveries": 1}, consumer_id=9)
    assert (msg.id, msg.text, msg.key, msg.redeliveries, msg.consumer_id) == (3, "hi", None, 1, 9)
    with pytest.raises(AttributeError):
        msg.id = 4
    assert ids_of(msg) == [3] and ids_of(5) == [5] and ids_of([msg, 4]) == [3, 4]


def test_parse_url():
    assert parse_url("example.org:7000") == ("example.org", 7000)
    assert parse_url("example.org") == ("example.org", 6650)
    assert parse_url(":7001") == ("127.0.0.1", 7001)
    assert parse_url("tcp://example.org:7000") == ("example.org", 7000)
    with pytest.raises(ValueError, match="TLS"):
        parse_url("tls://example.org:7000")     # a (host, port) caller would drop the TLS


def test_parse_address():
    assert parse_address("example.org:7000") == ("example.org", 7000, False)
    assert parse_address("tcp://example.org") == ("example.org", 6650, False)
    address = parse_address("tls://example.org:6651")
    assert (address.host, address.port, address.tls) == ("example.org", 6651, True)
    assert parse_address("tls://:6651") == ("127.0.0.1", 6651, True)
    with pytest.raises(ValueError, match="scheme"):
        parse_address("http://example.org:80")
    for port in (0, 65536, 6650 + 65536):   # the OS took 72186 as 6650: another broker, silently
        with pytest.raises(ValueError, match="1-65535"):
            parse_address(f"example.org:{port}")


def test_error_for_gives_one_class_per_code():
    codes = [v for k, v in vars(E).items() if k.isupper() and isinstance(v, str)]
    classes = {type(E.error_for(code, "m")) for code in codes}
    assert len(classes) == len(codes) and E.BrokerError not in classes
    err = E.error_for(E.CONSUMER_BUSY, "taken", rid=4)
    assert isinstance(err, E.ConsumerBusy) and isinstance(err, E.BrokerError)
    assert (err.code, err.message, err.rid) == ("CONSUMER_BUSY", "taken", 4)
    assert type(E.error_for("FUTURE_CODE", "")) is E.BrokerError


def test_cli_arguments():
    from actorbroker.scripts.client_commands import add_client_commands
    parser = argparse.ArgumentParser()
    add_client_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["produce", "/a/b", "-m", "hi", "-n", "3", "--attr", "k=v=w",
                              "--url", "h:1234"])
    assert (args.count, args.attr, args.url) == (3, [("k", "v=w")], ("h", 1234, False))
    args = parser.parse_args(["consume", "/a/b", "-s", "s", "--no-ack", "-t", "key_shared"])
    assert (args.ack, args.type, args.url) == (False, "key_shared", ("127.0.0.1", 6650, False))
    args = parser.parse_args(["topics", "--url", "tls://h:6651", "--tls-ca", "ca.pem"])
    assert (args.url, args.tls_ca, args.tls_no_check_hostname) == (("h", 6651, True), "ca.pem", False)
    with pytest.raises(SystemExit):
        parser.parse_args(["consume", "/a/b"])                 # -s is required


def test_the_sync_client_loads_neither_ssl_nor_asyncio_until_asked():
    """A process that only produces and consumes pays for what it uses: ssl and asyncio (MBs of a
    process's memory, and start-up time) come in only with TLS or the asyncio client."""
    import subprocess
    import sys
    code = ("import sys\n"
            "from actorbroker.transport.client import Client, TlsOptions\n"
            "TlsOptions(ca_file=None, check_hostname=False)\n"
            "print(' '.join(m for m in ('ssl', 'asyncio', 'logging', 'uuid') if m in sys.modules))\n"
            "from actorbroker.transport.client.tls import client_context\n"
            "client_context(TlsOptions())\n"
            "print('ssl' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    loaded, ssl_after = out.stdout.splitlines()
    assert "ssl" not in loaded.split() and "asyncio" not in loaded.split(), loaded
    assert ssl_after == "True"
