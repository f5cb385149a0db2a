"""ListenerActor: owns the listening socket and hands each accepted socket to a connection shard.

It supervises K ConnectionActors (restart rule: permanent, one for one), each the supervisor of one
ShardActor. An accepted socket goes to the next live shard, round-robin, over that pair's handoff
socket (an AF_UNIX socketpair, `socket.send_fds`): nothing is forked per connection, and before
`hello` a connection costs the shard a socket and a small buffer.

It enforces the connection limits (in total and per peer host) from what the shards report, plus
the sockets handed over that their shard has not reported taking yet: each socket is sent with a
number, and a shard reports the number of the last one it took. Shards report at most every 100 ms:
a connection from a host at its limit (or from anywhere, at the total limit) is held while the
shards that count those connections recount them at once (RecountHost), so that one that has just
closed no longer counts (a client that closes and reconnects at once is not refused).
"""
import collections
import errno
import socket
import struct
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from thespian.actors import ThespianWatch

from actorbroker.actors import cluster, connection
from actorbroker.actors.base import BrokerActor, log
from actorbroker.transport import errors as E
from actorbroker.transport.session import error_frame


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


HANDOFF_TAG = struct.Struct(">Q")   # the number of a socket handed to a shard, sent with it
HANDOFF_RETRY_S = 0.005   # every shard's handoff socket full: try the held socket again this soon
HOLD_AT_MOST_S = 10.0     # ... and refuse it (OVERLOADED) if no shard took it for this long
RECOUNT_TIMEOUT_S = 1.0   # a shard that did not answer a RecountHost by then counts as it last did
RECOUNT_EVERY_S = 0.1     # a host refused after a recount is refused at once for this long
RECOUNT_HOLD_MAX = 64     # connections of one host held for its recount; beyond, refused at once
_HANDOFF = "handoff"


@dataclass(frozen=True)
class ShardLoad:
    """A shard's open connections, reported when they changed (at most every 100 ms): how many,
    the number of the last handed socket it took, and by peer host the connections it took
    (`opened`) and ended (`finished`) since its previous report. `ident` names the shard's
    incarnation: a new one starts from nothing."""
    index: int
    open: int
    ident: str = ""
    handoff_seq: int = 0
    opened: dict = None
    finished: dict = None
    recount: int = 0    # the RecountHost this report answers (0: none)


@dataclass(frozen=True)
class RecountHost:
    """To a shard: the listener would refuse a connection from `host` (max_connections_per_address),
    or from anywhere (`host` None: max_connections). End its connections from `host` (all of them:
    None) that have hung up, and report (ShardLoad, `recount=token`) now."""
    host: Any
    token: int


@dataclass(frozen=True)
class CountConnections:
    """Complete a `broker_stats` answer with the connections and answer it (BrokerStatsRequest)."""
    rid: Any
    reply_to: Any
    frame: dict


@dataclass(frozen=True)
class StopClients:
    """serve is stopping the broker: close every client connection now, before the topics end.
    From serve to the root, the root to the listener, the listener to each ConnectionActor, and
    on to its shard; each answers ClientsStopped once its part is done. A client then sees its
    connection end (and reconnects elsewhere), not its producers and consumers closed one by one
    with `topic_lost` by topics that happened to stop before its shard."""


@dataclass(frozen=True)
class ClientsStopped:
    pass


class _Pair:
    """One ConnectionActor (and through it one shard) and our end of its handoff socket."""
    __slots__ = ("address", "handoff", "open", "ident", "seq", "handed", "handed_hosts", "hosts", "shard")

    def __init__(self, address, handoff):
        self.address, self.handoff = address, handoff
        self.open = 0       # as last reported by its shard
        self.ident = None   # the shard incarnation that reported it
        self.seq = 0        # number of the last socket handed over
        self.handed = collections.deque()            # (number, host) not yet reported taken
        self.handed_hosts = collections.Counter()    # host -> sockets in `handed`
        self.hosts = collections.Counter()           # host -> open connections, as reported
        self.shard = None   # the ShardActor, once it has reported

    def load(self):
        return self.open + len(self.handed)

    def from_host(self, host):
        return self.hosts[host] + self.handed_hosts[host]

    def hand(self, host):
        self.seq += 1
        self.handed.append((self.seq, host))
        self.handed_hosts[host] += 1

    def reported(self, msg):
        if msg.ident != self.ident:   # a new shard: the connections of the one before are gone
            self.ident = msg.ident
            self.hosts.clear()
        while self.handed and self.handed[0][0] <= msg.handoff_seq:
            _, host = self.handed.popleft()
            self.handed_hosts[host] -= 1
            if not self.handed_hosts[host]:
                del self.handed_hosts[host]
        self.hosts.update(msg.opened or {})
        self.hosts.subtract(msg.finished or {})
        for host in [h for h, n in self.hosts.items() if n <= 0]:
            del self.hosts[host]
        self.open = msg.open


