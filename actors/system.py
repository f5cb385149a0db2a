"""Starting and stopping the Thespian actor system the broker runs in.

Thespian's multiprocTCPBase binds the admin and every actor socket to 0.0.0.0 and unpickles what
arrives on them, so anyone who can reach those ports can run code in the broker. We bind them to
one interface instead (127.0.0.1 unless the user configures a multi-host convention) by patching
the address class before the system starts; the admin and every actor are forked from a process
that carries the patch, so they all inherit it. Every packet on those sockets is also signed with
the broker's secret (actors/signing.py): each process that talks to the system installs the
signing before its first message; processes started by exec get the secret on their stdin.
"""
import argparse
import os
import socket
import subprocess
import sys
import time

from actorbroker.actors import signing

SYSTEM_BASE = "multiprocTCPBase"
BIND_ENV = "ACTORBROKER_BIND_HOST"
ADMIN_PORT_TAKEN = 75   # exit status of the system starter when its admin port is in use


def bind_actor_sockets_to(host):
    """Make every Thespian socket of this process (and of processes forked from it) bind `host`."""
    from thespian.system.transport import IPBase
    os.environ[BIND_ENV] = host
    os.environ["THESPIAN_BASE_IPADDR"] = host  # the address actors advertise to each other
    if getattr(IPBase.IPActorAddress, "_actorbroker_patched", False):
        return
    original_init = IPBase.IPActorAddress.__init__

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if self.bindname and self.bindname[0] in ("", "0.0.0.0"):
            self.bindname = (os.environ.get(BIND_ENV, "127.0.0.1"),) + tuple(self.bindname[1:])

    IPBase.IPActorAddress.__init__ = __init__
    IPBase.IPActorAddress._actorbroker_patched = True
    keep_trailing_messages()
    forget_watch_on_exit()
    scan_for_expired_transmits_rarely()
    describe_messages_briefly()
    drain_queued_transmits_on_exit()


class _PacketWithTrailer(tuple):
    """A received (sender, message) packet that also carries the bytes read after it."""
    trailing = b""


def keep_trailing_messages():
    """Work around a Thespian 4.0.1 bug that loses messages between actors.

    When a read on a reused actor-to-actor socket returns one whole message and the start of the
    next, TCPTransport._addedDataToIncoming feeds the *decoded first message* instead of the
    trailing bytes to the buffer of the next one, which then fails and is discarded ("discarding
    bad incoming trailing data", logged below WARNING): the second message is silently lost.
    Seen here as a dispatcher that stopped receiving for good under fan-out load. The patch lets
    that call receive the trailing bytes after all; it changes nothing when there are none."""
    from thespian.system.transport import TCPTransport, streamBuffer
    buffer_class = streamBuffer.ReceiveBuffer
    if getattr(buffer_class, "_actorbroker_patched", False):
        return
    completed = buffer_class.completed

    def completed_with_trailer(self):
        result = completed(self)
        if result is not None and result[1] and isinstance(result[0], tuple):
            packet = _PacketWithTrailer(result[0])
            packet.trailing = result[1]
            return packet, result[1]
        return result

    incoming_class = TCPTransport.TCPIncoming_Common
    add_data = incoming_class.addData

    def add_data_or_trailer(self, new_data):
        if isinstance(new_data, _PacketWithTrailer):   # the buggy call: use what followed it
            new_data = new_data.trailing
        return add_data(self, new_data)

    buffer_class.completed = completed_with_trailer
    incoming_class.addData = add_data_or_trailer
    buffer_class._actorbroker_patched = True


def forget_watch_on_exit():
    """Work around Thespian 4.0.1 watching closed fds after an ActorExitRequest.

    Thespian replaces an actor's ThespianWatch list after every message but ActorExitRequest, so
    the fds an actor closes when asked to exit (a shard's epoll) stay in its select list while it
    drains its last sends. A socket opened for one of those sends can get the same fd number:
    the selector refuses to register it twice (KeyError), the drain fails, and the process tree
    is not shut down (seen about once in 20 start-and-SIGTERM runs of serve)."""
    from thespian.system.actorManager import ActorManager
    if getattr(ActorManager, "_actorbroker_patched", False):
        return
    actor_exit = ActorManager._actorExit

    def _actorExit(self, exit_request):
        if hasattr(self.transport, "set_watch"):
            self.transport.set_watch([])
        return actor_exit(self, exit_request)

    ActorManager._actorExit = _actorExit
    ActorManager._actorbroker_patched = True


