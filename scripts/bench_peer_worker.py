"""Client roles of `actorbroker bench --compare`, against NATS (core pub/sub, nats-py) and Redis
(PUBLISH/SUBSCRIBE, redis-py with hiredis), each run as its own OS process like the bench's own
workers (scripts/bench_worker.py):

    python -m actorbroker.scripts.bench_peer_worker {nats,redis}-{produce,consume} --url HOST:PORT ...

The payloads, the result lines and the rules are those of bench_worker's produce/consume roles:
payloads start with the send time and a sequence number; a consumer writes --ready once the
server has its subscription, stops after --n messages, --idle seconds without one, or --deadline,
and prints one JSON line (received, first_ns, last_ns, msg_s, stopped, latency percentiles with
--latency); a producer sends --n messages (at --rate msg/s if given) and prints one JSON line.

How each peer is driven, as the usual client of that system would:
- NATS: `await nc.publish(subject, payload)` per message (nats-py buffers and its flusher task
  writes), then `await nc.flush()`; the consumer is one subscription with a callback.
- Redis: throughput: PUBLISH commands in pipelines of --max-batch (500, as our client's
  max_batch), one round trip per pipeline; with --rate (latency): one PUBLISH per message, its
  reply awaited. The consumer is a PubSub with hiredis' parser, `get_message(timeout)`.
"""
import argparse
import asyncio
import sys
import time

from actorbroker.scripts.bench_common import STAMP, emit, make_payload, percentiles, settle, touch
from actorbroker.transport.client import parse_url


class Counter:
    """What a consumer saw; the result line."""

    def __init__(self, args):
        self.n = args.n
        self.received = 0
        self.first_ns = self.last_ns = None
        self.lat = [] if args.latency else None

    def got(self, payload):
        t = time.time_ns()
        if self.first_ns is None:
            self.first_ns = t
        self.last_ns = t
        self.received += 1
        if self.lat is not None:
            self.lat.append((t - STAMP.unpack_from(payload)[0]) / 1000)

    def result(self, role, stopped):
        span = (self.last_ns - self.first_ns) / 1e9 if self.first_ns is not None and self.last_ns != self.first_ns else 0.0
        out = {"role": role, "received": self.received, "first_ns": self.first_ns, "last_ns": self.last_ns,
               "span_s": span, "msg_s": (self.received - 1) / span if span > 0 else 0.0, "stopped": stopped}
        if self.lat is not None:
            out["latency"] = percentiles(self.lat)
        return out


def paced(args):
    """Yields sequence numbers, sleeping to keep --rate; stops at --deadline."""
    start = time.monotonic()
    deadline = start + args.deadline
    interval = 1.0 / args.rate if args.rate else 0.0
    for seq in range(args.n):
        if interval:
            delay = start + seq * interval - time.monotonic()
            if delay > 0:
                yield delay
        if time.monotonic() > deadline:
            return
        yield seq


# --- NATS --------------------------------------------------------------------------------------

async def _nats_connect(args, name):
    import nats
    host, port = parse_url(args.url, 4222)
    errors = []

    async def on_error(exc):
        errors.append(f"{type(exc).__name__}: {exc}")
    nc = await nats.connect(servers=[f"nats://{host}:{port}"], name=name, connect_timeout=10,
                            allow_reconnect=False, error_cb=on_error)
    return nc, errors


async def _nats_consume(args):
    nc, errors = await _nats_connect(args, "bench-consumer")
    c = Counter(args)
    done = asyncio.Event()

    async def on_msg(msg):
        c.got(msg.data)
        if c.received >= c.n:
            done.set()
    # Limits far above one run, so that nats-py does not drop as a "slow consumer" what we count
    await nc.subscribe(args.topic, cb=on_msg, pending_msgs_limit=10_000_000, pending_bytes_limit=2 ** 31)
    await nc.flush()   # the server has the subscription now
    touch(args.ready)
    start = time.monotonic()
    deadline = start + args.deadline
    stopped = None
    while not done.is_set():
        now = time.monotonic()
        if now > deadline:
            stopped = "deadline"
            break
        if c.first_ns is None and now > start + args.first_timeout:
            stopped = "nothing received"
            break
        if c.last_ns is not None and time.time_ns() - c.last_ns > args.idle * 1e9:
            stopped = "idle"
            break
        try:
            await asyncio.wait_for(done.wait(), 0.05)
        except asyncio.TimeoutError:
            pass
    if errors and stopped:
        stopped += f" ({errors[0]})"
    await nc.close()
    return c.result("nats-consume", stopped)


