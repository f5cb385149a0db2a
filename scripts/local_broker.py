"""A broker as a child process: `actorbroker serve` on free ports, stopped (or killed) leaving no
process behind. Part of the product because `actorbroker bench` and the scenario runner start
their own brokers; the tests use it the same way."""
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from actorbroker.scripts import proctree

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"listening on ([\d.]+):(\d+) \(admin port (\d+), admin pid (\d+)")
METRICS = re.compile(r"metrics on (http://\S+)")


def _term_with_parent():
    """In the child, before exec: SIGTERM it if whoever started it (a test run, the bench) dies,
    so that a killed test run does not leave a broker behind (serve then stops its actors)."""
    from actorbroker.actors.process import die_with_parent
    die_with_parent()


class LocalBroker:
    """One `actorbroker serve` and the actor system it started."""

    def __init__(self, data_dir, *options, prefix=()):
        """prefix: a command that execs serve in place (e.g. `ip netns exec NAME`): the pid stays."""
        self.data_dir = Path(data_dir).resolve()   # serve runs in the repo's folder: never relative to it
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.stderr = open(self.data_dir / "serve.stderr", "wb")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "actorbroker.scripts.cli", "serve", "--port", "0",
             "--data-dir", str(self.data_dir), *options],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=self.stderr, stdin=subprocess.DEVNULL,
            preexec_fn=_term_with_parent)
        line = self._read_line(timeout=60)
        match = READY.search(line)
        if not match:
            self.proc.kill()
            self.proc.wait()
            self.stderr.flush()
            try:   # serve's own complaint (a bad option, a port taken) is on its stderr
                said = (self.data_dir / "serve.stderr").read_text(errors="replace").strip().splitlines()[-5:]
            except OSError:
                said = []
            raise RuntimeError(f"broker did not start: {line.strip() or 'it printed nothing'}"
                               + "".join(f"\n  {text}" for text in said) + f"\n{self.log_tail()}".rstrip())
        self.host, self.port = match.group(1), int(match.group(2))
        self.admin_port, self.admin_pid = int(match.group(3)), int(match.group(4))
        metrics = METRICS.search(line)
        self.metrics_url = metrics.group(1) if metrics else None   # with serve --metrics-port

    def _read_line(self, timeout):
        deadline = time.monotonic() + timeout
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                break
            chunk = os.read(self.proc.stdout.fileno(), 1)
            if not chunk:
                break
            buf += chunk
        return buf.decode(errors="replace")

    @property
    def address(self):
        return self.host, self.port

    def processes(self):
        """Every process of the broker: serve, and the actor system's admin with its descendants."""
        return [self.proc.pid] + proctree.descendants(self.admin_pid)

    def log_tail(self, lines=40):
        try:
            text = (self.data_dir / "broker.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_gone(self, pids, timeout=30):
        """Wait until none of `pids` is alive; returns those still alive at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            left = [p for p in pids if proctree.alive(p)]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)

    def kill_all(self):
        """kill -9 of every broker process at once: serve, admin, logger and every actor. At once:
        all are stopped (SIGSTOP) before any is killed. Killed one by one, the first to die were
        seen dying by the others: a topic killed before the shards made them push `closed`
        (`topic_lost`) to its clients, which then had no consumer left to reopen on reconnecting
        (the scenario reconnect_across_restart, 1 run in 5 under load): a crash of part of the
        broker, not of all of it."""
        pids = self.processes()
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        self.proc.wait()
        return self.wait_gone(pids)

    def stop(self, sig=signal.SIGTERM):
        """Stop serve with `sig`; returns the broker processes still alive after the timeout."""
        pids = self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        left = self.wait_gone(pids)
        for pid in left:  # do not leak them into the next test; the test asserts on `left`
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.stderr.close()
        self.proc.stdout.close()
        return left
