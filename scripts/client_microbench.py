"""Micro-benchmark of the Python client's hot paths, without a broker:

    python -m actorbroker.scripts.client_microbench [-n 200000] [--payload 100] [--repeat 5]

- pack: a producer's per-message work up to the bytes of its `send` frames (record, batching,
  rid and pending entry, frame encoding) and the handling of their receipts, through the
  sans-IO core;
- decode: a consumer's work from the bytes of `message` pushes (100 records a push: v1 maps made
  with codec.encode_record and encode_message_frames, v2 runs with encode_run_frames) to Message
  objects, through the sans-IO core;
- e2e produce / e2e consume: the threaded Client's public API (producer.send + flush,
  consumer.receive) against a fake broker in another process that answers with pre-encoded
  frames, so that nearly all the CPU measured is the client's;
- wake-up: the fake broker pushes one message every --interval-ms, stamped with its send time;
  the time from that write to consumer.receive returning it (p50 and p99 of --wakes messages,
  all runs together): what an idle consumer adds to a message's latency.

Prints microseconds per message (best of --repeat runs; for e2e also the client process's CPU).
`--version 1` makes the client and the fake broker speak protocol v1 (default: v2).
"""
import argparse
import multiprocessing
import socket
import struct
import time

from actorbroker.transport.client import Client
from actorbroker.transport.client.core import Batch, ClientCore, ConsumerCore, ProducerCore, dispatch
from actorbroker.transport.codec import (FrameDecoder, encode_frame, encode_message_frames, encode_record,
                                         encode_run_frames, make_run)

MAX_FRAME = 4 * 1024 * 1024
TIME_MS = 1_700_000_000_000


# --- the core alone ---------------------------------------------------------------------------

class _Sink:
    """Stands for the I/O layer: counts what would be written and delivered."""

    def __init__(self):
        self.written = 0
        self.delivered = 0

    def _settle(self, waiter, result, error):
        pass

    def _write_quietly(self, data):
        self.written += len(data)


class _Consumer(ConsumerCore):
    def __init__(self, sink, reply):
        super().__init__(reply, "/b/p", "s", "exclusive", "c", None, None)
        self.sink = sink

    def _deliver(self, messages):
        self.sink.delivered += len(messages)


class _Producer(ProducerCore):
    def _receipt(self, batch, reply, error):
        self._settle(batch, reply, error)


def receipts(n, max_batch=500):
    """The broker's receipts for the sends of pack(n messages), in order (rids count from 1)."""
    return [encode_frame({"op": "receipt", "rid": rid, "first": i, "count": max_batch})
            for rid, i in enumerate(range(0, n, max_batch), 1)]


def pack(payloads, receipts, version, max_batch=500):
    core = ClientCore("bench")
    core.version = version
    sink = _Sink()
    producer = _Producer({"producer": 1}, None, 2, max_batch, len(payloads) + 1, MAX_FRAME, Batch)
    receipts = iter(receipts)
    for payload in payloads:             # as sync.Producer.send does, without its lock
        record, size = producer._record(payload, None, None)
        _, _, ready, _ = producer._add(record, size)
        for batch in ready:
            sink.written += len(core.send_request(producer, batch))
            dispatch(core.receive_data(next(receipts), 0.0), sink)
    return sink.written


def decode(chunks):
    core = ClientCore("bench")
    sink = _Sink()
    _, data = core.request({"op": "subscribe"}, None, lambda reply: _Consumer(sink, reply), "consumer")
    dispatch(core.receive_data(encode_frame({"op": "subscribed", "rid": 1, "consumer": 7}), 0.0), sink)
    for data in chunks:
        dispatch(core.receive_data(data, 0.0), sink)
    return sink.delivered


def pushes(consumer, first, payloads, version, producer="producer-1"):
    """The frames of one delivery of these payloads, in protocol `version`."""
    if version >= 2:
        return encode_run_frames(consumer, [make_run(first, TIME_MS, producer, payloads)])
    return encode_message_frames(consumer, [encode_record(first + i, p, None, {}, TIME_MS, producer)
                                            for i, p in enumerate(payloads)])


def push_chunks(n, payload, version, per_push=100, read_size=256 * 1024):
    """The bytes a consumer reads: n messages in pushes of per_push, cut in read_size pieces."""
    data = b"".join(frame for i in range(0, n, per_push)
                    for frame in pushes(7, i, [payload] * min(per_push, n - i), version))
    return [data[i:i + read_size] for i in range(0, len(data), read_size)]


# --- the threaded client against a fake broker ------------------------------------------------

def fake_broker(listener, n, payload):
    """Answers hello (in the version asked), producer, send (receipts), subscribe; pushes n
    messages against credits."""
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    version = 1
    decoder = FrameDecoder(MAX_FRAME)
    offset, pushed, credits, consumer = 0, 0, 0, None
    while data := conn.recv(1 << 20):
        decoder.feed(data)
        out = []
        for f in decoder:
            op, rid = f["op"], f.get("rid")
            if op == "hello":
                version = f["version"]
                reply = {"op": "welcome", "version": version, "broker": "fake", "heartbeat_ms": 5000,
                         "max_frame": MAX_FRAME}
            elif op == "producer":
                reply = {"op": "producer_ok", "producer": 1, "topic": f["topic"],
                         "dispatch": "non_reliable"}
            elif op == "send":
                count = len(f["payloads"] if "payloads" in f else f["msgs"])
                reply = {"op": "receipt", "first": offset, "count": count}
                offset += count
            elif op == "subscribe":
                consumer = 7
                reply = {"op": "subscribed", "consumer": consumer, "dispatch": "non_reliable"}
            elif op == "flow":
                credits += f["credits"]
                continue
            else:
                reply = {"op": "pong" if op == "ping" else "ok"}
            if rid is not None:
                out.append(encode_frame(dict(reply, rid=rid)))
        if consumer is not None and credits and pushed < n:
            k = min(credits, n - pushed)
            out.extend(pushes(consumer, pushed, [payload] * k, version, "p"))
            pushed, credits = pushed + k, credits - k
        if out:
            conn.sendall(b"".join(out))