EXPIRY_SCAN_S = 0.5   # how often queued transmits are checked for their (5-minute) deadline


def drain_queued_transmits_on_exit():
    """Work around Thespian 4.0.1 dropping the sends an exiting actor has queued.

    An actor has at most 20 transmits in progress; the rest wait in a queue, which is fed as
    transmits complete, except while the completing thread holds the transport (the run loop
    does): then the queue waits for the next pass. An exiting actor's last pass ends once
    nothing is in progress, and the queue was never sent: a SubscriptionActor that refused 16
    subscribes at once (CONSUMER_BUSY) and was then ended left some of them unanswered (the
    client got INTERNAL after 30 s). After Thespian's own drain, what is queued is submitted
    and drained too, while they make progress."""
    from thespian.system import systemCommon
    from datetime import timedelta
    from thespian.system.transport import TransmitOnly
    base = systemCommon.systemCommonBase
    if getattr(base, "_actorbroker_drain_patched", False):
        return
    drain = base.drainTransmits

    def drainTransmits(self):
        drain(self)
        transport = self.transport
        left, since = _transmits_left(transport), time.monotonic()
        while left and time.monotonic() - since < DRAIN_STALL_S:
            while transport._canSendNow() and transport._runQueued():
                pass
            transport.run(TransmitOnly, timedelta(milliseconds=50))
            now_left = _transmits_left(transport)
            if now_left < left:   # progress: a receiver that is there takes them in milliseconds
                since = time.monotonic()
            left = now_left

    base.drainTransmits = drainTransmits
    base._actorbroker_drain_patched = True


DRAIN_STALL_S = 0.25   # an exiting actor stops sending when its transmits make no progress this long
                      # (a receiver that is gone too: Thespian would retry it for seconds)


def _transmits_left(transport):
    return len(getattr(transport, "_aTB_queuedPendingTransmits", ())) + getattr(transport, "_aTB_numPendingTransmits", 0)


def scan_for_expired_transmits_rarely():
    """Work around Thespian 4.0.1 scanning its whole queue of waiting transmits on every send.

    An actor has at most 20 transmits in progress; the rest wait in a queue, and before each
    send and each completed transmit Thespian partitions that queue into expired and valid ones
    (deadline: 5 minutes). Once a burst of control messages (thousands of clients subscribing at
    once) fills the queue, every send costs time in proportion to it: the actor spends most of
    its CPU on those scans, answers later, so queues grow further, and set-up collapsed from
    ~900 to ~80 connections/s. Checking the deadlines at most every EXPIRY_SCAN_S keeps each
    send O(1); an expired transmit fails at most that much later than its 5 minutes."""
    from thespian.system.transport import asyncTransportBase
    base = asyncTransportBase.asyncTransportBase
    if getattr(base, "_actorbroker_patched", False):
        return
    complete_expired = base._complete_expired_intents

    def _complete_expired_intents(self):
        now = time.monotonic()
        if now < getattr(self, "_actorbroker_next_expiry_scan", 0.0):
            return len(self._aTB_queuedPendingTransmits), False
        self._actorbroker_next_expiry_scan = now + EXPIRY_SCAN_S
        return complete_expired(self)

    base._complete_expired_intents = _complete_expired_intents
    base._actorbroker_patched = True


