"""2,000 client connections opened and dropped in bursts of 500 while one normal client keeps a
consumer attached: after every burst the broker is back where it was (only the normal consumer on
the subscription, as many processes as before) and the normal consumer still receives.

A burst opens raw non-blocking sockets (hello, subscribe to the shared subscription, flow), then
either closes them all (from this process) or kill -9s the child process that holds them."""
import os
import selectors
import socket
import subprocess
import sys
import time

from actorbroker.transport.client import Client
from actorbroker.transport.codec import FrameDecoder, encode_frame
from tests.util import ROOT, consumers_of, raise_nofile_limit, wait_for

BURSTS = 4
PER_BURST = 500
CHUNK = 100              # connections opened between two looks at the broker's process count
PROCESS_SLACK = 50       # connections live in a few shards, not in a process each
SUBSCRIPTION = "shared"


def open_raw_consumers(host, port, topic, prefix, count, parallel=64, timeout=30.0):
    """Open `count` connections with raw non-blocking sockets; each sends hello and subscribe at
    once, then flow once its `subscribed` reply came. Returns the sockets, all subscribed."""
    hello = encode_frame({"op": "hello", "rid": 1, "version": 1, "client": "raw", "heartbeat_ms": 60000})
    sel = selectors.DefaultSelector()
    socks, decoders = [], {}
    started = done = 0
    deadline = time.monotonic() + timeout
    try:
        while done < count:
            while started < count and started - done < parallel:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                s.connect_ex((host, port))
                socks.append(s)
                sel.register(s, selectors.EVENT_WRITE, started)
                started += 1
            if time.monotonic() > deadline:
                raise AssertionError(f"only {done} of {count} connections subscribed within {timeout}s")
            for key, _ in sel.select(timeout=0.5):
                s, index = key.fileobj, key.data
                if s not in decoders:         # connected (or failed)
                    error = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        raise OSError(error, f"connection {index}: {os.strerror(error)}")
                    subscribe = encode_frame({"op": "subscribe", "rid": 2, "topic": topic,
                                              "subscription": SUBSCRIPTION, "type": "shared",
                                              "consumer": f"{prefix}-{index}"})
                    s.sendall(hello + subscribe)   # a few hundred bytes: fits the empty send buffer
                    decoders[s] = FrameDecoder(max_frame=64 * 1024 * 1024)
                    sel.modify(s, selectors.EVENT_READ, index)
                    continue
                data = s.recv(65536)
                if not data:
                    raise ConnectionError(f"connection {index} closed by the broker before subscribed")
                decoders[s].feed(data)
                for frame in decoders[s]:
                    if frame.get("rid") == 2:
                        if frame["op"] != "subscribed":
                            raise AssertionError(f"connection {index}: {frame}")
                        s.sendall(encode_frame({"op": "flow", "consumer": frame["consumer"], "credits": 100}))
                        sel.unregister(s)
                        done += 1
                    elif frame["op"] == "error":
                        raise AssertionError(f"connection {index}: {frame}")
        return socks
    except BaseException:
        for s in socks:
            s.close()
        raise
    finally:
        sel.close()


HOLDER = """
import sys
sys.path.insert(0, {root!r})
from tests.test_connection_scale import open_raw_consumers
socks = open_raw_consumers({host!r}, {port}, {topic!r}, {prefix!r}, {count})
print("ready", flush=True)
sys.stdin.read()    # holds them until killed
"""


def hold_in_child(broker, topic, prefix, count):
    """A child process that opens `count` raw consumers and holds them; returns once they are open."""
    code = HOLDER.format(root=str(ROOT), host=broker.host, port=broker.port, topic=topic, prefix=prefix,
                         count=count)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    line = proc.stdout.readline()
    if line != b"ready\n":
        proc.kill()
        proc.wait()
        raise AssertionError(f"the child holding connections failed: {line!r}")
    return proc


def test_bursts_of_connections_leave_nothing_behind(start_broker, topic):
    old_limit = raise_nofile_limit()
    try:
        b = start_broker("--io-shards", "2", "--max-connections", "3000")
        normal = Client(*b.address, name="normal")
        try:
            consumer = normal.subscribe(topic, SUBSCRIPTION, "shared", "normal")
            producer = normal.producer(topic)
            baseline = len(b.processes())

            def listed():
                return sorted(c["name"] for c in consumers_of(normal.stats(topic), SUBSCRIPTION))

            for burst in range(BURSTS):
                prefix = f"raw{burst}"
                child, socks = None, []
                try:
                    if burst % 2 == 0:     # opened here, closed here
                        for first in range(0, PER_BURST, CHUNK):
                            socks += open_raw_consumers(b.host, b.port, topic, f"{prefix}-{first}", CHUNK)
                            grown = len(b.processes()) - baseline
                            assert grown <= PROCESS_SLACK, f"{len(socks)} connections cost {grown} processes"
                    else:                  # held by a child process, which is killed
                        child = hold_in_child(b, topic, prefix, PER_BURST)
                    wait_for(lambda: len(listed()), lambda n: n == PER_BURST + 1, timeout=30, interval=0.2)
                    for i in range(20):    # deliveries to the burst's consumers, dropped with them
                        producer.send(f"{burst}-{i}".encode())
                    producer.flush()
                finally:
                    if child is not None:
                        child.kill()
                        child.wait()
                        child.stdin.close()
                        child.stdout.close()
                    for s in socks:
                        s.close()

                wait_for(listed, lambda found: found == ["normal"], timeout=10, interval=0.2)
                wait_for(lambda: len(b.processes()), lambda n: n == baseline, timeout=10, interval=0.2)
                offset = producer.send_sync(f"after burst {burst}".encode())
                deadline = time.monotonic() + 5
                while True:             # earlier messages of the burst may come first
                    msg = consumer.receive(timeout=max(0.01, deadline - time.monotonic()))
                    if msg.id == offset:
                        assert msg.payload == f"after burst {burst}".encode()
                        break
        finally:
            normal.close()
    finally:
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, old_limit)


def test_a_burst_faster_than_the_shard_takes_sockets_waits_instead_of_being_refused(start_broker):
    """One shard, 1,500 connections at once: its handoff socket holds ~280 sockets not yet taken.
    The listener holds the next one (the rest wait in the accept queue) until the shard has
    taken some, instead of refusing them OVERLOADED far below --max-connections."""
    old_limit = raise_nofile_limit()
    socks = []
    try:
        b = start_broker("--io-shards", "1")
        for _ in range(1500):
            socks.append(socket.create_connection(b.address, timeout=30))
        hello = encode_frame({"op": "hello", "rid": 1, "version": 1, "client": "burst"})
        firsts = {}
        for s in socks:
            s.sendall(hello)
        for index, s in enumerate(socks):
            decoder = FrameDecoder()
            frame = None
            while frame is None:
                data = s.recv(65536)
                assert data, f"connection {index} closed before an answer to hello"
                decoder.feed(data)
                frame = decoder.next_frame()
            what = frame["code"] if frame["op"] == "error" else frame["op"]
            firsts[what] = firsts.get(what, 0) + 1
        assert firsts == {"welcome": 1500}
    finally:
        for s in socks:
            s.close()
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, old_limit)
