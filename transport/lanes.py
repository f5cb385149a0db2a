"""Lanes: stream sockets between broker actors, for the record path.

Thespian pickles every message, acknowledges each one and keeps one in flight per pair of actors
(about a millisecond a hop here). Record batches instead travel over lanes: a stream socket owned
by the two actors at its ends, carrying length-prefixed msgpack arrays (the frame header of the
client protocol, `transport.codec`), in order, with no acknowledgement of its own. A lane is set
up by a Thespian message exchange (the listening side announces its `LaneAddress`), and its end
is a failure signal: EOF or an error on a lane means the actor at the other end is gone.

A `Reactor` is an epoll of the actor's own. The actor hands Thespian only the epoll's fd
(`ThespianWatch([reactor.fileno()])`): Thespian rebuilds its selector on every loop, so watching
thousands of sockets through it costs O(n) per wakeup; one epoll fd costs O(1), and epoll also
reports writability, which ThespianWatch does not.

Unix lanes are abstract sockets: they have no file permissions, and their names are listed in
/proc/net/unix for every local user. A lane accepted from a process of another user is closed
before a byte of it is read (SO_PEERCRED). TCP lanes (several hosts) are authenticated when the
hub has the broker's secret: the accepting side sends a random challenge, the connecting side
must answer it with an HMAC-SHA256 under the secret before its first frame, and a lane that does
not is closed unread. That keeps strangers out; it does not hide the records from whoever can
read the cluster network, which must stay private (docs/security.md).
"""
import errno
import hashlib
import hmac
import os
import select
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass

import logging

import msgpack

log = logging.getLogger("actorbroker")

READ_SIZE = 256 * 1024
MAX_LANE_FRAME = 64 * 1024 * 1024   # lanes carry whole batches: bounded, but well above max_frame
_HEADER = struct.Struct(">I")
RELAY_ABOVE = 256   # fds in a Reactor beyond which Thespian watches a relay pipe, not the epoll
IDLE_WAIT_S = 0.001  # a lingering poll returns to Thespian after this long without an event
RECORD_PATH_LINGER_S = 0.005   # the linger of the actors on the record path (see Reactor)
MAX_IDLE_S = 0.5     # an idle wait asks `outside` again after this long (see Reactor._idle)
_pack = msgpack.Packer(use_bin_type=True).pack

IN, OUT = select.EPOLLIN, select.EPOLLOUT
_ERR = select.EPOLLERR | select.EPOLLHUP
CHALLENGE_BYTES = 16
PROOF_BYTES = 32
_PROOF_CONTEXT = b"actorbroker lane v1:"


def lane_proof(secret, challenge):
    return hmac.new(secret, _PROOF_CONTEXT + challenge, hashlib.sha256).digest()


@dataclass(frozen=True)
class LaneAddress:
    """Where an actor accepts lanes: ("unix", abstract name) on one host, ("tcp", host, port)
    between hosts. Plain data: it travels in Thespian messages."""
    kind: str
    host: str
    port: int = 0
    name: str = ""


