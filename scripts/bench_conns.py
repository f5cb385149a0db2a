"""The scale scenario's client: one process that opens --conns connections to the broker
concurrently, with raw non-blocking sockets (selectors) and protocol frames
(actorbroker.transport.codec), not the blocking client:

    python -m actorbroker.scripts.bench_conns --url HOST:PORT --topic T --conns K

Each connection: connect, `hello` -> `welcome`, `subscribe` (all to one shared subscription
"idle", or with --distinct each to an exclusive subscription of its own) -> `subscribed`, then
`flow` with 10 credits. It is "set up" once `subscribed` is in. At most --window connections are
being set up at a time (so that the broker's accept queue is not overrun into SYN retries).

Prints one JSON line when every connection is set up or when opening had to stop (--deadline,
no progress for --stall seconds, or too many errors): opened, elapsed_s (first connect to last
`subscribed`), conn_s (opened / elapsed_s), failed, errors (counts by kind), stopped (why it
stopped early, or null). Then holds the connections, answering the broker's pings, until SIGTERM
or SIGKILL (the bench kills it) or --hold seconds; prints {"event": "lost", "count"} whenever
the broker closes some of them meanwhile.

Every wait is bounded: one connection's set-up by --conn-timeout, all of it by --deadline.
The soft RLIMIT_NOFILE is raised to the hard limit first; more connections than that allows fail
at once with a note.
"""
import argparse
import errno
import os
import resource
import selectors
import signal
import socket
import sys
import time
from collections import Counter

from actorbroker.scripts.bench_common import emit
from actorbroker.transport.client import parse_url
from actorbroker.transport.codec import FrameDecoder, encode_frame

CREDITS = 10
HEARTBEAT_MS = 60000   # the protocol's largest: the broker pings an idle connection only once a minute


