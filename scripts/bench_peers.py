"""The other systems of `actorbroker bench --compare nats,redis`: their servers, started on free
loopback ports and stopped by PID (with PR_SET_PDEATHSIG, so a dying bench takes them along).

    nats-server -a 127.0.0.1 -p PORT                       core pub/sub, no JetStream
    redis-server --bind 127.0.0.1 --port PORT --save '' --appendonly no

The binaries come from Debian's packages `nats-server` and `redis-server` (found on PATH; Debian
puts nats-server in /usr/sbin); the Python clients from the `bench` extra
(pip install 'actorbroker[bench]': nats-py, redis, hiredis). A peer whose server or client is
missing is skipped with a note, not a failure.
"""
import functools
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time

from actorbroker.scripts.bench_common import term_with_parent

PEERS = ("nats", "redis")
BINARIES = {"nats": "nats-server", "redis": "redis-server"}
DEBIAN_PACKAGES = {"nats": "nats-server", "redis": "redis-server"}
CLIENT_MODULES = {"nats": ["nats"], "redis": ["redis", "hiredis"]}
CLIENT_DISTS = {"nats": ["nats-py"], "redis": ["redis", "hiredis"]}


def find_binary(peer):
    return shutil.which(BINARIES[peer])


def missing(peer):
    """Why this peer cannot run here (a sentence), or None."""
    if find_binary(peer) is None:
        return (f"{BINARIES[peer]} is not on PATH (Debian: apt-get install {DEBIAN_PACKAGES[peer]}, "
                f"which puts it in {'/usr/sbin' if peer == 'nats' else '/usr/bin'}); {peer} skipped")
    absent = [m for m in CLIENT_MODULES[peer] if importlib.util.find_spec(m) is None]
    if absent:
        return (f"Python module(s) {', '.join(absent)} missing (pip install 'actorbroker[bench]'); "
                f"{peer} skipped")
    return None


def versions(peer):
    """The server's and the client's versions, for the results."""
    out = {}
    try:
        text = subprocess.run([find_binary(peer), "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        first = text.splitlines()[0] if text else "?"
        # "nats-server: v2.9.10"; "Redis server v=7.0.15 sha=... malloc=..."
        out[BINARIES[peer]] = next((w[2:] if w.startswith("v=") else w for w in first.split()
                                    if w.startswith(("v=", "v")) and any(ch.isdigit() for ch in w)), first)
    except (OSError, subprocess.SubprocessError, TypeError):
        out[BINARIES[peer]] = "?"
    for dist in CLIENT_DISTS[peer]:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeerServer:
    """One nats-server or redis-server on 127.0.0.1:free port, its own process."""

    def __init__(self, peer, workdir, start_timeout=15):
        self.peer = peer
        binary = find_binary(peer)
        if binary is None:
            raise RuntimeError(f"{BINARIES[peer]} not found")
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{peer}-server.log"
        last = None
        for _ in range(3):   # the free port may be taken between bind and the server's bind: retry
            self.port = free_port()
            if peer == "nats":
                cmd = [binary, "-a", "127.0.0.1", "-p", str(self.port)]
            else:
                cmd = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                       "--appendonly", "no", "--dir", str(workdir)]
            self._log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT,
                                         preexec_fn=functools.partial(term_with_parent, os.getpid()))
            self.pid = self.proc.pid
            try:
                self._wait_ready(start_timeout)
                return
            except RuntimeError as exc:
                last = exc
                self.stop()
        raise last

    @property
    def url(self):
        return f"127.0.0.1:{self.port}"

    def _wait_ready(self, timeout):
        """Until the server answers on its port: NATS sends INFO on connect, Redis answers PING."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{BINARIES[self.peer]} exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.settimeout(2)
                    if self.peer == "redis":
                        s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"INFO" if self.peer == "nats" else b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{BINARIES[self.peer]} not answering on port {self.port} within {timeout}s: "
                           f"{self.log_tail()}")

    def log_tail(self):
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-3:])[-400:]

    def stop(self, timeout=5):
        """SIGTERM, then SIGKILL after `timeout`; returns True if the process is gone."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except OSError:
                    pass
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        self._log.close()
        return self.proc.poll() is not None
