"""Helpers for tests: waiting for a condition the broker makes observable, client processes."""
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wait_for(probe, condition, timeout=10.0, interval=0.02):
    """Call probe() until condition(result) holds; returns the last result (fails on timeout).

    For states the broker exposes only by query (stats); events that arrive as frames are awaited
    as frames instead."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if condition(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last: {result!r}")
        time.sleep(interval)


def stats(client, topic):
    return client.stats(topic)


def consumers_of(stats_frame, subscription):
    for sub in stats_frame["subscriptions"]:
        if sub["name"] == subscription:
            return sub["consumers"]
    return []


class ClientProcess:
    """A consumer in its own OS process, so that it can be killed or frozen for real."""

    def __init__(self, broker, topic, subscription, sub_type, name, heartbeat_ms=None, hold=False):
        """hold: a reliable consumer that never acknowledges what it receives."""
        args = [sys.executable, str(ROOT / "tests" / "client_proc.py"), broker.host, str(broker.port),
                topic, subscription, sub_type, name, str(heartbeat_ms or 0), "hold" if hold else "ack"]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)))
        line = self.proc.stdout.readline().decode()
        assert line.startswith("ready"), f"client process failed: {line!r}"
        self.consumer_id = int(line.split()[1])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
