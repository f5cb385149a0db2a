"""Fixtures: a real broker (`actorbroker serve` in a subprocess, multiproc Thespian system) on free
ports, stopped at the end with a check that none of its processes is left behind."""
import uuid

import pytest

from actorbroker.scripts import proctree
from actorbroker.scripts.local_broker import LocalBroker


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """A broker shared by the tests that only need defaults (each uses its own topics)."""
    b = LocalBroker(tmp_path_factory.mktemp("broker"))
    yield b
    left = b.stop()
    assert not left, f"broker processes left behind: {left}"


@pytest.fixture
def start_broker(tmp_path):
    """Start a broker with options of the test's own; stopped (and checked) after the test."""
    started = []

    def start(*options, data_dir=None, prefix=()):
        b = LocalBroker(data_dir or tmp_path / f"broker{len(started)}", *options, prefix=prefix)
        started.append(b)
        return b

    yield start
    for b in started:
        if b.proc.poll() is None or any(proctree.alive(p) for p in b.processes()):
            left = b.stop()
            assert not left, f"broker processes left behind: {left}"


@pytest.fixture
def topic():
    """A topic name no other test uses."""
    return f"/test/t-{uuid.uuid4().hex[:12]}"