class ListenerActor(BrokerActor):
    process_name = "ab-listener"
    init_message = Listen

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sock = None
        self.config = None
        self.broker = None
        self.pairs = []            # index -> _Pair or None while restarting
        self.turn = 0
        self.exiting = False
        self.stop_asker = None     # who asked StopClients, until every pair has answered
        self.stops_waited = 0
        self.held = None           # (socket, host, since): accepted, every shard's handoff full
        # token -> (host, pairs not answered, pairs whose shard has not reported yet, sockets held)
        self.recounts = {}
        self.recounting = {}       # host -> token of its recount under way
        self.next_recount = 1
        self.refused_at = {}       # host -> when a recount last ended in refusing it

    def watch(self):
        # while a socket is held, the rest wait in the kernel's accept queue (not watched: the
        # listening socket stays readable and would wake us in a loop)
        return ThespianWatch([self.sock.fileno()]) if self.sock is not None and self.held is None else None

    def on_Listen(self, msg, sender):
        self.config = msg.config
        self.broker = msg.broker
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.config.host, self.config.port))
            sock.listen(4096)
            sock.setblocking(False)
        except OSError as exc:
            self.send(sender, ListenFailed(f"cannot listen on {self.config.host}:{self.config.port}: {exc}"))
            return
        self.sock = sock
        self.pairs = [None] * max(1, self.config.io_shards)
        for index in range(len(self.pairs)):
            self._start_pair(index)
        host, port = sock.getsockname()[:2]
        log.info("listening on %s:%s with %d connection shards", host, port, len(self.pairs))
        self.send(sender, Listening(host, port))

    def _start_pair(self, index):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        # createActor forks: the child inherits every fd of ours; it closes what is not its own.
        close = [self.sock.fileno(), ours.fileno()] + [p.handoff.fileno() for p in self.pairs if p]
        address = self.createActor("actorbroker.actors.connection.ConnectionActor")
        self.send(address, connection.StartConnections(theirs.fileno(), tuple(close), index,
                                                       self.config, self.broker, self.myAddress))
        theirs.close()
        self.pairs[index] = _Pair(address, ours)

    def on_WatchMessage(self, msg, sender):
        if self.sock is None or self.sock.fileno() not in msg.ready:
            return
        self._accept()

    def _accept(self):
        for _ in range(256):  # a burst of clients, but let other messages in between
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed: %s", exc)
                    return
                raise
            if not self._hand_over(conn, peer[0]):
                self.held = (conn, peer[0], time.monotonic())
                self.wakeupAfter(timedelta(seconds=HANDOFF_RETRY_S), payload=_HANDOFF)
                return

    def on_WakeupMessage(self, msg, sender):
        if isinstance(msg.payload, tuple) and msg.payload[0] == "recount":
            self._recounted(msg.payload[1])
            return
        if msg.payload != _HANDOFF or self.held is None:
            return
        conn, host, since = self.held
        if self.sock is None or time.monotonic() - since > HOLD_AT_MOST_S:
            self.held = None
            with conn:
                self._refuse(conn, "no connection shard is taking connections")
        elif self._hand_over(conn, host):
            self.held = None
        else:
            self.wakeupAfter(timedelta(seconds=HANDOFF_RETRY_S), payload=_HANDOFF)
            return
        if self.sock is not None:
            self._accept()

    def _hand_over(self, conn, host, recounted=False):
        """Hand the socket to the next shard (or refuse it); False if every shard's handoff
        socket is full for now (busy shards): the caller holds it and tries again shortly,
        rather than refusing a client for a moment of load."""
        pairs = [p for p in self.pairs if p]
        if sum(p.load() for p in pairs) >= self.config.max_connections:
            # as for one host below: one that has just closed no longer counts
            if not recounted and self._recount(conn, None):
                return True
            if recounted:
                self.refused_at[None] = time.monotonic()
            with conn:
                self._refuse(conn, f"too many connections (max_connections {self.config.max_connections})")
            return True
        if sum(p.from_host(host) for p in pairs) >= self.config.max_connections_per_address:
            if not recounted and self._recount(conn, host):
                return True   # held until the shards have counted that host's connections again
            if recounted:
                if len(self.refused_at) > 4096:
                    self.refused_at.clear()
                self.refused_at[host] = time.monotonic()
            with conn:
                self._refuse(conn, f"too many connections from {host} "
                                   f"(max_connections_per_address {self.config.max_connections_per_address})")
            return True
        full = False
        for _ in range(len(self.pairs)):
            pair = self.pairs[self.turn % len(self.pairs)]
            self.turn += 1
            if pair is None:
                continue
            try:
                socket.send_fds(pair.handoff, [HANDOFF_TAG.pack(pair.seq + 1)], [conn.fileno()])
            except (BlockingIOError, InterruptedError):
                full = True
                continue   # that shard has not taken the ones before yet: try the next
            except OSError:
                continue   # that shard is gone (being restarted): try the next
            pair.hand(host)
            conn.close()   # the shard has its own descriptor of it now
            return True
        if full:
            return False
        with conn:
            self._refuse(conn, "no connection shard available")
        return True

    def _recount(self, conn, host):
        """Hold `conn` while the shards counting connections from `host` (None: from anywhere)
        recount them (their last report may be up to 100 ms old: a connection closed since still
        counts there); False if it is to be refused at once."""
        token = self.recounting.get(host)
        if token is not None:   # a recount of that host is under way: wait for it too
            held = self.recounts[token][3]
            if len(held) >= RECOUNT_HOLD_MAX:
                return False
            held.append(conn)
            return True
        if time.monotonic() - self.refused_at.get(host, float("-inf")) < RECOUNT_EVERY_S:
            return False   # refused a moment ago after a recount: a client insisting
        counting = [index for index, pair in enumerate(self.pairs)
                    if pair is not None and (pair.load() if host is None else pair.from_host(host))]
        asked = {index for index in counting if self.pairs[index].shard is not None}
        new = set(counting) - asked   # a shard just started: asked once it has reported
        if not counting:
            return False
        token = self.next_recount
        self.next_recount += 1
        self.recounts[token] = (host, asked, new, [conn])
        self.recounting[host] = token
        for index in asked:
            self.send(self.pairs[index].shard, RecountHost(host, token))
        self.wakeupAfter(timedelta(seconds=RECOUNT_TIMEOUT_S), payload=("recount", token))
        return True

    def _recounted(self, token):
        """Every shard asked has answered (or the time is up): the held sockets go on."""
        recount = self.recounts.pop(token, None)
        if recount is None:
            return
        host, _, _, held = recount
        del self.recounting[host]
        for conn in held:
            if self.sock is None:   # stopping
                conn.close()
            elif not self._hand_over(conn, host, recounted=True):
                if self.held is None:   # every shard's handoff full: as _accept
                    self.held = (conn, host, time.monotonic())
                    self.wakeupAfter(timedelta(seconds=HANDOFF_RETRY_S), payload=_HANDOFF)
                else:
                    with conn:
                        self._refuse(conn, "no connection shard is taking connections")

    @staticmethod
    def _refuse(conn, text):
        try:  # a fresh socket's send buffer is empty: this small write does not block
            conn.setblocking(False)
            conn.send(error_frame(E.OVERLOADED, text))
        except OSError:
            pass

    def on_ShardLoad(self, msg, sender):
        pair = self.pairs[msg.index] if msg.index < len(self.pairs) else None
        if pair is not None:
            pair.reported(msg)
            pair.shard = sender
        for token, (host, asked, new, _) in list(self.recounts.items()):
            if token == msg.recount:
                asked.discard(msg.index)
            elif msg.index in new:   # a new shard's first report: now it can be asked
                new.discard(msg.index)
                asked.add(msg.index)
                self.send(sender, RecountHost(host, token))
            if not asked and not new:
                self._recounted(token)

    def on_CountConnections(self, msg, sender):
        shards = [pair.open for pair in self.pairs if pair is not None]
        frame = dict(msg.frame, connections=sum(shards), shards=shards)
        self.send(msg.reply_to, connection.RequestDone(msg.rid, frame))

    def on_NodeLoadRequest(self, msg, sender):
        self.send(sender, cluster.ConnectionCount(sum(p.load() for p in self.pairs if p is not None)))

    def on_NodeLost(self, msg, sender):
        for pair in self.pairs:
            if pair is not None:
                self.send(pair.address, msg)

    def operability_children(self):
        return [pair.address for pair in self.pairs if pair is not None]

    def on_ChildActorExited(self, msg, sender):
        # delivered once or twice: only a pair still registered under that address restarts
        for index, pair in enumerate(self.pairs):
            if pair is not None and pair.address == msg.childAddress:
                pair.handoff.close()
                self.pairs[index] = None
                if not self.exiting:
                    log.warning("connection actor %d exited; restarting it with a new shard", index)
                    self._start_pair(index)

    def on_StopClients(self, msg, sender):
        if self.sock is not None:   # no new connection from now on
            self.sock.close()
            self.sock = None
        if self.held is not None:
            self.held[0].close()
            self.held = None
        for token in list(self.recounts):
            self._recounted(token)   # closes the sockets held: no socket to listen on any more
        self.stop_asker = sender
        pairs = [p for p in self.pairs if p is not None]
        self.stops_waited = len(pairs)
        for pair in pairs:
            self.send(pair.address, msg)
        if not pairs:
            self.send(sender, ClientsStopped())

    def on_ClientsStopped(self, msg, sender):
        self.stops_waited -= 1
        if self.stops_waited == 0 and self.stop_asker is not None:
            self.send(self.stop_asker, msg)
            self.stop_asker = None

    def on_ActorExitRequest(self, msg, sender):
        self.exiting = True
        if self.sock is not None:
            self.sock.close()
            self.sock = None
