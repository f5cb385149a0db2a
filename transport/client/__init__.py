"""The Python client library of actorbroker: one sans-IO protocol core (core.py) under a threaded
client (sync.py) and an asyncio client (aio.py). It shares only the codec, the error types and
the sans-IO TLS layer with the broker (actorbroker.transport.codec, .errors, .tls).

    from actorbroker.transport.client import Client, connect, AsyncClient, TlsOptions
"""
from actorbroker.transport.client.aio import AsyncClient, AsyncConsumer, AsyncProducer, AsyncSendFuture
from actorbroker.transport.client.core import (DEFAULT_HOST, DEFAULT_PORT, Address, Message, parse_address,
                                               parse_url)
from actorbroker.transport.client.sync import Client, Consumer, Producer, SendFuture, connect
from actorbroker.transport.client.tls import TlsOptions

__all__ = ["Client", "connect", "Producer", "Consumer", "SendFuture", "Message", "AsyncClient",
           "AsyncProducer", "AsyncConsumer", "AsyncSendFuture", "parse_url", "parse_address", "Address",
           "TlsOptions", "DEFAULT_HOST", "DEFAULT_PORT"]
