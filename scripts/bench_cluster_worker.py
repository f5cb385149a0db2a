"""Client roles of the `cluster` scenario of `actorbroker bench` (scripts/bench_cluster.py), each
run as its own OS process, possibly inside a node's network namespace:

    python -m actorbroker.scripts.bench_cluster_worker ROLE [options]

They keep going across the loss of the node that owns their topic, and print one JSON line per
event on stdout (times are time.time_ns(), comparable with the bench's own clock):

- `keep-consuming`: a consumer that subscribes again whenever its consumer is closed (a lost
  topic, a lost node) or a request fails; prints {"event": "got", "sent_ns", "t_ns", "seq"} for the
  first message received in every 20 ms (when it was sent, when it arrived), at the first after
  each subscribe and after every silence of 0.1 s, and {"event": "closed", "reason", "t_ns"} when closed. (Since the broker
  re-attaches the consumers of a re-homed non_reliable topic, they see a gap, not `closed`.)
- `keep-producing`: a producer sending one message every --interval-ms, opened again whenever it
  is closed; prints {"event": "opened"/"closed", ...} and, at the end, how many sends failed
  (TOPIC_UNAVAILABLE while the topic is being moved).
- `reliable-producing`: a reliable producer with receipts, connected to the --url addresses
  (NODE=HOST:PORT,...) in turn: the next one when its connection is lost, or when the file
  --avoid names its node (the bench writes there the node it is about to kill; the producer then
  flushes, moves and prints {"event": "connected", "node"}); counts every message whose receipt arrived;
  prints {"event": "receipt", "sent_ns", "t_ns"} for the first receipt of every 20 ms (when the
  message was sent, when its receipt arrived), a {"event": "progress", "receipted"} line a
  second, and at SIGTERM (after
  waiting for outstanding receipts) {"role": ..., "receipted": [[first, last], ...] (ranges of
  sequence numbers), "count", "sent", "failed", "unsettled"}.

Payloads start with the send time and the sequence number (bench_common.STAMP). Every loop is
bounded by --deadline seconds; SIGTERM ends a role cleanly.
"""
import argparse
import collections
import signal
import sys
import time

from actorbroker.scripts.bench_common import STAMP, emit, make_payload, touch
from actorbroker.transport.client import Client, parse_url
from actorbroker.transport.errors import ConnectionLost, ConsumerClosed, ProducerClosed

STOP = []


def _stop(*_):
    STOP.append(True)


def stopping(deadline):
    return bool(STOP) or time.monotonic() > deadline


def connect(url, name):
    host, port = parse_url(url)
    return Client(host, port, name=name, connect_timeout=3)


def keep_consuming(args):
    client = connect(args.url, "bench-keep-consumer")
    deadline = time.monotonic() + args.deadline
    attempt = 0
    ready = False
    while not stopping(deadline):
        attempt += 1
        try:   # shared, a new consumer name each time: a subscribe that timed out but was done
            consumer = client.subscribe(args.topic, args.subscription, "shared", f"k{attempt}",
                                        timeout=args.request_timeout)
        except ConnectionLost:
            raise
        except Exception as exc:   # noqa: BLE001 - TOPIC_UNAVAILABLE, a timeout (owner lost, not yet declared)
            emit({"event": "retry", "what": type(exc).__name__, "t_ns": time.time_ns()})
            time.sleep(args.retry_ms / 1000)
            continue
        if not ready:
            touch(args.ready)
            ready = True
        told = last = 0.0
        while not stopping(deadline):
            try:
                msg = consumer.receive(timeout=0.2)
            except TimeoutError:
                continue
            except ConsumerClosed as exc:
                emit({"event": "closed", "reason": exc.reason, "t_ns": time.time_ns()})
                break
            now = time.monotonic()
            if now - told >= 0.02 or now - last > 0.1:   # and always the first after a silence
                sent_ns, seq = STAMP.unpack_from(msg.payload)
                emit({"event": "got", "sent_ns": sent_ns, "t_ns": time.time_ns(), "seq": seq,
                      "attempt": attempt, **({"first": True} if not told else {})})
                told = now
            last = now
    client.close(timeout=2)
    return 0


def keep_producing(args):
    client = connect(args.url, "bench-keep-producer")
    deadline = time.monotonic() + args.deadline
    interval = args.interval_ms / 1000
    seq, failed = 0, 0
    producer = None
    futures = collections.deque()

    def settle():
        nonlocal failed
        while futures:
            try:
                error = futures[0].exception(0)
            except TimeoutError:
                return
            futures.popleft()
            failed += error is not None

    while not stopping(deadline):
        settle()
        if producer is None:
            try:
                producer = client.producer(args.topic, timeout=args.request_timeout, max_batch=1)
            except ConnectionLost:
                raise
            except Exception as exc:   # noqa: BLE001 - as keep_consuming
                emit({"event": "retry", "what": type(exc).__name__, "t_ns": time.time_ns()})
                time.sleep(args.retry_ms / 1000)
                continue
            emit({"event": "opened", "t_ns": time.time_ns()})
            touch(args.ready)
        try:
            futures.append(producer.send(make_payload(seq, args.payload)))
        except ProducerClosed as exc:
            emit({"event": "closed", "reason": exc.reason, "t_ns": time.time_ns()})
            producer = None
            continue
        seq += 1
        time.sleep(interval)
    settle()
    client.close(timeout=2)
    emit({"role": "keep-producing", "sent": seq, "failed": failed, "unsettled": len(futures)})
    return 0