class Reactor:
    """An epoll and, per fd, a handler object with `on_event(events)`.

    `fileno()` is what the actor hands Thespian to watch. Thespian builds a new selector on every
    loop and adds each watched fd to it; adding an epoll fd to another epoll makes the kernel walk
    every item of the nested one (its loop check), so an epoll holding thousands of sockets costs
    that much on every loop. With `relay=True` (the shards), once the reactor holds RELAY_ABOVE
    fds, a thread of its own waits on the epoll instead and signals a pipe, which is what Thespian
    watches; the actor calls `poll()` and then, when done, the thread waits again.

    `linger` (seconds): after handling what is ready, `poll()` keeps waiting on the epoll itself
    for more, as long as something arrives within a millisecond, up to `linger` in all, before it
    returns to Thespian. A pass through Thespian's loop (selector rebuilt, timers, its own
    sockets) costs far more CPU than an epoll wait, and a stream of lane frames would otherwise
    pay one pass per frame; Thespian messages to the actor wait at most `linger` meanwhile, and
    messages from it not at all (an actor that sent one stops lingering: `quiet`).

    `outside` (set by the owner, optional) makes the end of the linger an idle wait: a callable
    returning None when the owner's other loop (Thespian's) has work now, else `(fds, seconds)`:
    the fds that loop waits on and how long until its next timer. When no frame came within a
    millisecond (or the linger is over), the poll waits for a lane or a socket of its own *or*
    one of those fds, up to that long: a frame arriving at an idle actor wakes it here directly
    (one epoll wait) instead of through a pass of Thespian's loop (measured here: 0.14 ms against
    0.42 ms from a write to the handler), and the moment Thespian has something to do (a
    message, a signal's wakeup, a timer), it returns. The millisecond of plain waiting first
    keeps the idle wait's set-up (Thespian's fds added to an epoll) off a steady stream: with
    the idle wait right after every frame, latency at 1,000 msg/s was 0.1 ms worse at p50.
    """

    def __init__(self, relay=False, linger=0.0):
        self.linger = linger
        self.epoll = select.epoll()
        self.handlers = {}
        self.masks = {}
        self.relay = None
        self.relaying = False
        self.outside = None
        self._outer = None        # an epoll of the outside fds, in ours only during an idle wait
        self._outer_fds = set()
        if relay:
            self.relay_r, self.relay_w = os.pipe()
            os.set_blocking(self.relay_r, False)
            self.armed = threading.Event()
            self.relay = threading.Thread(target=self._relay, name="epoll-relay", daemon=True)
            self.relay.start()

    def fileno(self):
        """The fd to hand Thespian now (called after every message: the choice may change). Below
        RELAY_ABOVE fds the epoll itself: its walk is cheap, and a thread in the path costs
        latency (it must win the GIL back from a busy actor, up to Python's 5 ms switch
        interval)."""
        if self.relay is not None and len(self.handlers) >= RELAY_ABOVE:
            if not self.relaying:
                self.relaying = True
                self.armed.set()
            return self.relay_r
        self.relaying = False
        return self.epoll.fileno()

    def _relay(self):
        while True:
            self.armed.wait()
            self.armed.clear()
            try:
                while not self.epoll.poll(-1, 1):
                    pass
                os.write(self.relay_w, b"!")
            except (OSError, ValueError):   # closed: the actor is exiting
                return

    def add(self, fd, handler, mask=IN):
        self.handlers[fd] = handler
        self.masks[fd] = mask
        self.epoll.register(fd, mask)

    def set_mask(self, fd, mask):
        if fd in self.masks and self.masks[fd] != mask:
            self.masks[fd] = mask
            self.epoll.modify(fd, mask)

    def remove(self, fd):
        if self.handlers.pop(fd, None) is not None:
            del self.masks[fd]
            try:
                self.epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def poll(self, max_events=1024, quiet=None):
        """Handle what is ready now; then linger (see the class) while quiet() says that the actor
        has nothing for Thespian to send."""
        if self.relay is not None:
            try:
                os.read(self.relay_r, 64)
            except BlockingIOError:
                pass
        try:
            ready = self.epoll.poll(0, max_events)
            deadline = None
            outside_ready = False
            while ready:
                for fd, events in ready:
                    handler = self.handlers.get(fd)
                    if handler is not None:
                        handler.on_event(fd, events)
                if not self.linger or (quiet is not None and not quiet()) or outside_ready:
                    break
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.linger
                if now < deadline:   # a stream of frames: the next one comes within a millisecond
                    ready = self.epoll.poll(min(IDLE_WAIT_S, deadline - now), max_events)
                    if ready:
                        continue
                ready, outside_ready = self._idle(max_events)
                if ready is None:
                    break
                deadline = None
        finally:
            if self.relaying:
                self.armed.set()   # the relay may wait for the next readiness now

    def _idle(self, max_events):
        """The idle wait, for as long as the outside loop has nothing to do: in steps of at most
        MAX_IDLE_S, each asking the outside loop again (its sockets and timers may have changed).
        An actor that went back to Thespian's loop after a fixed time instead was woken by its
        next frame through a pass of that loop: a message after 0.6 s of quiet took 2.1 ms from
        producer to consumer against 1.2 ms after 0.2 s. (None, False): the outside loop has work."""
        while True:
            waits = self.outside() if self.outside is not None else None
            if waits is None:
                return None, False
            fds, seconds = waits
            ready, outside_ready = self._idle_wait(fds, min(seconds, MAX_IDLE_S), max_events)
            if ready or outside_ready or seconds <= MAX_IDLE_S:
                return ready, outside_ready

    def _idle_wait(self, fds, timeout, max_events):
        """Wait for our fds or the outside ones: (what is ready of ours, whether an outside fd is
        ready). Nothing ready of ours: return to the outside loop (its fd is ready, or its timer
        is due)."""
        if timeout <= 0:
            return [], False
        if self._outer is None:
            self._outer = select.epoll()
        outer = self._outer
        fds = set(fds)
        for fd in self._outer_fds - fds:
            try:
                outer.unregister(fd)
            except (OSError, ValueError):
                pass
        for fd in fds:   # every time: a closed fd left the epoll by itself, and its number returns
            try:
                outer.register(fd, IN)
            except FileExistsError:
                pass
            except (OSError, ValueError):   # closed meanwhile: the outside loop will see to it
                return [], True
        self._outer_fds = fds
        outer_fd = outer.fileno()
        self.epoll.register(outer_fd, IN)
        try:
            ready = self.epoll.poll(timeout, max_events)
        finally:
            self.epoll.unregister(outer_fd)
        ours = [(fd, events) for fd, events in ready if fd != outer_fd]
        return ours, len(ours) != len(ready)

    def close(self):
        if self._outer is not None:
            self._outer.close()
        self.epoll.close()
        if self.relay is not None:
            self.armed.set()
            os.close(self.relay_w)