def describe_messages_briefly():
    """Work around Thespian 4.0.1 formatting every message it sends or receives.

    TransmitIntent.identify and ReceiveEnvelope.identify build `str(message)` (then cut it to 150
    characters) for debug log lines that are dropped: for a batch of 10,000 detaches, or the
    stats of 10,000 consumers, that repr cost more than everything else the actor did with it
    (seen as the dispatcher's top cost while 10,000 connections closed). The description now
    names the message's type, not its contents."""
    from thespian.system import transport
    if getattr(transport.TransmitIntent, "_actorbroker_patched", False):
        return

    def intent_identify(self):
        return "TransportIntent(%s-%s-%s)" % (self.targetAddr, "pending" if self.result is None else
                                              "=" + str(self.result), type(self.message).__name__)

    def envelope_identify(self):
        return "ReceiveEnvelope(from: %s, %s)" % (self.sender, type(self.message).__name__)

    transport.TransmitIntent.identify = intent_identify
    transport.ReceiveEnvelope.identify = envelope_identify
    transport.TransmitIntent._actorbroker_patched = True


def thespian_waits(actor):
    """For a record-path actor's Reactor (`Reactor.outside`): a callable telling what this
    process's Thespian loop (multiprocTCPBase's TCPTransport) would wait on, so that the actor can
    idle in its own epoll, woken directly by its lanes, and still return to Thespian the moment
    that loop has work: None when it has some now (messages received but not yet handled,
    transmits in progress or queued, completions to run, expired timers, the actor exiting); else
    (its sockets, seconds until its next timer). Its listening socket is among those sockets, and
    a signal handler wakes that loop by connecting to it, so a ChildActorExited is not delayed
    either; nor is what the actor itself has waiting in its ordered channels (a lazy event). Returns
    None for another system base (then the Reactor lingers as before)."""
    transport = getattr(getattr(actor, "_myRef", None), "transport", None)
    if transport is None or not hasattr(transport, "_incomingSockets") or not hasattr(transport, "run_time"):
        return None
    from thespian.system.timing import currentTime, timePeriodSeconds

    def waits():
        t = transport
        if (t._incomingEnvelopes or t._transmitIntents or t._waitingTransmits or t._finished_intents
                or t._activeWakeups or getattr(t, "_aTB_queuedPendingTransmits", None)
                or hasattr(t, "_aborting_run")):
            return None
        now = currentTime()
        due = t.run_time._time_to_quit   # the earliest wakeup (wakeupAfter), or None
        seconds = float("inf") if due is None else due - now
        if t._pendingWakeups and t._pendingWakeups[0][0]._time_to_quit is not None:
            seconds = min(seconds, t._pendingWakeups[0][0]._time_to_quit - now)
        outbox = getattr(actor, "_outbox", None)
        if outbox:   # ordered sends waiting to go when this handler ends (BrokerActor): their due time
            lazy_due, clock = actor._lazy_due, time.monotonic()
            seconds = min(seconds, min(lazy_due.get(stream, clock) for stream in outbox) - clock)
        if seconds <= 0:
            return None
        fds = [t.socket.fileno()]
        for fd, incoming in t._incomingSockets.items():
            fds.append(fd)
            seconds = min(seconds, timePeriodSeconds(incoming.delay(now)))
        for open_socket in getattr(t, "_openSockets", {}).values():
            fd = open_socket.socket.fileno()
            if fd >= 0:
                fds.append(fd)
        return fds, seconds

    return waits


def close_starter_socket_in_children():
    """Keep the starting process's own Thespian socket out of the admin and every actor.

    The process that calls ActorSystem() first listens on a socket of its own, then forks the
    admin, which forks every actor: all of them inherit that socket, and none ever reads it, so
    connections to it would queue there for the life of the broker. Closing the inherited copy in
    each forked child leaves the starter's own copy working."""
    from thespian.system.transport import ExternalInterfaceTransportInit, TCPTransport
    transport_class = TCPTransport.TCPTransport
    original_init = transport_class.__init__

    def __init__(self, init_type, *args):
        original_init(self, init_type, *args)
        if isinstance(init_type, ExternalInterfaceTransportInit):
            os.register_at_fork(after_in_child=self.socket.close)   # a no-op once closed

    transport_class.__init__ = __init__


