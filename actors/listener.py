"""ListenerActor: owns the listening socket and starts one ConnectionActor per accepted client."""
import errno
import socket
from dataclasses import dataclass
from typing import Any

from thespian.actors import ThespianWatch

from actorbroker.actors import connection
from actorbroker.actors.base import BrokerActor, log
from actorbroker.transport import errors as E
from actorbroker.transport.tcp_actor import error_frame


@dataclass(frozen=True)
class Listen:
    config: Any
    broker: Any


@dataclass(frozen=True)
class Listening:
    host: str
    port: int


@dataclass(frozen=True)
class ListenFailed:
    error: str


class ListenerActor(BrokerActor):
    process_name = "ab-listener"
    init_message = Listen

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sock = None
        self.config = None
        self.broker = None
        self.connections = []      # addresses of live ConnectionActors (not hashable)
        self.next_connection_id = 1

    def watch(self):
        return ThespianWatch([self.sock.fileno()]) if self.sock is not None else None

    def on_Listen(self, msg, sender):
        self.config = msg.config
        self.broker = msg.broker
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.config.host, self.config.port))
            sock.listen(512)
            sock.setblocking(False)
        except OSError as exc:
            self.send(sender, ListenFailed(f"cannot listen on {self.config.host}:{self.config.port}: {exc}"))
            return
        self.sock = sock
        host, port = sock.getsockname()[:2]
        log.info("listening on %s:%s", host, port)
        self.send(sender, Listening(host, port))

    def on_WatchMessage(self, msg, sender):
        if self.sock is None or self.sock.fileno() not in msg.ready:
            return
        for _ in range(64):  # a burst of clients, but let other messages in between
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed: %s", exc)
                    return
                raise
            self._adopt(conn)

    def _adopt(self, conn):
        if len(self.connections) >= self.config.max_connections:
            try:  # a fresh socket's send buffer is empty: this small write does not block
                conn.setblocking(False)
                conn.send(error_frame(E.OVERLOADED, "too many connections"))
            except OSError:
                pass
            conn.close()
            return
        connection_id = self.next_connection_id
        self.next_connection_id += 1
        # createActor forks: the child inherits `conn` (and our listening socket, which it closes).
        address = self.createActor("actorbroker.actors.connection.ConnectionActor")
        self.send(address, connection.StartConnection(
            conn.fileno(), self.sock.fileno(), connection_id, self.config, self.broker))
        self.connections.append(address)
        conn.close()

    def on_ChildActorExited(self, msg, sender):
        # delivered once or twice: removing by value is idempotent
        self.connections = [a for a in self.connections if a != msg.childAddress]

    def on_ActorExitRequest(self, msg, sender):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
