"""Broker configuration, passed to the actors as plain picklable data."""
from dataclasses import dataclass, field
from typing import Any

from actorbroker.transport.codec import DEFAULT_MAX_FRAME


# Deliveries to a client that reads slowly (docs/protocol.md, "SLOW_CONSUMER"): its shard
# acknowledges a DELIVER only once the client's outbox is below the high water, and a dispatcher
# keeps `window` DELIVER batches in flight per consumer, each bounded in bytes so that
# high water + window batches stay within max_pending_bytes, with room to spare for the other
# frames of the connection and for what run_bytes (transport/codec.py) does not count.
DELIVERY_HIGH_WATER = 1024 * 1024


def delivery_high_water(max_pending_bytes):
    """Unsent bytes above which deliveries to a client wait: 1 MiB, at most half the bound."""
    return min(DELIVERY_HIGH_WATER, max_pending_bytes // 2)


def delivery_batch_bytes(max_pending_bytes, window):
    """The bytes (as run_bytes counts them) of one DELIVER batch at most; a single record larger
    than that still goes, alone in its batch."""
    return max(1, (max_pending_bytes - delivery_high_water(max_pending_bytes)) // (2 * window))


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 6650
    data_dir: str = "./actorbroker-data"
    heartbeat_ms: int = 5000
    max_frame: int = DEFAULT_MAX_FRAME
    max_backlog: int = 10_000          # non_reliable: messages a subscription keeps for absent credit
    max_backlog_bytes: int = 64 * 1024 * 1024   # ... and bytes (about); reliable: what it keeps in memory
    default_dispatch: str = "non_reliable"
    hello_timeout_ms: int = 10_000
    # limits (docs/protocol.md, "Limits"); a request beyond one gets OVERLOADED
    max_connections: int = 10_000      # beyond it a new connection gets OVERLOADED
    max_connections_per_address: int = 10_000
    max_producers_per_connection: int = 1_000
    max_consumers_per_connection: int = 1_000
    max_topics: int = 1_000            # each topic is a process (and a log process when reliable)
    max_subscriptions_per_topic: int = 1_000   # each subscription is two processes
    max_pending_bytes: int = 64 * 1024 * 1024  # unsent to one client; beyond: SLOW_CONSUMER, closed
    max_unacked_per_consumer: int = 100_000    # a subscribe's max_unacked is clamped to it
    frame_timeout_ms: int = 30_000     # a frame begun must be whole within this, or BAD_FRAME
    request_deadline_ms: int = 30_000  # a request the actors have not answered by then is answered INTERNAL
    io_shards: int = 2                 # connection shards (transport actors owning many sockets)
    lanes: str = "unix"                # record lanes between actors: "unix" (one host) or "tcp"
    actor_host: str = "127.0.0.1"      # interface of Thespian's sockets and of tcp lanes
    # token -> list of permissions ("admin", "produce:PATTERN", "consume:PATTERN"); empty = auth off
    tokens: dict = field(default_factory=dict)
    broker_name: str = "actorbroker"
    # TLS on the client port: file paths, read by each shard on its own host (the files must be
    # there); no cert: plain TCP. With tls_client_ca, clients must present a certificate it signed.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # accept tokens over plain TCP on a listener bound to a non-loopback address
    allow_plain_tokens: bool = False
    # cluster (docs/cluster.md): node is "" for a single broker
    node: str = ""
    cluster_leader: bool = False
    member_timeout_ms: int = 3000
    # a folder every node sees (same path on each): reliable topics live there, and a survivor
    # takes a lost node's reliable topic over from it, fenced (storage/fencing.py); "": off
    shared_data: str = ""
    # reliable topics
    fsync: str = "group"               # "always", "group" or "interval:MS"
    segment_bytes: int = 64 * 1024 * 1024
    retention_bytes: int = 0           # 0: no size limit
    retention_ms: int = 0              # 0: no age limit
    # operability (docs/operations.md): Prometheus metrics on metrics_host:metrics_port (None: off,
    # 0: a free port)
    metrics_host: str = "127.0.0.1"
    metrics_port: Any = None
    # set by the root actor once it has started them: where events and metric reports go
    events: Any = None                 # the EventsActor
    metrics: Any = None                # the MetricsActor (None: metrics are off, nothing is counted)
