"""Client roles of `actorbroker bench`, each run as its own OS process:

    python -m scripts.bench_worker ROLE [options]

Result roles (produce, consume, raw-produce, raw-consume) print one JSON line of results
on stdout when done. Event roles (failover, shared-watch), used by the disconnect scenario,
print one JSON line per event instead. A role that waits for its peers writes --ready FILE once
it is subscribed/connected. Every loop is bounded by --deadline seconds.

The scale scenario opens its connections with scripts/bench_conns.py (raw non-blocking sockets),
and `--compare` drives NATS and Redis with scripts/bench_peer_worker.py.

Payloads start with the send time (time.time_ns, 8 bytes big-endian) and a sequence number
(8 bytes), padded with zeros to --payload bytes.
"""
import argparse
import os
import signal
import socket
import sys
import time

from actorbroker.scripts.bench_common import STAMP, emit, make_payload, percentiles, settle, touch
from actorbroker.transport.client import Client, parse_url
from actorbroker.transport.codec import FrameDecoder, encode_frame, encode_message_frames, encode_record


# --- broker client roles ----------------------------------------------------------------------

def produce(args):
    host, port = parse_url(args.url)
    client = Client(host, port, name="bench-producer")
    producer = client.producer(args.topic, dispatch=args.dispatch, linger_ms=args.linger_ms,
                               max_batch=args.max_batch)
    settle()
    deadline = time.monotonic() + args.deadline
    start = time.monotonic()
    interval = 1.0 / args.rate if args.rate else 0.0
    sent, errors = 0, 0
    futures = []
    for seq in range(args.n):
        if interval:
            due = start + seq * interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        if time.monotonic() > deadline:
            break
        futures.append(producer.send(make_payload(seq, args.payload)))
        sent += 1
    send_s = time.monotonic() - start
    try:
        producer.flush(timeout=max(1.0, deadline - time.monotonic()))
    except Exception as exc:   # noqa: BLE001 - reported, not raised
        errors += 1
        emit_err = f"{type(exc).__name__}: {exc}"
    else:
        emit_err = None
    elapsed = time.monotonic() - start
    failed = sum(1 for f in futures if f.done() and f.exception(0) is not None)
    client.close()
    emit({"role": "produce", "sent": sent, "failed": failed, "send_s": send_s, "elapsed_s": elapsed,
          "msg_s": sent / elapsed if elapsed > 0 else 0.0, "error": emit_err})
    return 0


def consume(args):
    host, port = parse_url(args.url)
    client = Client(host, port, name="bench-consumer")
    consumer = client.subscribe(args.topic, args.subscription, args.type, args.name,
                                dispatch=args.dispatch, receiver_queue=args.receiver_queue)
    granted = [args.receiver_queue]          # credits this consumer gave the broker (flow frames)
    send_flow = consumer.flow

    def counted_flow(credits):
        send_flow(credits)
        granted.append(credits)
    consumer.flow = counted_flow
    touch(args.ready)
    deadline = time.monotonic() + args.deadline
    received, first_ns, last_ns = 0, None, None
    seen = set() if args.distinct else None
    lat = [] if args.latency else None
    to_ack = []
    error = None
    while received < args.n:
        now = time.monotonic()
        if now > deadline:
            error = "deadline"
            break
        wait = args.idle if first_ns is not None else min(args.first_timeout, deadline - now)
        try:
            msg = consumer.receive(timeout=max(0.01, wait))
        except TimeoutError:
            if first_ns is not None or time.monotonic() >= deadline or wait >= args.first_timeout:
                error = "idle" if first_ns is not None else "nothing received"
                break
            continue
        except Exception as exc:   # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
            break
        t = time.time_ns()
        if first_ns is None:
            first_ns = t
        last_ns = t
        received += 1
        if lat is not None:
            lat.append((t - STAMP.unpack_from(msg.payload)[0]) / 1000)
        if seen is not None:
            seen.add(msg.id)
        if args.ack:
            to_ack.append(msg.id)
            if len(to_ack) >= 100:
                consumer.ack(to_ack)
                to_ack = []
    if to_ack:
        try:
            consumer.ack(to_ack, sync=True, timeout=5)
        except Exception:   # noqa: BLE001
            pass
    span = (last_ns - first_ns) / 1e9 if first_ns is not None and last_ns != first_ns else 0.0
    result = {"role": "consume", "received": received, "first_ns": first_ns, "last_ns": last_ns,
              "span_s": span, "msg_s": (received - 1) / span if span > 0 else 0.0, "stopped": error,
              "credits_granted": sum(granted), "flows": len(granted)}
    if seen is not None:
        result["distinct"] = len(seen)
    if lat is not None:
        result["latency"] = percentiles(lat)
    client.close(timeout=2)
    emit(result)
    return 0


def failover(args):
    """A failover consumer: prints {"event": "active", "t_ns"} when the broker's `active` push makes it
    the active consumer (the takeover itself), {"event": "first", "t_ns", "sent_ns"} at its first
    message; on SIGUSR1 closes its socket (prints {"event": "closed", "t_ns"} just before) and exits."""
    host, port = parse_url(args.url)
    client = Client(host, port, name=f"bench-{args.name}")

    def on_active(_consumer, active):   # the reader thread, as the push arrives
        if active:
            emit({"event": "active", "t_ns": time.time_ns()})
    consumer = client.subscribe(args.topic, args.subscription, "failover", args.name, on_active=on_active)
    closing = []
    signal.signal(signal.SIGUSR1, lambda *_: closing.append(True))
    touch(args.ready)
    deadline = time.monotonic() + args.deadline
    got_first = False
    while time.monotonic() < deadline:
        if closing:
            t = time.time_ns()
            try:
                client._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            client._sock.close()
            emit({"event": "closed", "t_ns": t})
            os._exit(0)
        try:
            msg = consumer.receive(timeout=0.05)
        except TimeoutError:
            continue
        except Exception as exc:   # noqa: BLE001
            emit({"event": "error", "error": f"{type(exc).__name__}: {exc}"})
            return 1
        if not got_first:
            got_first = True
            emit({"event": "first", "t_ns": time.time_ns(), "sent_ns": STAMP.unpack_from(msg.payload)[0]})
    return 0


