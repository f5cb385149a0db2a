"""The Python client library of actorbroker: one sans-IO protocol core (core.py) under a threaded
client (sync.py) and an asyncio client (aio.py). It shares only the codec and the error types
with the broker (actorbroker.transport.codec, actorbroker.transport.errors).

    from actorbroker.transport.client import Client, connect, AsyncClient
"""
from actorbroker.transport.client.aio import AsyncClient, AsyncConsumer, AsyncProducer, AsyncSendFuture
from actorbroker.transport.client.core import DEFAULT_HOST, DEFAULT_PORT, Message, parse_url
from actorbroker.transport.client.sync import Client, Consumer, Producer, SendFuture, connect

__all__ = ["Client", "connect", "Producer", "Consumer", "SendFuture", "Message", "AsyncClient",
           "AsyncProducer", "AsyncConsumer", "AsyncSendFuture", "parse_url", "DEFAULT_HOST",
           "DEFAULT_PORT"]