async def _nats_produce(args):
    nc, errors = await _nats_connect(args, "bench-producer")
    settle()
    start = time.monotonic()
    sent = 0
    for step in paced(args):
        if isinstance(step, float):
            await asyncio.sleep(step)
            continue
        await nc.publish(args.topic, make_payload(step, args.payload))
        sent += 1
    send_s = time.monotonic() - start
    await nc.flush(timeout=max(1, int(args.deadline)))
    elapsed = time.monotonic() - start
    await nc.close()
    return {"role": "nats-produce", "sent": sent, "send_s": send_s, "elapsed_s": elapsed,
            "msg_s": sent / elapsed if elapsed > 0 else 0.0, "error": errors[0] if errors else None}


def nats_consume(args):
    emit(asyncio.run(_nats_consume(args)))


def nats_produce(args):
    emit(asyncio.run(_nats_produce(args)))


# --- Redis -------------------------------------------------------------------------------------

def _redis(args):
    import redis
    host, port = parse_url(args.url, 6379)
    return redis.Redis(host=host, port=port, socket_connect_timeout=10, socket_timeout=args.deadline)


def redis_consume(args):
    r = _redis(args)
    ps = r.pubsub()
    ps.subscribe(args.topic)
    confirmed = ps.get_message(timeout=10)   # the server's "subscribe" reply
    if not confirmed or confirmed.get("type") != "subscribe":
        raise RuntimeError(f"no subscribe confirmation: {confirmed!r}")
    touch(args.ready)
    c = Counter(args)
    start = time.monotonic()
    deadline = start + args.deadline
    stopped = None
    get = ps.get_message
    while c.received < c.n:
        now = time.monotonic()
        if now > deadline:
            stopped = "deadline"
            break
        wait = args.idle if c.first_ns is not None else min(args.first_timeout, deadline - now)
        msg = get(timeout=max(0.01, wait))
        if msg is None:
            if c.first_ns is not None:
                stopped = "idle"
                break
            if time.monotonic() - start >= args.first_timeout:
                stopped = "nothing received"
                break
            continue
        if msg["type"] == "message":
            c.got(msg["data"])
    ps.close()
    r.close()
    emit(c.result("redis-consume", stopped))


def redis_produce(args):
    r = _redis(args)
    settle()
    start = time.monotonic()
    sent = 0
    error = None
    try:
        if args.rate:   # one PUBLISH per message, as the latency scenario wants
            for step in paced(args):
                if isinstance(step, float):
                    time.sleep(step)
                    continue
                r.publish(args.topic, make_payload(step, args.payload))
                sent += 1
        else:
            pipe = r.pipeline(transaction=False)
            for step in paced(args):
                pipe.publish(args.topic, make_payload(step, args.payload))
                if len(pipe) >= args.max_batch:
                    pipe.execute()
                    sent += args.max_batch
            if len(pipe):
                n = len(pipe)
                pipe.execute()
                sent += n
    except Exception as exc:   # noqa: BLE001 - reported, not raised
        error = f"{type(exc).__name__}: {exc}"
    elapsed = time.monotonic() - start
    r.close()
    emit({"role": "redis-produce", "sent": sent, "send_s": elapsed, "elapsed_s": elapsed,
          "msg_s": sent / elapsed if elapsed > 0 else 0.0, "error": error})


ROLES = {"nats-produce": nats_produce, "nats-consume": nats_consume,
         "redis-produce": redis_produce, "redis-consume": redis_consume}


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m actorbroker.scripts.bench_peer_worker")
    p.add_argument("role", choices=sorted(ROLES))
    p.add_argument("--url", required=True)
    p.add_argument("--topic", default="bench.t", help="NATS subject / Redis channel")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--payload", type=int, default=100)
    p.add_argument("--rate", type=float, default=0.0, help="messages/s; 0: as fast as possible")
    p.add_argument("--max-batch", type=int, default=500, help="redis: PUBLISH commands per pipeline")
    p.add_argument("--latency", action="store_true")
    p.add_argument("--ready", default=None)
    p.add_argument("--idle", type=float, default=3.0, help="stop after this long without a message")
    p.add_argument("--first-timeout", type=float, default=30.0)
    p.add_argument("--deadline", type=float, default=120.0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    ROLES[args.role](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