def shared_watch(args):
    """A consumer of a shared subscription printing {"n", "d", "t_ns"} after each message
    (n received, d distinct ids); acks each message with --ack, holds them all without."""
    host, port = parse_url(args.url)
    client = Client(host, port, name=f"bench-{args.name}")
    consumer = client.subscribe(args.topic, args.subscription, "shared", args.name,
                                dispatch="reliable")
    touch(args.ready)
    deadline = time.monotonic() + args.deadline
    seen = set()
    n = 0
    while time.monotonic() < deadline:
        try:
            msg = consumer.receive(timeout=0.2)
        except TimeoutError:
            continue
        except Exception as exc:   # noqa: BLE001
            emit({"event": "error", "error": f"{type(exc).__name__}: {exc}"})
            return 1
        n += 1
        seen.add(msg.id)
        if args.ack:
            consumer.ack(msg)
        emit({"n": n, "d": len(seen), "t_ns": time.time_ns()})
    return 0


# --- baseline (bare forwarder) roles -----------------------------------------------------------

def raw_connect(url, role):
    host, port = parse_url(url)
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(encode_frame({"op": "hello", "role": role}))
    return sock


def raw_produce(args):
    """The frames the broker would push, one record each, all encoded before the clock starts,
    --per-write frames per sendall."""
    sock = raw_connect(args.url, "producer")
    now_ms = int(time.time() * 1000)
    frames = [encode_message_frames(1, [encode_record(seq, make_payload(seq, args.payload), None, {}, now_ms,
                                                      "bench-producer")])[0] for seq in range(args.n)]
    writes = [b"".join(frames[i:i + args.per_write]) for i in range(0, len(frames), args.per_write)]
    del frames
    start = time.monotonic()   # frames are encoded beforehand: this measures the forwarder, not us
    for chunk in writes:
        sock.sendall(chunk)
    elapsed = time.monotonic() - start
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(args.deadline)
    try:
        sock.recv(1)   # the forwarder closes once it has passed everything on
    except OSError:
        pass
    sock.close()
    emit({"role": "raw-produce", "sent": args.n, "elapsed_s": elapsed,
          "msg_s": args.n / elapsed if elapsed > 0 else 0.0})
    return 0


def raw_consume(args):
    sock = raw_connect(args.url, "consumer")
    touch(args.ready)
    sock.settimeout(args.idle)
    decoder = FrameDecoder()
    received, first_ns, last_ns, stopped = 0, None, None, None
    deadline = time.monotonic() + args.deadline
    while received < args.n:
        if time.monotonic() > deadline:
            stopped = "deadline"
            break
        try:
            data = sock.recv(256 * 1024)
        except socket.timeout:
            if first_ns is None and time.monotonic() < deadline:
                continue
            stopped = "idle"
            break
        if not data:
            stopped = "eof"
            break
        t = time.time_ns()
        decoder.feed(data)
        for frame in decoder:
            for record in frame["msgs"]:
                received += 1
                if first_ns is None:
                    first_ns = t
                last_ns = t
                STAMP.unpack_from(record["payload"])
    sock.close()
    span = (last_ns - first_ns) / 1e9 if first_ns is not None and last_ns != first_ns else 0.0
    emit({"role": "raw-consume", "received": received, "first_ns": first_ns, "last_ns": last_ns,
          "span_s": span, "msg_s": (received - 1) / span if span > 0 else 0.0, "stopped": stopped})
    return 0


ROLES = {"produce": produce, "consume": consume, "failover": failover, "shared-watch": shared_watch,
         "raw-produce": raw_produce, "raw-consume": raw_consume}


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m scripts.bench_worker")
    p.add_argument("role", choices=sorted(ROLES))
    p.add_argument("--url", required=True)
    p.add_argument("--topic", default="/bench/t")
    p.add_argument("--subscription", default="bench")
    p.add_argument("--type", default="exclusive")
    p.add_argument("--name", default=None)
    p.add_argument("--dispatch", default=None)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--payload", type=int, default=100)
    p.add_argument("--rate", type=float, default=0.0, help="messages/s; 0: as fast as possible")
    p.add_argument("--linger-ms", type=float, default=2)
    p.add_argument("--max-batch", type=int, default=500)
    p.add_argument("--per-write", type=int, default=1)
    p.add_argument("--receiver-queue", type=int, default=1000)
    p.add_argument("--ack", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--latency", action="store_true")
    p.add_argument("--distinct", action="store_true")
    p.add_argument("--ready", default=None)
    p.add_argument("--idle", type=float, default=3.0, help="stop after this long without a message")
    p.add_argument("--first-timeout", type=float, default=30.0)
    p.add_argument("--deadline", type=float, default=120.0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    return ROLES[args.role](args) or 0


if __name__ == "__main__":
    sys.exit(main())