def raise_nofile():
    """Soft RLIMIT_NOFILE up to the hard limit; returns (soft, hard) as they are then."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class Conn:
    __slots__ = ("i", "sock", "state", "decoder", "out", "t0", "consumer", "events")

    def __init__(self, i, sock):
        self.i = i
        self.sock = sock
        self.state = "connect"     # connect -> hello -> subscribe -> ready
        self.decoder = FrameDecoder()
        self.out = bytearray()
        self.t0 = time.monotonic()
        self.consumer = None
        self.events = 0


class Opener:
    def __init__(self, args):
        self.args = args
        self.host, self.port = parse_url(args.url)
        self.sel = selectors.DefaultSelector()
        self.next_i = 0
        self.setting_up = {}       # fd -> Conn, not yet subscribed
        self.ready = {}            # fd -> Conn, subscribed
        self.errors = Counter()
        self.failed = 0
        self.lost = 0
        self.last_progress = time.monotonic()

    # --- frames ---------------------------------------------------------------------------------

    def subscribe_frame(self, c):
        a = self.args
        if a.distinct:   # a subscription of its own
            sub, typ = f"{a.prefix}{c.i}", "exclusive"
        else:            # all on one subscription (shared by default): the connection's own cost only
            sub, typ = "idle", a.type
        return {"op": "subscribe", "rid": 2, "topic": a.topic, "subscription": sub, "type": typ,
                "consumer": f"idle-{a.prefix}{c.i}"}

    def write(self, c, frame):
        c.out += encode_frame(frame)
        self.flush(c)

    def flush(self, c):
        while c.out:
            try:
                n = c.sock.send(c.out)
            except BlockingIOError:
                break
            del c.out[:n]
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
        if want != c.events:
            self.sel.modify(c.sock, want, c)
            c.events = want

    # --- connections ----------------------------------------------------------------------------

    def start_one(self):
        i = self.next_i
        self.next_i += 1
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            self.fail(None, f"socket(): {errno.errorcode.get(exc.errno, exc)}")
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = Conn(i, sock)
        err = sock.connect_ex((self.host, self.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.fail(None, f"connect: {errno.errorcode.get(err, err)}")
            return
        self.setting_up[sock.fileno()] = c
        c.events = selectors.EVENT_WRITE
        self.sel.register(sock, c.events, c)

    def fail(self, c, kind):
        self.errors[kind] += 1
        self.failed += 1
        if c is not None:
            self.drop(c)

    def drop(self, c):
        fd = c.sock.fileno()
        self.setting_up.pop(fd, None)
        self.ready.pop(fd, None)
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    def on_event(self, c, mask):
        if c.state == "connect":
            if not mask & selectors.EVENT_WRITE:
                return
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(c, f"connect: {errno.errorcode.get(err, err)}")
                return
            c.state = "hello"
            c.events = 0
            self.write(c, {"op": "hello", "rid": 1, "version": 1, "client": f"bench-idle-{c.i}",
                           "heartbeat_ms": HEARTBEAT_MS})
            return
        if mask & selectors.EVENT_WRITE:
            try:
                self.flush(c)
            except OSError as exc:
                self.closed(c, f"send: {errno.errorcode.get(exc.errno, exc)}")
                return
        if mask & selectors.EVENT_READ:
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                self.closed(c, f"recv: {errno.errorcode.get(exc.errno, exc)}")
                return
            if not data:
                self.closed(c, f"closed by the broker during {c.state}")
                return
            c.decoder.feed(data)
            try:
                for frame in c.decoder:
                    self.on_frame(c, frame)
                    if c.sock.fileno() < 0:
                        return
            except Exception as exc:   # noqa: BLE001 - a bad frame ends this connection only
                self.closed(c, f"bad frame: {type(exc).__name__}")

    def closed(self, c, kind):
        if c.state == "ready":
            self.lost += 1
            self.drop(c)
        else:
            self.fail(c, kind)

    def on_frame(self, c, frame):
        op = frame.get("op")
        if op == "ping":
            self.write(c, {"op": "pong", "rid": frame.get("rid")})
        elif op == "error":
            self.closed(c, f"error {frame.get('code')} during {c.state}")
        elif c.state == "hello" and op == "welcome":
            c.state = "subscribe"
            self.write(c, self.subscribe_frame(c))
        elif c.state == "subscribe" and op == "subscribed":
            c.consumer = frame.get("consumer")
            c.state = "ready"
            self.write(c, {"op": "flow", "consumer": c.consumer, "credits": CREDITS})
            fd = c.sock.fileno()
            self.ready[fd] = self.setting_up.pop(fd)
            self.last_progress = time.monotonic()
            self.last_ready = self.last_progress
        # anything else (a push: active, closed, message) is not expected on an idle consumer

    def poll(self, timeout):
        for key, mask in self.sel.select(timeout):
            c = key.data
            if c.sock.fileno() >= 0:
                self.on_event(c, mask)

    # --- the run --------------------------------------------------------------------------------

    def open_all(self):
        a = self.args
        self.start = self.last_ready = time.monotonic()
        deadline = self.start + a.deadline
        stopped = None
        while len(self.ready) < a.conns:
            now = time.monotonic()
            if now > deadline:
                stopped = f"deadline: {len(self.ready)}/{a.conns} set up within {a.deadline:g}s"
                break
            if now - self.last_progress > a.stall:
                stopped = f"stalled: no connection set up in {a.stall:g}s ({len(self.ready)}/{a.conns} were)"
                break
            if self.failed > a.max_errors:
                stopped = f"too many errors ({self.failed})"
                break
            while len(self.setting_up) < a.window and self.next_i < a.conns and self.failed <= a.max_errors:
                self.start_one()
            if not self.setting_up and self.next_i >= a.conns:
                stopped = f"{self.failed} connection(s) failed"
                break
            self.poll(0.05)
            for c in [c for c in self.setting_up.values() if now - c.t0 > a.conn_timeout]:
                self.fail(c, f"timeout ({a.conn_timeout:g}s) during {c.state}")
        elapsed = self.last_ready - self.start
        for c in list(self.setting_up.values()):   # whatever is still half set up is given up
            self.fail(c, f"not set up when opening stopped ({c.state})")
        return {"role": "idle", "opened": len(self.ready), "wanted": a.conns, "elapsed_s": elapsed,
                "conn_s": len(self.ready) / elapsed if elapsed > 0 else 0.0, "failed": self.failed,
                "errors": dict(self.errors.most_common(8)), "stopped": stopped}

    def hold(self):
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
        end = time.monotonic() + self.args.hold
        reported = 0
        while not stop and time.monotonic() < end:
            self.poll(0.2)
            if self.lost != reported:
                reported = self.lost
                emit({"event": "lost", "count": self.lost})


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m actorbroker.scripts.bench_conns")
    p.add_argument("--url", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--conns", type=int, default=10)
    p.add_argument("--distinct", action="store_true", help="a subscription per connection")
    p.add_argument("--type", default="shared", choices=("shared", "key_shared", "failover"),
                   help="the type of the one subscription they all join (without --distinct)")
    p.add_argument("--prefix", default="i-", help="consumer (and --distinct subscription) names")
    p.add_argument("--window", type=int, default=128, help="connections being set up at a time")
    p.add_argument("--conn-timeout", type=float, default=60.0, help="one connection's set-up, at most")
    p.add_argument("--deadline", type=float, default=300.0, help="opening all of them, at most")
    p.add_argument("--stall", type=float, default=30.0, help="give up after this long without progress")
    p.add_argument("--max-errors", type=int, default=None, help="stop opening after this many failures "
                                                                 "(default: 10 + conns/20)")
    p.add_argument("--hold", type=float, default=600.0, help="hold them this long at most")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.max_errors is None:
        args.max_errors = 10 + args.conns // 20
    soft, hard = raise_nofile()
    if args.conns + 32 > soft:
        emit({"role": "idle", "opened": 0, "wanted": args.conns, "elapsed_s": 0.0, "conn_s": 0.0,
              "failed": 0, "errors": {},
              "stopped": f"RLIMIT_NOFILE is {soft} (hard {hard}): too low for {args.conns} connections"})
        return 1
    opener = Opener(args)
    emit(opener.open_all() | {"nofile": soft})
    opener.hold()
    os._exit(0)   # the kernel closes every socket at once


if __name__ == "__main__":
    sys.exit(main())