def encode_lane_frame(obj):
    body = _pack(obj)
    return _HEADER.pack(len(body)) + body


class Lane:
    """One end of a lane. `on_frame(lane, frame)` and `on_closed(lane, reason)` are the owner's."""
    __slots__ = ("hub", "sock", "fd", "inbuf", "outbuf", "peer", "closed", "auth", "challenge")

    def __init__(self, hub, sock, peer=None):
        self.hub, self.sock, self.fd = hub, sock, sock.fileno()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.peer = peer          # whatever the owner wants to remember about the other end
        self.closed = False
        # authenticated TCP lanes: "challenged" (connecting: wait for the challenge, send nothing),
        # "proving" (accepted: wait for the proof, read nothing else); None once done or unneeded
        self.auth = None
        self.challenge = b""

    def send(self, obj):
        """Queue one frame and write what the socket takes now; the rest goes when writable.
        A write that fails here (the peer died) is reported by the lane's next event, never from
        inside send: the sender's own bookkeeping around a send (a PUBLISH recorded as in flight
        right after it) must not be cut in half by its on_closed handler."""
        if self.closed:
            return
        self.outbuf += encode_lane_frame(obj)
        self.flush(report=False)

    def flush(self, report=True):
        if self.auth == "challenged":
            self._update_mask()
            return   # nothing goes before the answer to the challenge
        while self.outbuf and not self.closed:
            try:
                sent = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if report:
                    self.hub._lost(self, f"write: {exc}")
                    return
                break   # still OUT in the mask: the next poll reports it (flush again, or EOF)
            del self.outbuf[:sent]
        self._update_mask()

    def _update_mask(self):
        if not self.closed:
            self.hub.reactor.set_mask(self.fd, IN | (OUT if self.outbuf else 0))

    def on_event(self, fd, events):
        if events & OUT:
            self.flush()
        if self.closed:
            return
        if events & (IN | _ERR):
            self._read()

    def _read(self):
        got = 0
        while got < READ_SIZE * 4:
            try:
                data = self.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.hub._lost(self, f"read: {exc}")
                return
            if not data:
                self.hub._deliver(self)
                self.hub._lost(self, "eof")
                return
            self.inbuf += data
            got += len(data)
            if len(data) < READ_SIZE:
                break
        self.hub._deliver(self)

    def frames(self):
        """Whole frames received so far (the partial tail stays)."""
        buf, pos, out = self.inbuf, 0, []
        end = len(buf)
        while end - pos >= 4:
            (n,) = _HEADER.unpack_from(buf, pos)
            if n > MAX_LANE_FRAME:
                raise ValueError(f"lane frame of {n} bytes")
            if end - pos - 4 < n:
                break
            out.append(msgpack.unpackb(buf[pos + 4:pos + 4 + n], raw=False, strict_map_key=False,
                                       use_list=True))
            pos += 4 + n
        if pos:
            del buf[:pos]
        return out


