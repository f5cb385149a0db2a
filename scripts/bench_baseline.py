"""The benchmark's baseline: a bare asyncio TCP forwarder of protocol frames, no routing.

    python -m scripts.bench_baseline [--port 0]      prints "listening on 127.0.0.1:PORT"

Each connection first sends one frame {"op": "hello", "role": "producer"|"consumer"}. Whatever
whole frames producers send afterwards are written, unchanged, to the consumer (the last one
that connected): frame boundaries are found from the 4-byte length headers, nothing is decoded.
When a producer closes its side, the forwarder drains the consumer and closes that producer, so
the producer knows everything was passed on. This is what a broker costs at the very least in
Python: one read and one write per chunk on one event loop.
"""
import argparse
import asyncio
import struct
import sys

from actorbroker.transport.codec import decode_body

_HEADER = struct.Struct(">I")
READ_SIZE = 256 * 1024


class Forwarder:
    def __init__(self):
        self.consumer = None
        self.consumer_ready = asyncio.Event()

    async def handle(self, reader, writer):
        try:
            head = await reader.readexactly(4)
            (n,) = _HEADER.unpack(head)
            hello = decode_body(await reader.readexactly(n))
            if hello.get("role") == "consumer":
                self.consumer = writer
                self.consumer_ready.set()
                await reader.read()   # until the consumer goes away
                return
            await self.consumer_ready.wait()
            await self.forward(reader)
            await self.consumer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def forward(self, reader):
        buf = bytearray()
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                return
            buf += data
            end = 0
            while len(buf) - end >= 4:
                (n,) = _HEADER.unpack_from(buf, end)
                if len(buf) - end - 4 < n:
                    break
                end += 4 + n
            if end:
                self.consumer.write(bytes(buf[:end]))
                del buf[:end]
                await self.consumer.drain()


async def serve(port):
    forwarder = Forwarder()
    server = await asyncio.start_server(forwarder.handle, "127.0.0.1", port)
    host, bound = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{bound}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.bench_baseline")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    try:
        asyncio.run(serve(args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
