"""The lifecycle events of a scenario: the `watch` step opens a connection of the runner's own that
sends the admin op `watch` (docs/protocol.md) and collects the broker's `event` pushes; the
`expect_events` step passes once the given events arrived in that order (other events may come
between them), within its time.

A broker that answers `watch` with UNKNOWN_OP cannot run such a scenario: it is skipped, with
that reason, rather than failed."""
import socket
import threading

from actorbroker.scripts.scenario.outcome import ScenarioSkipped, StepFailed
from actorbroker.transport.codec import FrameDecoder, encode_frame

DEFAULT_WITHIN = 10.0
CONNECT_TIMEOUT = 10.0


class Watcher:
    """One connection that watches; `events` grows as pushes arrive (under runner.cond)."""

    def __init__(self, runner, address, topics):
        self.runner = runner
        self.events = []
        self.cursor = 0           # events[:cursor] were matched by earlier expect_events
        self.lost = None
        self.sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT)
        self.decoder = FrameDecoder()
        self._call({"op": "hello", "rid": 1, "version": 1, "client": "scenario-watcher"})
        watch = {"op": "watch", "rid": 2}
        if topics is not None:
            watch["topics"] = topics
        reply = self._call(watch)
        if reply.get("op") == "error":
            self.sock.close()
            if reply.get("code") == "UNKNOWN_OP":
                raise ScenarioSkipped("the broker answers UNKNOWN_OP to `watch` (no lifecycle events)")
            raise StepFailed(f"watch refused: {reply.get('code')}: {reply.get('message')}")
        self.sock.settimeout(None)
        self.reader = threading.Thread(target=self._read, name="scenario-watcher", daemon=True)
        self.reader.start()

    def _frames(self):
        while True:
            for frame in self.decoder:
                yield frame
            data = self.sock.recv(65536)
            if not data:
                return
            self.decoder.feed(data)

    def _call(self, frame):
        """A request before the reader runs: its reply (events that come first are kept)."""
        self.sock.sendall(encode_frame(frame))
        for reply in self._frames():
            if reply.get("op") == "event":
                self.events.append(reply)
            elif reply.get("op") == "ping":
                self.sock.sendall(encode_frame({"op": "pong", "rid": reply.get("rid", 0)}))
            elif reply.get("rid") == frame["rid"]:
                return reply
        raise StepFailed("the broker closed the watcher's connection")

    def _read(self):
        cond = self.runner.cond
        try:
            for frame in self._frames():
                if frame.get("op") == "ping":
                    self.sock.sendall(encode_frame({"op": "pong", "rid": frame.get("rid", 0)}))
                elif frame.get("op") == "event":
                    with cond:
                        self.events.append(frame)
                        cond.notify_all()
            reason = "closed by the broker"
        except OSError as exc:
            reason = str(exc)
        with cond:
            self.lost = reason
            cond.notify_all()

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def start_watch(runner, s):
    runner.need_broker()
    if runner.watcher is not None:
        runner.watcher.close()
    runner.watcher = Watcher(runner, runner.broker.address, s.get("topics"))
    return f"watching {s.get('topics', '*')}"


def matches(event, wanted):
    return all(event.get(k) == v for k, v in wanted.items())


def match_in_order(events, wanted):
    """How many of `wanted` are found in `events` in order (a subsequence), and the index after
    the last event matched."""
    found, end = 0, 0
    for i, event in enumerate(events):
        if found < len(wanted) and matches(event, wanted[found]):
            found += 1
            end = i + 1
    return found, end


def _show(event):
    fields = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("op", "seq", "time_ms", "kind"))
    return f"#{event.get('seq')} {event.get('kind')} {fields}".rstrip()


def expect_events(runner, s):
    w = runner.watcher
    if w is None:
        raise StepFailed("no `watch` step ran before")
    wanted = s["events"]
    try:
        runner.wait_until(lambda: match_in_order(w.events[w.cursor:], wanted)[0] == len(wanted) or w.lost,
                          s.get("within", DEFAULT_WITHIN), f"{len(wanted)} events in order")
    except StepFailed as exc:
        with runner.cond:
            seen = w.events[w.cursor:]
            found, _ = match_in_order(seen, wanted)
        raise StepFailed(f"{exc} ({found} of {len(wanted)} matched in order)",
                         "expected (in order): " + "; ".join(str(e) for e in wanted) +
                         "\narrived:  " + ("; ".join(_show(e) for e in seen) or "nothing")) from None
    with runner.cond:
        found, end = match_in_order(w.events[w.cursor:], wanted)
        if found < len(wanted):
            raise StepFailed(f"the watcher's connection ended: {w.lost}")
        seqs = [e["seq"] for e in w.events[w.cursor:w.cursor + end]]
        w.cursor += end
    gaps = [b for a, b in zip(seqs, seqs[1:]) if b != a + 1]
    if gaps:
        raise StepFailed(f"events were dropped for the watcher (seq jumps to {gaps[0]})")
    return f"{len(wanted)} events in order, within {len(seqs)} arrived"
