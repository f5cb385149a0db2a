"""Messages the TCP transport actor receives, and those it sends to its supervisor.

Plain picklable data only: any actor may live in another process or on another host.
"""
from dataclasses import dataclass, field
from typing import Any


# --- to the transport ------------------------------------------------------------------------

@dataclass(frozen=True)
class AdoptSocket:
    """Take over the connected socket `fd` (inherited through the fork of createActor)."""
    fd: int
    connection_id: int
    config: Any  # actors.config.BrokerConfig


@dataclass(frozen=True)
class Outbound:
    """Bytes (whole frames) to write to the client."""
    data: bytes


@dataclass(frozen=True)
class RouteProducer:
    """A producer is open: route its `send` frames to `topic`, then write `data` (producer_ok)."""
    producer_id: int
    topic: Any
    name: str
    data: bytes


@dataclass(frozen=True)
class UnrouteProducer:
    producer_id: int
    data: bytes = b""


@dataclass(frozen=True)
class RouteConsumer:
    """A consumer is attached: route its flow/ack/nack to `dispatcher`, then write `data`."""
    consumer_id: int
    dispatcher: Any
    data: bytes


@dataclass(frozen=True)
class UnrouteConsumer:
    consumer_id: int
    data: bytes = b""


@dataclass(frozen=True)
class Deliver:
    """Pre-encoded records for one consumer; answered by dispatcher.DeliverAck once buffered."""
    consumer_id: int
    blobs: list


@dataclass(frozen=True)
class Receipts:
    """Topic's answer to a Publish: (rid, first, count) or (rid, error_code, message) per send."""
    producer_id: int
    items: list
    errors: list = field(default_factory=list)


# --- from the transport to its supervisor ---------------------------------------------------------

@dataclass(frozen=True)
class ClientHello:
    """The client completed hello; `permissions` are those of its token (None: auth is off)."""
    client: str
    permissions: Any


@dataclass(frozen=True)
class ClientRequest:
    """A control or admin frame for the supervisor to handle."""
    frame: dict


@dataclass(frozen=True)
class ConnectionClosed:
    """The socket is gone (EOF, error, heartbeat timeout, protocol error): clean up now."""
    connection_id: int
    reason: str
