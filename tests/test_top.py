"""`actorbroker top` against a real broker: the `broker_stats` op it shows, one `--once` view, and
the live view driven as a user would, in a terminal (tmux: new-session, capture-pane, send-keys q)."""
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid

import pytest

from actorbroker.transport.client import Client
from tests.util import ROOT, wait_for

TOP = [sys.executable, "-m", "actorbroker.scripts.cli", "top"]


def traffic(broker, topic):
    """A producer and a failover subscription of two consumers (fo-a active) on `topic`."""
    client = Client(broker.host, broker.port, name="top-test")
    active = client.subscribe(topic, "fo", "failover", "fo-a")
    client.subscribe(topic, "fo", "failover", "fo-b")
    producer = client.producer(topic)
    return client, producer, active


def test_broker_stats_counts_connections_processes_and_memory(start_broker, topic):
    broker = start_broker()
    with Client(broker.host, broker.port) as admin, Client(broker.host, broker.port) as other:
        other.producer(topic)
        stats = wait_for(admin.broker_stats, lambda s: s["connections"] == 2)
        assert stats["topics"] == 1
        assert stats["processes"] >= 6          # admin, logger, root, listener, shards, the topic
        assert stats["memory_bytes"] > 10 * 1024 * 1024
        assert sum(stats["shards"]) == 2


def test_broker_stats_needs_admin(start_broker, tmp_path):
    auth = tmp_path / "auth.json"
    auth.write_text('{"p": ["produce:/a/*"]}')
    broker = start_broker("--auth-file", str(auth))
    with Client(broker.host, broker.port, token="p") as client:
        with pytest.raises(Exception) as info:
            client.broker_stats()
        assert getattr(info.value, "code", None) == "NOT_AUTHORIZED"


def test_top_once_shows_topics_subscriptions_and_the_active_consumer(start_broker, topic):
    broker = start_broker()
    client, producer, _ = traffic(broker, topic)
    with client:
        for i in range(5):
            producer.send(f"m{i}")
        producer.flush()
        out = subprocess.run(TOP + ["--url", f"{broker.host}:{broker.port}", "--once", "--interval", "0.2"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if k != "COLUMNS"})
    assert out.returncode == 0, out.stderr
    assert "…" not in out.stdout, out.stdout   # piped: nothing cut to 80 columns
    row = next(line for line in out.stdout.splitlines() if topic in line and "fo" not in line)
    assert "non_reliable" in row and " 5 " in f" {row} "
    assert "*fo-a" in out.stdout and "fo-b" in out.stdout and "*fo-b" not in out.stdout
    assert re.search(r"connections \d+ +processes \d+ +memory [\d.,]+ MiB", out.stdout)


class Tmux:
    """A tmux server of our own (its own socket), killed at the end."""

    def __init__(self):
        self.socket = f"actorbroker-test-{uuid.uuid4().hex[:10]}"

    def __call__(self, *args):
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout

    def screen(self):
        return self("capture-pane", "-p", "-t", "top")

    def close(self):
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_top_live_view_in_a_terminal_refreshes_and_quits_on_q(start_broker, topic):
    broker = start_broker()
    client, producer, active = traffic(broker, topic)
    stop = threading.Event()

    def produce():   # a steady flow, so that the rates are not zero
        while not stop.is_set():
            producer.send("x")
            producer.flush()

    def consume():   # the active consumer takes them, until it is closed
        for msg in active:
            active.ack(msg)

    sender = threading.Thread(target=produce, daemon=True)
    receiver = threading.Thread(target=consume, daemon=True)
    tmux = Tmux()
    command = " ".join(TOP + ["--url", f"{broker.host}:{broker.port}", "--interval", "0.5"])
    try:
        sender.start()
        receiver.start()
        tmux("new-session", "-d", "-s", "top", "-x", "200", "-y", "40",
             # pytest exports COLUMNS/LINES of its own terminal: the pane's size must count
             f"unset COLUMNS LINES; cd {ROOT} && {command}; echo top-exited-$?; read line")

        def row_of(screen):
            return next((line for line in screen.splitlines() if topic in line and "fo" not in line), "")

        def rates(screen):
            """in/s and out/s of the topic's row (0 while not shown yet)."""
            cells = [c.strip().replace(",", "") for c in row_of(screen).split("│")]
            return tuple(int(c) if c.isdigit() else 0 for c in cells[3:5]) if len(cells) > 5 else (0, 0)

        screen = wait_for(tmux.screen, lambda s: min(rates(s)) > 0, timeout=30, interval=0.2)
        assert "non_reliable" in row_of(screen)
        assert "*fo-a" in screen and "fo-b" in screen
        assert re.search(r"connections [1-9]\d* +processes \d+ +memory", screen)
        assert "q quits" in screen
        # the view follows the broker: close the active consumer, fo-b takes over
        active.close()
        wait_for(tmux.screen, lambda s: "*fo-b" in s and "fo-a" not in s, timeout=30, interval=0.2)
        receiver.join(10)
        tmux("send-keys", "-t", "top", "q")
        wait_for(tmux.screen, lambda s: "top-exited-0" in s, timeout=30, interval=0.2)
    finally:
        stop.set()
        sender.join(10)
        tmux.close()
        client.close()