def capabilities(admin_port, node="", join=None):
    """A cluster node names itself; the leader says so; the others name the leader to join."""
    caps = {"Admin Port": admin_port}
    if node:
        from actorbroker.actors import cluster
        caps[cluster.NODE_CAPABILITY] = node
        caps[cluster.LEADER_CAPABILITY] = not join
    if join:
        caps["Convention Address.IPv4"] = join
    return caps


def host_port(text):
    """"host:port" -> (host, port)."""
    host, _, port = text.rpartition(":")
    return host, int(port)


def log_defs(log_path, level="INFO", log_format="text"):
    """Thespian applies these in its logger process: actors' `logging` calls land in log_path,
    as text lines or JSON objects (actors/logformat.py)."""
    return {
        "version": 1,
        "formatters": {"text": {"format": "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"},
                       "json": {"()": "actorbroker.actors.logformat.JsonFormatter"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": log_path,
                              "formatter": log_format, "level": level}},
        "root": {"handlers": ["file"], "level": level},
    }


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_system_process(admin_port, host, data_dir, secret, log_level="INFO", node="", join="",
                         log_format="text"):
    """Start the admin from a short-lived child whose only open files are the broker log.

    The admin daemonizes and inherits every fd of the process that starts it; starting it from
    a clean child keeps the caller's stdout (a terminal, a test's pipe) out of the actor tree.
    The secret goes through the child's stdin: never in its arguments or environment.
    """
    log_path = os.path.join(data_dir, "broker.log")
    env = dict(os.environ, THESPLOG_FILE=os.path.join(data_dir, "thespian.log"),
               THESPLOG_FILE_MAXSIZE=str(4 * 1024 * 1024), ACTORBROKER_LOG_LEVEL=log_level)
    with open(log_path, "ab") as log_file:
        subprocess.run(
            [sys.executable, "-m", "actorbroker.actors.system", "--admin-port", str(admin_port),
             "--host", host, "--log", log_path, "--log-level", log_level, "--node", node,
             "--join", join, "--log-format", log_format],
            input=secret, stdout=log_file, stderr=log_file, env=env,
            cwd=os.getcwd(), check=True, timeout=60, close_fds=True)


def connect_system(admin_port, host, secret):
    from thespian.actors import ActorSystem
    bind_actor_sockets_to(host)
    signing.install(secret)
    return ActorSystem(SYSTEM_BASE, capabilities(admin_port))


def _secret_from_stdin():
    """The secret the starting process wrote to our stdin; stdin is then /dev/null again."""
    secret = sys.stdin.buffer.read()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    if len(secret) < signing.MIN_SECRET_BYTES:
        sys.exit("actorbroker.actors.system reads the cluster secret from its stdin")
    return secret


def _start_main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--admin-port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--log")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    parser.add_argument("--node", default="", help="cluster: this node's name")
    parser.add_argument("--join", default="", help="cluster: the leader's HOST:PORT (none: we lead)")
    args = parser.parse_args()
    from actorbroker.actors.process import name_process
    name_process("ab-admin")   # inherited by the admin and the logger Thespian forks from here
    close_starter_socket_in_children()
    bind_actor_sockets_to(args.host)
    signing.install(_secret_from_stdin())
    from thespian.actors import ActorSystem
    # ActorSystem() joins whatever admin already listens on the port: another broker's, if a port
    # chosen free a moment ago was taken meanwhile (two test runs at once). Refuse instead, so
    # that serve picks another.
    try:
        socket.create_connection((args.host, args.admin_port), timeout=0.5).close()
        sys.exit(ADMIN_PORT_TAKEN)
    except OSError:
        pass
    caps = capabilities(args.admin_port, args.node, host_port(args.join) if args.join else None)
    from thespian.actors import InvalidActorAddress
    try:
        ActorSystem(SYSTEM_BASE, caps, logDefs=log_defs(args.log, args.log_level, args.log_format))
    except InvalidActorAddress:
        # Taken between that check and Thespian's bind, by a socket that refused our signed
        # hello (another process's): Thespian then starts no admin. serve picks another port.
        sys.exit(ADMIN_PORT_TAKEN)


if __name__ == "__main__":
    _start_main()
