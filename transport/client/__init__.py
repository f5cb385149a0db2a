"""The Python client library of actorbroker: one sans-IO protocol core (core.py) under a threaded
client (sync.py) and an asyncio client (aio.py). It shares only the codec, the error types and
the sans-IO TLS layer with the broker (actorbroker.transport.codec, .errors, .tls).

    from actorbroker.transport.client import Client, connect, AsyncClient, TlsOptions
"""
from actorbroker.transport.client.core import (DEFAULT_HOST, DEFAULT_PORT, Address, Message, parse_address,
                                               parse_url)
from actorbroker.transport.client.sync import Client, Consumer, Producer, SendFuture, connect
from actorbroker.transport.client.tls import TlsOptions

_ASYNC = ("AsyncClient", "AsyncProducer", "AsyncConsumer", "AsyncSendFuture")


def __getattr__(name):
    # the asyncio client on first use only: a program of the threaded client does not import
    # asyncio (~13 MB less resident, and a smaller process is also torn down faster on exit)
    if name in _ASYNC:
        from actorbroker.transport.client import aio
        return getattr(aio, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Client", "connect", "Producer", "Consumer", "SendFuture", "Message", "AsyncClient",
           "AsyncProducer", "AsyncConsumer", "AsyncSendFuture", "parse_url", "parse_address", "Address",
           "TlsOptions", "DEFAULT_HOST", "DEFAULT_PORT"]
