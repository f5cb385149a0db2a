"""The client agent: one actorbroker client in its own OS process, driven by the scenario runner.

    python -m scripts.scenario.agent HOST PORT NAME [HEARTBEAT_MS [RECONNECT_WITHIN_S]]

Commands arrive on stdin as JSON lines {"cmd", "rid", ...}; every command is answered on stdout
by {"rid", "ok": true, ...} or {"rid", "ok": false, "error", "code"}. Events are written on
stdout as they happen: {"event": "ready" | "message" | "active" | "closed" | "lost" | "fatal" |
"reconnected" | "receipted"}.
The agent uses the sync client (transport/client/) only, so killing or freezing it is killing or
freezing a real client. It exits when stdin closes (the runner went away) or on the `close` command."""
import ctypes
import json
import os
import select
import signal
import socket
import sys
import threading
import time

from actorbroker.transport.client import Client
from actorbroker.transport.client.core import Reconnect
from actorbroker.transport.codec import encode_frame
from actorbroker.transport.errors import BrokerError, ConnectionLost, ConsumerClosed, ProducerClosed

_out_lock = threading.Lock()


def emit(obj):
    line = json.dumps(obj, separators=(",", ":")) + "\n"
    with _out_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def die_with_parent():
    """SIGKILL this agent if the runner dies, so that no client outlives it, even a frozen one.

    PR_SET_PDEATHSIG fires when the thread that forked us ends: the runner starts every agent
    from one thread that lives as long as it does (runner._Spawner). A runner that died before
    this call (its pid, given in the environment, is no longer our parent) is not watched: exit.
    Besides, the agent exits when its stdin (a pipe from the runner) closes."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    runner = os.environ.get("ACTORBROKER_SCENARIO_RUNNER_PID")
    if os.getppid() == 1 or (runner and runner.isdigit() and os.getppid() != int(runner)):
        os._exit(1)


class ConsumerAgent:
    def __init__(self, handle, consumer, auto_ack, initial_credits):
        self.handle, self.consumer, self.auto_ack = handle, consumer, auto_ack
        self.granted = initial_credits          # every credit ever flowed to the broker
        self.received = 0
        self.unacked = []                        # ids received and not acknowledged (manual ack)
        self.lock = threading.Lock()
        self.receiving = threading.local()
        self.auto_grant = 0
        original_flow = consumer.flow

        def counted_flow(credits):
            with self.lock:
                self.granted += credits
                if getattr(self.receiving, "inside", False):
                    self.auto_grant += credits
            original_flow(credits)
        consumer.flow = counted_flow             # Consumer.receive grants through self.flow
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        c = self.consumer
        while True:
            self.receiving.inside = True
            self.auto_grant = 0
            try:
                msg = c.receive()
            except ConsumerClosed as exc:
                emit({"event": "closed", "consumer": self.handle, "reason": c.closed_reason or str(exc)})
                return
            except ConnectionLost as exc:
                emit({"event": "closed", "consumer": self.handle, "reason": "connection_lost",
                      "detail": str(exc)})
                return
            finally:
                self.receiving.inside = False
            with self.lock:
                self.received += 1
                granted_before = self.granted - self.auto_grant
                n = self.received
                if not self.auto_ack:
                    self.unacked.append(msg.id)
            emit({"event": "message", "consumer": self.handle, "id": msg.id,
                  "payload": msg.payload.decode("utf-8", "replace"), "key": msg.key,
                  "attrs": msg.attrs, "redeliveries": msg.redeliveries, "producer": msg.producer,
                  "n": n, "granted": granted_before})
            if self.auto_ack:
                try:
                    c.ack(msg)
                except ConnectionLost:
                    pass


class Agent:
    def __init__(self, host, port, name, heartbeat_ms, reconnect_within):
        """reconnect_within: seconds the client tries to reconnect after a loss (None: it does not)."""
        self.name = name
        reconnect = Reconnect([(host, port)], give_up_after=reconnect_within) if reconnect_within else None
        self.client = Client(host, port, heartbeat_ms=heartbeat_ms, name=name, reconnect=reconnect,
                             on_reconnect=lambda client: emit({"event": "reconnected"}))
        self.producers = {}
        self.consumers = {}
        self.watch = threading.Thread(target=self.watch_connection, daemon=True)
        self.watch.start()

    def watch_connection(self):
        self.client.wait_closed()   # a reconnecting client is closed only once it gives up
        if not self.client._closing:   # code: of the broker's fatal error before it closed, if any
            emit({"event": "lost", "reason": str(self.client._lost),
                  "code": getattr(self.client._core.last_error, "code", None)})

    # --- commands ------------------------------------------------------------------------------

    def cmd_producer(self, c):
        p = self.client.producer(c["topic"], name=c.get("name"), dispatch=c.get("dispatch"),
                                 access=c.get("access"))
        self.producers[c["handle"]] = p
        return {"producer": p.id, "dispatch": p.dispatch}

    def cmd_produce(self, c):
        p = self.producers[c["handle"]]
        keys, payload, attrs = c.get("keys"), c["payload"], c.get("attrs")
        rate, start = c.get("rate"), c.get("start", 0)
        futures, error, code = [], None, None
        reporter = ReceiptReporter(c["handle"], futures, c.get("within", 30))
        t0 = time.monotonic()
        for j in range(c["count"]):
            i = start + j
            if rate:
                delay = t0 + j / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            key = keys[i % len(keys)] if keys else None
            text = payload.replace("{i}", str(i)).replace("{key}", key or "")
            try:
                reporter.add((text, key, p.send(text, key=key, attrs=attrs)))
                if rate:
                    p._send_current()
            except Exception as exc:   # connection lost or producer closed: report what got a receipt
                error, code = f"{type(exc).__name__}: {exc}", code_of(exc)
                break
        try:
            p.flush(timeout=c.get("within", 30))
        except Exception as exc:
            error, code = error or f"{type(exc).__name__}: {exc}", code or code_of(exc)
        reporter.finish()
        sent = []
        for text, key, f in futures:
            try:
                sent.append([f.result(0), text, key])
            except Exception as exc:
                error, code = error or f"{type(exc).__name__}: {exc}", code or code_of(exc)
        return {"sent": sent, "attempted": len(futures), "error": error, "code": code}

    def cmd_subscribe(self, c):
        credits = c.get("credits", "auto")
        auto = credits == "auto"
        queue_size = c.get("receiver_queue", 1000)
        consumer = self.client.subscribe(
            c["topic"], c["subscription"], c["type"], c["consumer"], start=c.get("start"),
            dispatch=c.get("dispatch"), receiver_queue=queue_size, auto_credit=auto,
            max_unacked=c.get("max_unacked"), ack_timeout_ms=c.get("ack_timeout_ms"),
            max_redeliveries=c.get("max_redeliveries"), dead_letter_topic=c.get("dead_letter_topic"),
            on_active=lambda cons, active: emit({"event": "active", "consumer": c["handle"],
                                                  "active": active}))
        ca = ConsumerAgent(c["handle"], consumer, c.get("ack", "auto") == "auto",
                           queue_size if auto else 0)
        self.consumers[c["handle"]] = ca
        ca.thread.start()
        if not auto and credits:
            consumer.flow(credits)
        return {"consumer": consumer.id, "dispatch": consumer.dispatch, "active": consumer.active}

    def _ids(self, ca, c):
        if c.get("all"):
            with ca.lock:
                ids, ca.unacked = ca.unacked, []
            return ids
        ids = c["ids"]
        with ca.lock:
            ca.unacked = [i for i in ca.unacked if i not in set(ids)]
        return ids

    def cmd_ack(self, c):
        ca = self.consumers[c["handle"]]
        ids = self._ids(ca, c)
        ca.consumer.ack(ids, sync=bool(ids))
        return {"ids": ids}

    def cmd_nack(self, c):
        ca = self.consumers[c["handle"]]
        ids = self._ids(ca, c)
        ca.consumer.nack(ids, delay_ms=c.get("delay_ms"), sync=bool(ids))
        return {"ids": ids}

    def cmd_flow(self, c):
        """With a rid, so that a refusal (UNKNOWN_CONSUMER, ...) comes back as the step's outcome."""
        ca = self.consumers[c["handle"]]
        with ca.lock:
            ca.granted += c["credits"]
        self.client.request(ca.consumer._flow_frame(c["credits"]))
        return {}

    def cmd_close_producer(self, c):
        self.producers[c["handle"]].close()
        return {}

    def cmd_close_consumer(self, c):
        self.consumers[c["handle"]].consumer.close()
        return {}

    def cmd_unsubscribe(self, c):
        self.consumers[c["handle"]].consumer.unsubscribe()
        return {}

    def cmd_stats(self, c):
        return {"stats": self.client.stats(c["topic"])}

    def cmd_flood(self, c):
        """Act as a client that stops reading and keeps writing: `bytes` of pings, or until the
        broker closes the connection or `within` seconds pass. Holding the client's lock stops its
        reader after its current read; once released, it reads what the broker sent meanwhile (it
        must stop writing in time for that: a broker that closes a socket with unread bytes in it
        resets the connection, and the client never sees its last frames)."""
        chunk = b"".join(encode_frame({"op": "ping", "rid": i}) for i in range(1000))
        sock, sent, view, offset = self.client._sock, 0, memoryview(chunk), 0
        deadline = time.monotonic() + c.get("within", 30)
        with self.client._lock:
            while sent < c["bytes"] and (left := deadline - time.monotonic()) > 0:
                if not select.select([], [sock], [], min(left, 0.5))[1]:
                    continue   # the broker does not read now: look at the deadline again
                try:
                    offset += sock.send(view[offset:], socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError:
                    break      # the broker closed the connection
                if offset == len(chunk):
                    sent, offset = sent + offset, 0
        return {"sent_bytes": sent + offset}

    def cmd_close(self, c):
        self.client.close()
        return {}


def code_of(exc):
    """The error code a step's `expect_error` names: the broker's, or one for the client's end."""
    if isinstance(exc, BrokerError):
        return exc.code
    if isinstance(exc, ConnectionLost):
        return "CONNECTION_LOST"
    if isinstance(exc, (ConsumerClosed, ProducerClosed)):
        return "CLOSED"
    return type(exc).__name__


class ReceiptReporter:
    """Emits the receipts of a produce command as they come ({"event": "receipted"}), in order,
    so that the runner knows what was receipted even if this process is killed in the middle."""

    def __init__(self, handle, futures, within):
        self.handle, self.futures, self.within = handle, futures, within
        self.more = threading.Condition()
        self.done = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def add(self, entry):
        with self.more:
            self.futures.append(entry)
            self.more.notify()

    def finish(self):
        with self.more:
            self.done = True
            self.more.notify()
        self.thread.join()

    def run(self):
        i = 0
        while True:
            with self.more:
                while i >= len(self.futures) and not self.done:
                    self.more.wait()
                if i >= len(self.futures):
                    return
                text, key, future = self.futures[i]
            try:
                failed = future.exception(self.within)   # waits for its batch's receipt
            except TimeoutError:
                failed = True
            if failed is None:
                ready = [[future.result(0), text, key]]
                i += 1
                with self.more:   # the rest of its batch, settled with it
                    while i < len(self.futures) and self.futures[i][2].done():
                        t, k, f = self.futures[i]
                        if f.exception(0) is None:
                            ready.append([f.result(0), t, k])
                        i += 1
                emit({"event": "receipted", "handle": self.handle, "sent": ready})
            else:
                i += 1


def handle(agent, c):
    rid = c.get("rid")
    try:
        result = getattr(agent, "cmd_" + c["cmd"])(c)
        emit({"rid": rid, "ok": True, **result})
    except Exception as exc:
        emit({"rid": rid, "ok": False, "code": code_of(exc), "error": f"{type(exc).__name__}: {exc}"})
    if c["cmd"] == "close":
        sys.stdout.flush()
        os._exit(0)


def main():
    die_with_parent()
    host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    heartbeat = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "0" else None
    reconnect = float(sys.argv[5]) if len(sys.argv) > 5 and float(sys.argv[5]) > 0 else None
    try:
        agent = Agent(host, port, name, heartbeat, reconnect)
    except Exception as exc:
        emit({"event": "fatal", "error": f"{type(exc).__name__}: {exc}"})
        return 1
    emit({"event": "ready", "heartbeat_ms": agent.client.heartbeat_ms})
    for line in sys.stdin:
        if not line.strip():
            continue
        c = json.loads(line)
        # produce and the requests that wait on the broker run in their own thread, so that the
        # agent still takes commands (e.g. ack) meanwhile
        threading.Thread(target=handle, args=(agent, c), daemon=True).start()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
