"""`serve --log-format json`: broker.log is one JSON object per line, and every line about a
connection, consumer or topic carries its id as a field of its own."""
import json
import re

from actorbroker.transport.client import Client
from tests.wire import RawConnection

ABOUT = {"connection": re.compile(r"\bconnection (\d+)"), "topic": re.compile(r"\btopic (/\S+)"),
         "consumer": re.compile(r"\bconsumer (\d+) replaces")}


def test_every_line_is_json_with_the_ids_it_is_about(start_broker, topic):
    b = start_broker("--log-format", "json", "--log-level", "DEBUG")
    with Client(*b.address) as first, Client(*b.address) as second:
        first.subscribe(topic, "s", "failover", "same")
        replacing = second.subscribe(topic, "s", "failover", "same")   # takes the name over
        second.producer(topic).send_sync(b"m")
    bad = RawConnection(*b.address)
    bad.hello()
    bad.send_raw(b"\x00\x00\x00\x02\xc1\xc1")   # not msgpack: BAD_FRAME, the connection closes
    assert bad.expect_closed()
    assert not b.stop()
    lines = [json.loads(line) for line in (b.data_dir / "broker.log").read_text().splitlines()]
    assert lines and all({"time", "level", "pid", "message"} <= set(line) for line in lines)
    found = {field: 0 for field in ABOUT}
    for line in lines:
        for field, pattern in ABOUT.items():
            match = pattern.search(line["message"])
            if match:
                found[field] += 1
                expected = match.group(1) if field == "topic" else int(match.group(1))
                assert line.get(field) == expected, line
    assert all(found.values()), found
    assert any(line.get("consumer") == replacing.id for line in lines)
    assert any("BAD_FRAME" in line["message"] and "connection" in line for line in lines)