STAMPED = struct.Struct(">Q")   # a paced push's payload: time.time_ns() just before its write


def paced_broker(listener, n, interval_s, version):
    """Answers hello and subscribe, then pushes n one-message deliveries, interval_s apart."""
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    decoder = FrameDecoder(MAX_FRAME)
    consumer = None
    while consumer is None and (data := conn.recv(1 << 16)):
        decoder.feed(data)
        for f in decoder:
            if f["op"] == "hello":
                reply = {"op": "welcome", "version": f["version"], "broker": "fake", "heartbeat_ms": 5000,
                         "max_frame": MAX_FRAME}
            elif f["op"] == "subscribe":
                consumer = 7
                reply = {"op": "subscribed", "consumer": consumer, "dispatch": "non_reliable"}
            else:
                continue
            conn.sendall(encode_frame(dict(reply, rid=f["rid"])))
    conn.setblocking(False)
    for i in range(n):
        time.sleep(interval_s)
        try:
            while conn.recv(1 << 16):   # flows and the like: not needed here
                pass
        except BlockingIOError:
            pass
        conn.sendall(b"".join(pushes(consumer, i, [STAMPED.pack(time.time_ns())], version)))
    conn.setblocking(True)
    while conn.recv(1 << 16):
        pass


def wake_up(n, interval_s, version):
    """Microseconds from each paced push's write to receive() returning it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    proc = multiprocessing.get_context("fork").Process(target=paced_broker, args=(listener, n, interval_s, version),
                                                       daemon=True)
    proc.start()
    port = listener.getsockname()[1]
    listener.close()
    waits = []
    try:
        with Client("127.0.0.1", port, name="microbench", protocol_version=version) as client:
            consumer = client.subscribe("/b/p", "s", "exclusive", "c")
            for _ in range(n):
                msg = consumer.receive(10)
                waits.append((time.time_ns() - STAMPED.unpack(msg.payload)[0]) / 1000)
        return waits
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def with_fake_broker(n, payload, run, version):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    proc = multiprocessing.get_context("fork").Process(target=fake_broker, args=(listener, n, payload),
                                                       daemon=True)
    proc.start()
    port = listener.getsockname()[1]
    listener.close()
    try:
        with Client("127.0.0.1", port, name="microbench", protocol_version=version) as client:
            cpu, wall = time.process_time(), time.perf_counter()
            run(client)
            return (time.perf_counter() - wall) / n * 1e6, (time.process_time() - cpu) / n * 1e6
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def e2e_produce(n, payload, version):
    def run(client):
        producer = client.producer("/b/p", max_batch=500, max_pending=10000)
        send = producer.send
        for _ in range(n):
            send(payload)
        producer.flush(60)
    return with_fake_broker(n, payload, run, version)


def e2e_consume(n, payload, version):
    def run(client):
        receive = client.subscribe("/b/p", "s", "exclusive", "c", receiver_queue=1000).receive
        for _ in range(n):
            receive(10)
    return with_fake_broker(n, payload, run, version)


def best_of(repeat, fn, *args):
    best = None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn(*args)
        elapsed = time.perf_counter() - t
        result = result if isinstance(result, tuple) else (elapsed,)
        best = result if best is None or result[0] < best[0] else best
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200_000, help="messages per run")
    parser.add_argument("--payload", type=int, default=100, help="payload bytes")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--version", type=int, default=2, choices=(1, 2), help="protocol version")
    parser.add_argument("--wakes", type=int, default=500, help="paced messages per wake-up run")
    parser.add_argument("--interval-ms", type=float, default=2.0, help="wake-up: time between pushes")
    parser.add_argument("--only", choices=("wake",), help="run only this measurement")
    args = parser.parse_args(argv)
    if args.only != "wake":
        throughput(args)
    waits = sorted(w for _ in range(args.repeat) for w in wake_up(args.wakes, args.interval_ms / 1000, args.version))
    print(f"wake-up (Client), idle -> receive  p50 {waits[len(waits) // 2]:7.1f} us, "
          f"p99 {waits[int(len(waits) * 0.99)]:7.1f} us ({len(waits)} messages)")


def throughput(args):
    n, payload, version = args.n, bytes(args.payload), args.version
    (t,) = best_of(args.repeat, pack, [payload] * n, receipts(n), version)
    print(f"pack send frames (core)       {t / n * 1e6:7.3f} us/msg")
    chunks = push_chunks(n, payload, version)
    (t,) = best_of(args.repeat, decode, chunks)
    print(f"decode message pushes (core)  {t / n * 1e6:7.3f} us/msg")
    wall, cpu = best_of(args.repeat, e2e_produce, n, payload, version)
    print(f"e2e produce (Client)          {wall:7.3f} us/msg wall, {cpu:.3f} us/msg client CPU")
    wall, cpu = best_of(args.repeat, e2e_consume, n, payload, version)
    print(f"e2e consume (Client)          {wall:7.3f} us/msg wall, {cpu:.3f} us/msg client CPU")


if __name__ == "__main__":
    main()