def same_user(conn):
    """Whether the process at the other end of a Unix socket runs as our own user."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.geteuid()


class LaneHub:
    """An actor's lanes: the listening socket others connect to, and the lanes themselves.

    on_frame(lane, frame): a frame that arrived on a lane (in order). An exception it raises is
        logged and counted (`frame_errors`) and the next frame is handled all the same: one bad
        frame must not lose the frames read with it.
    on_closed(lane, reason): the lane ended (EOF or error): the actor at its other end is gone,
        or closed it; called once per lane.
    """

    def __init__(self, reactor, on_frame, on_closed, kind="unix", host="127.0.0.1", secret=None):
        self.reactor = reactor
        self.on_frame, self.on_closed = on_frame, on_closed
        self.frame_errors = 0
        self.refused_peers = 0   # unix lanes of another user's process, TCP lanes without the proof
        self.secret = secret     # the broker's secret: TCP lanes prove they know it
        self.kind, self.host = kind, host
        self.listener = None
        self.address = None
        self.lanes = {}          # fd -> Lane

    # --- listening ------------------------------------------------------------------------------
    def listen(self):
        if self.kind == "unix":
            name = f"\0actorbroker-lane-{uuid.uuid4().hex}"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(name)
            self.address = LaneAddress("unix", socket.gethostname(), name=name)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, 0))
            self.address = LaneAddress("tcp", self.host, sock.getsockname()[1])
        sock.listen(512)
        sock.setblocking(False)
        self.listener = sock
        self.reactor.add(sock.fileno(), self)
        return self.address

    def on_event(self, fd, events):   # the listening socket
        for _ in range(64):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return
                raise
            if self.kind == "unix" and not same_user(conn):
                self._refused("a lane from another user's process")
                conn.close()
                continue
            lane = self._adopt(conn)
            if self.secret is not None and self.kind == "tcp":
                lane.auth, lane.challenge = "proving", os.urandom(CHALLENGE_BYTES)
                lane.outbuf += lane.challenge
                lane.flush()

    def _refused(self, what):
        self.refused_peers += 1
        if self.refused_peers <= 20 or self.refused_peers % 1000 == 0:
            log.warning("refused %s (%d so far)", what, self.refused_peers)

    # --- connecting -----------------------------------------------------------------------------
    def connect(self, address, peer=None):
        """A lane to `address`; frames sent before the connection completes wait in its buffer.
        Raises OSError when nothing listens there any more (the peer is gone)."""
        if address.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = address.name
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (address.host, address.port)
        sock.setblocking(False)
        try:
            sock.connect(target)
        except (BlockingIOError, InterruptedError):
            pass   # TCP: completes later; the first write waits for writability
        except OSError:
            sock.close()
            raise   # the caller treats it as the peer being gone
        lane = self._adopt(sock, peer)
        if self.secret is not None and address.kind == "tcp":
            lane.auth = "challenged"
        return lane

    def _adopt(self, sock, peer=None):
        sock.setblocking(False)
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        lane = Lane(self, sock, peer)
        self.lanes[lane.fd] = lane
        self.reactor.add(lane.fd, lane, IN)
        return lane

    # --- events ---------------------------------------------------------------------------------
    def _deliver(self, lane):
        if lane.closed or (lane.auth is not None and not self._authenticate(lane)):
            return
        try:
            frames = lane.frames()
        except Exception as exc:   # a corrupt lane is a broken peer: end it like any other
            self._lost(lane, f"bad frame: {exc}")
            return
        for frame in frames:
            try:
                self.on_frame(lane, frame)
            except Exception:
                self.frame_errors += 1
                log.exception("a lane frame failed (op %r); going on with the next",
                              frame[0] if isinstance(frame, list) and frame else None)

    def _authenticate(self, lane):
        """The challenge and its answer, before any frame; False while it is not done."""
        buf = lane.inbuf
        if lane.auth == "challenged":
            if len(buf) < CHALLENGE_BYTES:
                return False
            challenge = bytes(buf[:CHALLENGE_BYTES])
            del buf[:CHALLENGE_BYTES]
            lane.auth = None
            lane.outbuf[:0] = lane_proof(self.secret, challenge)
            lane.flush()
            return not lane.closed
        if len(buf) < PROOF_BYTES:
            return False
        proof = bytes(buf[:PROOF_BYTES])
        del buf[:PROOF_BYTES]
        if not hmac.compare_digest(proof, lane_proof(self.secret, lane.challenge)):
            self._refused("a TCP lane without a valid proof of the broker's secret")
            self.close_lane(lane)   # never identified: nothing for the owner to clean up
            return False
        lane.auth = None
        return True

    def _lost(self, lane, reason):
        if not lane.closed:
            unproven = lane.auth == "proving"
            self.close_lane(lane)
            lane.outbuf.clear()
            if not unproven:   # a lane that never proved itself was never anyone's peer
                self.on_closed(lane, reason)

    def close_lane(self, lane):
        """Close our end on purpose: the peer sees EOF. on_closed is not called for it."""
        if lane.closed:
            return
        lane.closed = True
        self.reactor.remove(lane.fd)
        self.lanes.pop(lane.fd, None)
        try:
            lane.sock.close()
        except OSError:
            pass

    def close(self):
        for lane in list(self.lanes.values()):
            if lane.outbuf:
                try:
                    lane.sock.setblocking(True)
                    lane.sock.settimeout(0.2)
                    lane.sock.sendall(lane.outbuf)   # at exit only: last frames, bounded wait
                except OSError:
                    pass
            self.close_lane(lane)
        if self.listener is not None:
            self.reactor.remove(self.listener.fileno())
            self.listener.close()
            self.listener = None


class LaneOp:
    """The first element of every lane frame."""
    HELLO = 0         # [HELLO, ident]: first frame from the connecting side (a shard's ident)
    PUBLISH = 1       # shard -> topic: [PUBLISH, producer_id, producer_name, [[rid, count, payloads, keys, attrs, size]...]]
    RECEIPTS = 2      # topic -> shard: [RECEIPTS, producer_id, [[rid, first, count]...], [[rid, code, text]...]]
    DISPATCH = 3      # topic -> dispatcher: [DISPATCH, [run...]] (runs: transport/codec.py)
    DISPATCH_ACK = 4  # dispatcher -> topic: [DISPATCH_ACK]: the topic's window opens by one
    FLOW = 5          # shard -> dispatcher: [FLOW, consumer_id, credits]
    ACK = 6           # shard -> dispatcher: [ACK, consumer_id, ids, rid or None]
    NACK = 7          # shard -> dispatcher: [NACK, consumer_id, ids, delay_ms]
    DELIVER = 8       # dispatcher -> shard: [DELIVER, consumer_id, [run...]]
    DELIVER_ACK = 9   # shard -> dispatcher: [DELIVER_ACK, consumer_id]: buffered, send more
    REPLY = 10        # dispatcher -> shard: [REPLY, consumer_id, frame bytes, rid] (the answer to an ack)
    ENDED = 11        # dispatcher -> shard: [ENDED, consumer_id, reason]: the consumer is gone
    APPEND = 12       # topic -> log: [APPEND, seq, first offset, [run...], time_ms]
    APPENDED = 13     # log -> topic: [APPENDED, seq, log_bytes, segments, forced deletions]: durable (per --fsync)
    APPEND_FAILED = 14  # log -> topic: [APPEND_FAILED, seq, error, next offset, code]: nothing of it kept
    DETACH = 15       # shard -> dispatcher: [DETACH, consumer_id, time.time() the end was detected,
                      # connection_id?] (its consumer_detached event names the connection)
    READ = 16         # dispatcher -> log: [READ, token, offset, max records]
    RECORDS = 17      # log -> dispatcher: [RECORDS, token, [run...] from the offset asked, first retained offset]
    UNDELIVERED = 18  # shard -> dispatcher: [UNDELIVERED, consumer_id, [run...]]: a DELIVER for a consumer
                      # whose connection had ended (its DETACH went first): written nowhere
    PRODUCER_GONE = 19  # shard -> topic: [PRODUCER_GONE, producer_id]: its connection ended (after
                        # its last PUBLISH): an exclusive producer's place is free at once
    # 20: unused (a probe reaches the shard through the consumer's ConnectionActor)
    PROBED = 21       # shard -> dispatcher: [PROBED, consumer_id, token], the answer to a ProbeRoute:
                      # a consumer found not attached (hung up) has its DETACH ahead on the lane
    ROUTED = 22       # shard -> dispatcher: [ROUTED, consumer_id]: its `subscribed` (and first `active`)
                      # written; its `active` changes come over the lane from now on (ACTIVE)
    ACTIVE = 23       # dispatcher -> shard: [ACTIVE, consumer_id, flag]: write the `active` push,
                      # ahead of the records delivered after it (a Thespian message came after them)


__all__ = ["LaneAddress", "LaneOp", "Reactor", "Lane", "LaneHub", "encode_lane_frame"]