def ranges(seqs):
    out = []
    for s in sorted(seqs):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def read_avoid(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def reliable_producing(args):
    urls = [u.split("=", 1) if "=" in u else [u, u] for u in args.url.split(",")]
    deadline = time.monotonic() + args.deadline
    interval = args.interval_ms / 1000
    state = {"client": None, "producer": None, "at": 0}
    pending = collections.deque()          # (seq, time sent, future), in send order
    receipted, failed = [], 0
    last_told = 0.0
    last_progress = 0.0

    def settle(wait=0.0):
        """Count what has its receipt (or its failure), oldest first."""
        nonlocal failed, last_told
        end = time.monotonic() + wait
        while pending:
            seq, sent_ns, future = pending[0]
            try:
                error = future.exception(max(0.0, end - time.monotonic()))
            except TimeoutError:
                return
            pending.popleft()
            if error is None:
                now = time.monotonic()
                if now - last_told >= 0.02:
                    last_told = now
                    emit({"event": "receipt", "sent_ns": sent_ns, "t_ns": time.time_ns(), "seq": seq})
                receipted.append(seq)
            else:
                failed += 1

    def open_producer():
        if state["client"] is None or not state["client"].connected:
            if state["client"] is not None:
                state["client"].close(timeout=1)
                state["client"] = None
                state["at"] += 1
            avoid = read_avoid(args.avoid) if args.avoid else None
            if urls[state["at"] % len(urls)][0] == avoid:
                state["at"] += 1
            node, url = urls[state["at"] % len(urls)]
            state["client"] = connect(url, "bench-reliable-producer")
            emit({"event": "connected", "node": node, "url": url, "t_ns": time.time_ns()})
        state["producer"] = state["client"].producer(args.topic, dispatch="reliable",
                                                     timeout=args.request_timeout, max_batch=50)
        emit({"event": "opened", "t_ns": time.time_ns()})

    def move_if_avoided():
        """The bench is about to kill the node this producer is connected to: flush, go to the next."""
        if not args.avoid or state["client"] is None or read_avoid(args.avoid) != urls[state["at"] % len(urls)][0]:
            return
        if state["producer"] is not None:
            try:
                state["producer"].flush(timeout=10)
            except Exception:   # noqa: BLE001 - what has no receipt stays unsettled or failed
                pass
        settle()
        state["client"].close(timeout=2)
        state["client"], state["producer"] = None, None
        state["at"] += 1

    seq = 0
    ready = False
    last_avoid_check = 0.0
    while not stopping(deadline):
        settle()
        if time.monotonic() - last_avoid_check >= 0.05:
            last_avoid_check = time.monotonic()
            move_if_avoided()
        if time.monotonic() - last_progress >= 1.0:
            last_progress = time.monotonic()
            emit({"event": "progress", "receipted": len(receipted), "failed": failed, "sent": seq,
                  "t_ns": time.time_ns()})
        if state["producer"] is None:
            try:
                open_producer()
            except Exception as exc:   # noqa: BLE001 - a lost node, TOPIC_UNAVAILABLE, a timeout
                emit({"event": "retry", "what": f"{type(exc).__name__}: {exc}"[:200], "t_ns": time.time_ns()})
                if isinstance(exc, (ConnectionLost, OSError)) and state["client"] is not None:
                    state["client"].close(timeout=1)
                    state["client"] = None
                    state["at"] += 1
                elif isinstance(exc, (ConnectionLost, OSError)):
                    state["at"] += 1
                time.sleep(args.retry_ms / 1000)
                continue
            if not ready:
                touch(args.ready)
                ready = True
        try:
            sent_ns = time.time_ns()
            pending.append((seq, sent_ns, state["producer"].send(make_payload(seq, args.payload))))
            seq += 1
        except (ProducerClosed, ConnectionLost) as exc:
            emit({"event": "closed", "reason": getattr(exc, "reason", type(exc).__name__), "t_ns": time.time_ns()})
            state["producer"] = None
            continue
        time.sleep(interval)
    if state["producer"] is not None:
        try:
            state["producer"].flush(timeout=args.final_wait)
        except Exception:   # noqa: BLE001 - what has no receipt is counted as unsettled
            pass
    settle(wait=args.final_wait)
    unsettled = len(pending)
    if state["client"] is not None:
        state["client"].close(timeout=2)
    emit({"role": "reliable-producing", "receipted": ranges(receipted), "count": len(receipted), "sent": seq,
          "failed": failed, "unsettled": unsettled})
    return 0


ROLES = {"keep-consuming": keep_consuming, "keep-producing": keep_producing,
         "reliable-producing": reliable_producing}


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m actorbroker.scripts.bench_cluster_worker")
    p.add_argument("role", choices=sorted(ROLES))
    p.add_argument("--url", required=True, help="HOST:PORT (reliable-producing: NODE=HOST:PORT,...)")
    p.add_argument("--avoid", default=None, help="reliable-producing: a file naming a node not to be connected to")
    p.add_argument("--topic", required=True)
    p.add_argument("--subscription", default="bench")
    p.add_argument("--payload", type=int, default=100)
    p.add_argument("--interval-ms", type=float, default=2.0)
    p.add_argument("--request-timeout", type=float, default=1.0,
                   help="seconds to wait for a subscribe/producer answer before trying again")
    p.add_argument("--retry-ms", type=float, default=20.0)
    p.add_argument("--final-wait", type=float, default=15.0)
    p.add_argument("--ready", default=None)
    p.add_argument("--deadline", type=float, default=600.0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return ROLES[args.role](args) or 0


if __name__ == "__main__":
    sys.exit(main())
