"""`actorbroker serve`: start the actor system and the broker's actors, serve until a signal."""
import argparse
import dataclasses
import ipaddress
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from actorbroker.actors import signing
from actorbroker.actors.cluster import ROOT_GLOBAL_NAME
from actorbroker.actors.config import BrokerConfig
from actorbroker.actors.system import (ADMIN_PORT_TAKEN, connect_system, free_port, host_port,
                                      start_system_process)
from actorbroker.scripts import proctree
from actorbroker.transport.session import is_loopback

START_TIMEOUT_S = 30
PING_EVERY_S = 2.0
PING_TIMEOUT_S = 3.0
# After Thespian's shutdown, how long the actor processes get to end before serve kills them.
SHUTDOWN_GRACE_S = 10.0
# How long serve waits for every shard to have closed its client connections before the shutdown.
STOP_CLIENTS_TIMEOUT_S = 3.0


def say(*args, **kwargs):
    """print, for a process whose stdout or stderr may be a pipe nobody reads any more (a log
    collector that died, `serve | head -1`): the broker keeps serving, and a SIGTERM still stops
    it in order (clients closed, cursors saved) instead of dying of a BrokenPipeError on the way."""
    stream = kwargs.get("file") or sys.stdout
    try:
        print(*args, **kwargs)
    except (OSError, ValueError):   # BrokenPipeError is an OSError; ValueError: a closed file
        try:   # further writes (and the interpreter's flush at exit) go nowhere, quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass


def add_serve_command(subparsers):
    p = subparsers.add_parser("serve", help="run a broker (embedded defaults: 127.0.0.1:6650, ./actorbroker-data)",
                              description="Run a broker in a multi-process Thespian actor system until "
                                          "SIGINT/SIGTERM; then stop every process of it.")
    p.add_argument("--host", default="127.0.0.1", help="interface clients connect to (default %(default)s)")
    p.add_argument("--port", type=int_between(0, 65535), default=6650, help="client port; 0 picks a free one (default %(default)s)")
    p.add_argument("--data-dir", default="./actorbroker-data", help="logs and data (default %(default)s)")
    p.add_argument("--heartbeat-ms", type=int_between(200, 60_000), default=5000,
                   help="default heartbeat, 200-60000 as a client's wish (default %(default)s)")
    # at most 32 MiB: frames of records travel between the broker's actors in lane frames of at
    # most 64 MiB (transport/lanes.py), a message with the rest of its batch
    p.add_argument("--max-frame", type=int_between(1024, 32 * 1024 * 1024), default=4 * 1024 * 1024,
                   help="largest frame in bytes, 1024 to 33554432 (32 MiB) (default %(default)s)")
    p.add_argument("--max-backlog", type=int_between(0, None), default=10_000,
                   help="non_reliable: messages a subscription keeps (default %(default)s)")
    p.add_argument("--max-backlog-bytes", type=int_between(1024 * 1024, None), default=64 * 1024 * 1024,
                   help="non_reliable: bytes a subscription keeps, about (the count is lowered to fit); "
                        "reliable: what it keeps in memory, the rest waits in the log (default %(default)s)")
    add_limit_options(p)
    p.add_argument("--io-shards", type=positive, default=os.cpu_count() or 1,
                   help="connection shards: actor processes that each own many client sockets "
                        "(default: the CPU count, %(default)s)")
    p.add_argument("--lanes", default="unix", choices=["unix", "tcp"],
                   help="record lanes between the broker's actors: Unix sockets (one host) or TCP on "
                        "--actor-host (several hosts) (default %(default)s)")
    p.add_argument("--default-dispatch", default="non_reliable", choices=["non_reliable", "reliable"],
                   help="mode of topics created without an explicit dispatch (default %(default)s)")
    p.add_argument("--fsync", default="group", type=fsync_mode,
                   help="reliable topics: 'always' (fsync every send), 'group' (every send, "
                        "fsynced with those that arrived meanwhile; as safe), or 'interval:MS' "
                        "(receipt once written to the OS, fsync every MS: a machine crash may "
                        "lose the last MS of receipted sends) (default %(default)s)")
    p.add_argument("--segment-bytes", type=positive, default=64 * 1024 * 1024,
                   help="reliable topics: roll a log segment at this size (default %(default)s)")
    p.add_argument("--retention-bytes", type=int_between(0, None), default=0,
                   help="reliable topics: keep the log under this size (0: no limit)")
    p.add_argument("--retention-ms", type=int_between(0, None), default=0,
                   help="reliable topics: delete segments older than this (0: no limit)")
    p.add_argument("--auth-file", help="JSON file {token: [permissions]}; permissions are 'admin', "
                                       "'produce:PATTERN', 'consume:PATTERN'. Without it auth is off.")
    p.add_argument("--tls-cert", metavar="FILE",
                   help="serve the client port over TLS with this certificate chain (PEM); clients "
                        "connect to tls://HOST:PORT. The file is read by every connection shard on "
                        "its own host")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM; default: in --tls-cert)")
    p.add_argument("--tls-client-ca", metavar="FILE",
                   help="mutual TLS: refuse clients without a certificate signed by these CAs (PEM)")
    p.add_argument("--allow-plain-tokens", action="store_true",
                   help="accept auth tokens over plain TCP when --host is not loopback (by default "
                        "such a hello gets AUTH_FAILED: the token crossed the network in the clear)")
    p.add_argument("--admin-port", type=int_between(1, 65535), help="Thespian admin port (default: a free one)")
    p.add_argument("--actor-host", default="127.0.0.1",
                   help="interface of Thespian's own sockets, which unpickle what they receive: keep "
                        "it on loopback unless you run a multi-host convention on a trusted network (default %(default)s)")
    p.add_argument("--cluster-secret-file",
                   help="file holding the secret (32+ bytes, readable by its owner only) that signs "
                        "every packet between the broker's Thespian processes; give every host of a "
                        "multi-host convention the same one (default: a new random secret per run, "
                        "kept in memory only)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="the least severe lines broker.log keeps (default %(default)s)")
    add_cluster_options(p)
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="broker.log as text lines, or one JSON object per line with the connection, "
                        "consumer and topic ids of the lines about them (default %(default)s)")
    p.add_argument("--metrics-port", type=int_between(0, 65535), metavar="PORT",
                   help="serve Prometheus metrics on http://METRICS_HOST:PORT/metrics (0: a free "
                        "port; default: no metrics, nothing counted for them)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="interface of the metrics endpoint (default %(default)s)")
    p.set_defaults(func=serve)


# The limits of docs/protocol.md ("Limits"): BrokerConfig field -> what happens beyond it.
LIMITS = (
    ("max_connections", "client connections at most; beyond, a new one gets OVERLOADED and is closed"),
    ("max_connections_per_address", "client connections from one host at most; beyond, as above"),
    ("max_producers_per_connection", "producers open on one connection; beyond, `producer` gets OVERLOADED"),
    ("max_consumers_per_connection", "consumers attached on one connection; beyond, `subscribe` gets "
                                     "OVERLOADED"),
    ("max_topics", "topics of the broker (each is a process); beyond, a request that would create one "
                   "gets OVERLOADED"),
    ("max_subscriptions_per_topic", "subscriptions of one topic (each is two processes); beyond, a "
                                    "subscribe that would create one gets OVERLOADED"),
    ("max_unacked_per_consumer", "reliable: messages delivered to one consumer and not acknowledged; a "
                                 "subscribe asking a larger max_unacked gets this one (each costs memory)"),
    ("max_pending_bytes", "bytes waiting to be written to one client; beyond, it is closed with "
                          "SLOW_CONSUMER"),
    ("frame_timeout_ms", "a frame whose first byte arrived must be whole within this, or the connection "
                         "is closed with BAD_FRAME"),
    ("request_deadline_ms", "a request passed on to the broker's actors that none of them answered within "
                            "this (the one holding it died) is answered with INTERNAL"),
)


def add_limit_options(p):
    defaults = BrokerConfig()
    g = p.add_argument_group("limits", "what one client, or all of them, may cost the broker "
                                       "(docs/protocol.md, \"Limits\")")
    for name, text in LIMITS:
        g.add_argument("--" + name.replace("_", "-"), type=positive, default=getattr(defaults, name),
                       help=text + " (default %(default)s)")


def limits_of(args):
    """BrokerConfig's limit fields from the options of add_limit_options."""
    return {name: getattr(args, name) for name, _ in LIMITS}


def usable_dir(path):
    """Create the folder (new: its owner only; it holds messages and logs); why it cannot serve
    as one (None if it can)."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "not a directory"
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        return exc.strerror or str(exc)
    if not os.access(path, os.W_OK | os.X_OK):
        return "not writable"
    return None


def int_between(low, high):
    """An argparse type: an int in [low, high] (high None: no bound), or a usage error naming them,
    so that a value the broker cannot serve with (--heartbeat-ms 0 closed every connection at
    once) stops serve before any actor starts."""
    def parse(text):
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{text} is not in [{low}, {high}]" if high is not None else f"{text} is below {low}")
        return value
    parse.__name__ = "int"
    return parse


def fsync_mode(text):
    if text in ("always", "group") or (text.startswith("interval:") and text[9:].isdigit() and int(text[9:]) > 0):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: one of 'always', 'group', 'interval:MS' (MS >= 1)")


def tls_problem(args):
    """Why the TLS options cannot serve (None if they can): checked here, before any actor starts,
    so that a typo is an error at once and not a broker refusing every connection."""
    if not args.tls_cert:
        return "--tls-key and --tls-client-ca need --tls-cert" if args.tls_key or args.tls_client_ca else None
    from actorbroker.transport.tls import server_context
    for option, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                         ("--tls-client-ca", args.tls_client_ca)):
        if path and not os.path.isfile(path):
            return f"{option} {path}: no such file"
    try:
        server_context(args.tls_cert, args.tls_key, args.tls_client_ca)
    except (OSError, ValueError) as exc:
        hint = "" if args.tls_key else (" (no --tls-key: the private key must then be in the --tls-cert file, "
                                        "after the certificate)")
        return f"cannot use the TLS certificate {args.tls_cert}: {exc}{hint}"
    return None


positive = int_between(1, None)


PERMISSION_ACTIONS = ("produce", "consume")


def read_auth_file(path):
    """{token: [permission, ...]}, checked whole before anything starts: a typo must be an error
    now, not a hello never answered or a permission silently granting nothing."""
    with open(path) as f:
        try:
            tokens = json.load(f)
        except ValueError as exc:
            raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(tokens, dict):
        raise ValueError(f"{path}: expected a JSON object {{token: [permissions]}}, got {type(tokens).__name__}")
    if not tokens:   # not "auth off": every hello would be refused; say so now
        raise ValueError(f"{path} names no token: no client could connect (without --auth-file auth is off)")
    for number, (token, permissions) in enumerate(tokens.items(), 1):
        if not token:
            raise ValueError(f"{path}: token #{number} is empty")
        if not isinstance(permissions, list) or not all(isinstance(p, str) for p in permissions):
            raise ValueError(f"{path}: token #{number}: permissions must be a list of strings")
        for permission in permissions:
            action, _, pattern = permission.partition(":")
            if permission != "admin" and not (action in PERMISSION_ACTIONS and pattern):
                raise ValueError(f"{path}: token #{number}: unknown permission {permission!r} "
                                 "(expected 'admin', 'produce:PATTERN' or 'consume:PATTERN')")
    return tokens


def serve(args):
    problem = cluster_problem(args)
    if problem:
        say(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        secret = signing.read_secret_file(args.cluster_secret_file) if args.cluster_secret_file \
            else signing.new_secret()
    except (OSError, ValueError) as exc:
        say(f"error: --cluster-secret-file: {exc}", file=sys.stderr)
        return 1
    problem = tls_problem(args)
    if problem:
        say(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        tokens = read_auth_file(args.auth_file) if args.auth_file else {}
    except (OSError, ValueError) as exc:
        say(f"error: --auth-file: {exc}", file=sys.stderr)
        return 1
    problem = plain_tokens_problem(args, tokens)
    if problem:   # started all the same: the hello says why (AUTH_FAILED names the option)
        say(f"warning: {problem}", file=sys.stderr)
    if args.metrics_port is not None and not is_loopback(args.metrics_host):
        say(f"warning: --metrics-host {args.metrics_host}: the metrics endpoint has no auth and names every "
            "topic and subscription; expose it to trusted scrapers only (docs/security.md)", file=sys.stderr)
    data_dir = os.path.abspath(args.data_dir)
    problem = usable_dir(data_dir)
    if problem:
        say(f"error: --data-dir {args.data_dir}: {problem}", file=sys.stderr)
        return 1
    config = BrokerConfig(host=args.host, port=args.port, data_dir=data_dir,
                          heartbeat_ms=args.heartbeat_ms, max_frame=args.max_frame,
                          max_backlog=args.max_backlog, max_backlog_bytes=args.max_backlog_bytes, **limits_of(args), tokens=tokens, default_dispatch=args.default_dispatch, fsync=args.fsync,
                          segment_bytes=args.segment_bytes, retention_bytes=args.retention_bytes,
                          retention_ms=args.retention_ms, io_shards=max(1, args.io_shards),
                          lanes=args.lanes, actor_host=args.actor_host,
                          tls_cert=abspath_or_empty(args.tls_cert), tls_key=abspath_or_empty(args.tls_key),
                          tls_client_ca=abspath_or_empty(args.tls_client_ca),
                          allow_plain_tokens=args.allow_plain_tokens,
                          metrics_host=args.metrics_host, metrics_port=args.metrics_port,
                          shared_data=os.path.abspath(args.shared_data) if args.shared_data else "")
    if config.shared_data:
        problem = usable_dir(config.shared_data)
        if problem:
            say(f"error: --shared-data {args.shared_data}: {problem}", file=sys.stderr)
            return 1
    admin_port = args.admin_port
    if args.cluster_bind:
        config, admin_port = cluster_config(config, args)
    files = raise_open_files_limit()

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    # Until the root actor watches this process (it answers BrokerStarted once it does), the guard
    # does: killed meanwhile, even by SIGKILL, this process leaves no actor system behind.
    guard = StartupGuard(secret, config.actor_host, data_dir, args.log_format)
    try:
        return _serve(args, config, admin_port, data_dir, secret, files, stop, guard)
    finally:
        guard.close()


def _serve(args, config, admin_port, data_dir, secret, files, stop, guard):
    for attempt in range(5):   # a free port may be taken before the admin binds it: pick again
        port = admin_port or free_port(args.actor_host)
        guard.tell("starting", port)
        try:
            start_system_process(port, config.actor_host, data_dir, secret, args.log_level,
                                 config.node, args.join or "", args.log_format)
            guard.tell("up", port)
            break
        except subprocess.CalledProcessError as exc:
            guard.tell("failed", port)   # no admin of ours on that port
            if exc.returncode != ADMIN_PORT_TAKEN or admin_port or attempt == 4:
                say(f"error: cannot start the actor system on admin port {port}", file=sys.stderr)
                return 1
    admin_port = port
    system = connect_system(admin_port, config.actor_host, secret)
    try:
        from actorbroker.actors.broker import BrokerFailed, BrokerStarted, StartBroker
        # in a cluster, other nodes' JoinAgents find the root by this name
        root = system.createActor("actorbroker.actors.broker.BrokerRootActor",
                                  globalName=ROOT_GLOBAL_NAME if config.node else None)
        reply = system.ask(root, StartBroker(config, os.getpid(), admin_port), START_TIMEOUT_S)
        if not isinstance(reply, BrokerStarted):
            reason = reply.error if isinstance(reply, BrokerFailed) else "no answer from the broker"
            say(f"error: {reason}", file=sys.stderr)
            if isinstance(reply, BrokerFailed) and reply.admin_pid:
                stop_system(system, reply.admin_pid)
                system = None
            return 1
        guard.tell("done")   # the root watches this process now (on_StartBroker)
        metrics = f"; metrics on http://{config.metrics_host}:{reply.metrics_port}/metrics" \
            if reply.metrics_port is not None else ""
        say(f"actorbroker listening on {reply.host}:{reply.port} "
              f"(admin port {admin_port}, admin pid {reply.admin_pid}, data {data_dir}){metrics}", flush=True)
        if config.node:
            say(f"cluster node {config.node} ({'leader' if config.cluster_leader else 'joining ' + args.join}) "
                  f"on {args.cluster_bind}", file=sys.stderr, flush=True)
        if config.tls_cert:
            say(f"client port on TLS{' (mutual: client certificates required)' if config.tls_client_ca else ''}",
                  file=sys.stderr, flush=True)
        say(f"open files limit {files}: about {connections_allowed(files, config)} client "
              f"connections per shard, {config.io_shards} shard{'s' * (config.io_shards != 1)}",
              file=sys.stderr, flush=True)
        lost, lost_pids = watch_system(system, root, reply.admin_pid, stop)
        if lost:
            system = None
            kill_system(lost_pids)
            say(f"error: the actor system is lost ({lost}); exiting so that a service manager "
                  f"restarts the broker", file=sys.stderr, flush=True)
            return 3
        say("actorbroker stopping", flush=True)
        stop_clients(system, root)
        stop_system(system, reply.admin_pid)
        system = None
        return 0
    finally:
        if system is not None:
            system.shutdown()


def add_cluster_options(p):
    g = p.add_argument_group("cluster", "one broker over several hosts (docs/cluster.md)")
    g.add_argument("--cluster-bind", metavar="ADDR:PORT",
                   help="run as a cluster node: Thespian's sockets and the record lanes bind ADDR "
                        "(a private address; never 0.0.0.0), its admin listens on PORT; needs "
                        "--cluster-secret-file")
    g.add_argument("--join", metavar="ADDR:PORT",
                   help="the --cluster-bind of the cluster's leader (without it, this node leads)")
    g.add_argument("--node", help="this node's name, unique in the cluster (default: ADDR:PORT of "
                                  "--cluster-bind)")
    g.add_argument("--member-timeout-ms", type=positive, default=3000,
                   help="a member not heard from for this long is declared lost (default %(default)s)")
    g.add_argument("--shared-data", metavar="DIR",
                   help="a folder every node mounts at the same path: reliable topics live there, "
                        "and when their node is lost a survivor takes them over from their logs, "
                        "fenced so that two nodes never write one log (docs/cluster.md)")
    g.add_argument("--trust-cluster-network", action="store_true",
                   help="allow a --cluster-bind (or --actor-host) address that is not private: Thespian's sockets "
                        "unpickle what they receive (signed with the cluster secret), so whoever can "
                        "reach them must be trusted")


# What docs/cluster.md calls private: RFC 1918, loopback, link-local, unique-local. Not
# ipaddress's is_private, which also takes documentation, reserved and broadcast addresses.
PRIVATE_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16",
    "::1/128", "fe80::/10", "fc00::/7"))


def cluster_problem(args):
    """Why the cluster options cannot serve (None if they can)."""
    if not args.cluster_bind:
        if args.join or args.node:
            return "--join and --node need --cluster-bind"
        return actor_host_problem(args)
    try:
        host, port = host_port(args.cluster_bind)
        address = ipaddress.ip_address(host)
        ports = [port, host_port(args.join)[1]] if args.join else [port]
        if not all(0 < p <= 65535 for p in ports):
            raise ValueError("port out of range")
    except ValueError:
        return "--cluster-bind and --join take ADDR:PORT, ADDR an IPv4 address, PORT in [1, 65535]"
    if address.is_unspecified:
        return "--cluster-bind must name one interface's address, not 0.0.0.0"
    if not any(address in network for network in PRIVATE_NETWORKS) and not args.trust_cluster_network:
        return (f"--cluster-bind {host} is not a private address: Thespian's sockets there unpickle what "
                f"they receive; use a private network, or give --trust-cluster-network")
    if not args.cluster_secret_file:
        return "a cluster node needs --cluster-secret-file: the same secret on every node"
    if args.actor_host != "127.0.0.1":
        return "--actor-host and --cluster-bind both set Thespian's interface: give one"
    return None


def plain_tokens_problem(args, tokens):
    """Auth on a non-loopback client port without TLS refuses every token (docs/security.md): a
    broker no client could use, unless the user said tokens may cross in the clear."""
    if not tokens or args.tls_cert or args.allow_plain_tokens or is_loopback(args.host):
        return None
    return (f"--auth-file with --host {args.host} (not loopback) and no --tls-cert: tokens would cross "
            "the network in the clear, so every hello with a token gets AUTH_FAILED; add --tls-cert "
            "(and --tls-key), or --allow-plain-tokens on a network you trust")


def actor_host_problem(args):
    """Thespian's sockets unpickle what they receive: off loopback only in a multi-host convention,
    whose hosts share a secret (a per-run secret cannot be shared: no other host could join), and
    with the guards of --cluster-bind: one interface (never 0.0.0.0), a private one unless
    --trust-cluster-network."""
    if args.actor_host == "localhost":
        address = None
    else:
        try:
            address = ipaddress.ip_address(args.actor_host)
        except ValueError:
            return f"--actor-host takes an IP address (or localhost), not {args.actor_host!r}"
    if address is None or address.is_loopback:
        return "--trust-cluster-network needs --cluster-bind or --actor-host" if args.trust_cluster_network else None
    if not args.cluster_secret_file:
        return (f"--actor-host {args.actor_host} is not a loopback address: Thespian's sockets there unpickle "
                "what they receive; a single broker keeps them on 127.0.0.1 (a multi-host convention: "
                "--cluster-bind, or --cluster-secret-file with a trusted network)")
    if address.is_unspecified:
        return "--actor-host must name one interface's address, not 0.0.0.0 (every interface)"
    if not any(address in network for network in PRIVATE_NETWORKS) and not args.trust_cluster_network:
        return (f"--actor-host {args.actor_host} is not a private address: Thespian's sockets there unpickle "
                "what they receive; use a private network, or give --trust-cluster-network")
    return None


def cluster_config(config, args):
    """(config, admin port) of a cluster node: Thespian and TCP lanes on --cluster-bind."""
    host, port = host_port(args.cluster_bind)
    config = dataclasses.replace(config, actor_host=host, lanes="tcp",
                                 node=args.node or args.cluster_bind, cluster_leader=not args.join,
                                 member_timeout_ms=args.member_timeout_ms)
    return config, port


def abspath_or_empty(path):
    """The shards do not run in serve's working directory."""
    return os.path.abspath(path) if path else ""


def raise_open_files_limit():
    """Each client socket is a file of its shard's process: take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def connections_allowed(files, config):
    return max(0, min(files - 64, -(-config.max_connections // config.io_shards)))


def watch_system(system, root, admin_pid, stop):
    """Serve until a signal; returns (why, its last known pids) if the actor system is lost meanwhile.

    Killing Thespian's admin or logger process (kill -9) takes the system down while this process
    would keep running and serve nothing: so the admin's pid is watched, and the root actor must
    answer a ping every few seconds, or at least be seen working: a root busy with a burst of
    requests (it answers them in order) is not a lost system."""
    from actorbroker.actors.broker import Ping, Pong
    try:
        pidfd = os.pidfd_open(admin_pid)
    except (OSError, AttributeError):
        pidfd = None
    last_ping = time.monotonic()
    known = set(descendants(admin_pid))
    try:
        while not stop.wait(0.25):
            if pidfd is not None and select.select([pidfd], [], [], 0)[0]:
                return f"admin process {admin_pid} exited", known
            if time.monotonic() - last_ping >= PING_EVERY_S:
                last_ping = time.monotonic()
                known = set(descendants(admin_pid))   # for kill_system, once the admin is gone
                root_pid = next((p for p in known if proctree.name(p) == "ab-root"), None)
                cpu_before = tree_cpu_ticks(known)
                try:
                    answer = system.ask(root, Ping(), PING_TIMEOUT_S)
                except Exception as exc:   # the admin socket itself failing
                    return f"ping failed: {exc}", known
                if stop.is_set():
                    return None, ()
                if not isinstance(answer, Pong):
                    # The root may be waiting on the others (its answers queued to a busy
                    # ConnectionActor) with no CPU of its own: a live root in a tree at work is busy.
                    worked = (tree_cpu_ticks(known) - cpu_before) / os.sysconf("SC_CLK_TCK")
                    if proctree.cpu_ticks(root_pid) is not None and worked >= BUSY_CPU_S:
                        say(f"warning: the root actor took over {PING_TIMEOUT_S} s to answer a ping; "
                              f"it is busy (working through a burst of requests?)", file=sys.stderr, flush=True)
                        continue
                    return f"the root actor did not answer within {PING_TIMEOUT_S} s", known
        return None, ()
    finally:
        if pidfd is not None:
            os.close(pidfd)


# A root late to answer a ping is busy, not lost, if its tree used this much CPU meanwhile (an idle
# broker's timers and heartbeats use far less).
BUSY_CPU_S = 0.1


def tree_cpu_ticks(pids):
    """CPU time of those of `pids` still alive, in clock ticks."""
    return sum(filter(None, map(proctree.cpu_ticks, pids)))


def descendants(pid):
    """pid and every process below it, from /proc."""
    pids = [pid]
    i = 0
    while i < len(pids):
        try:
            with open(f"/proc/{pids[i]}/task/{pids[i]}/children") as f:
                pids.extend(int(p) for p in f.read().split())
        except OSError:
            pass
        i += 1
    return pids


def stop_clients(system, root):
    """Client connections end first, while the topics are still there (listener.StopClients);
    bounded: the shutdown goes on regardless."""
    from actorbroker.actors.listener import StopClients
    try:
        system.ask(root, StopClients(), STOP_CLIENTS_TIMEOUT_S)
    except Exception as exc:   # noqa: BLE001 - a broken system is shut down all the same
        say(f"warning: client connections not closed before the shutdown: {exc}", file=sys.stderr, flush=True)


def stop_system(system, admin_pid):
    """Thespian's shutdown, then by PID whatever of the admin's tree outlives it."""
    tree = descendants(admin_pid)
    system.shutdown()
    left = still_alive(tree, SHUTDOWN_GRACE_S)
    if left:   # Thespian's shutdown gave up on part of the tree: no process may outlive serve
        say(f"warning: {len(left)} broker processes did not stop within {SHUTDOWN_GRACE_S} s "
              f"of the shutdown; killing them", file=sys.stderr, flush=True)
        kill_system(left)


def still_alive(pids, timeout):
    """Those of `pids` still running (not zombies) after waiting up to `timeout` for them to end."""
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in pids if _running(pid)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_system(known):
    """What is left of a lost system, by PID (never by name): the admin's tree as last seen, and
    whatever is still below any of those."""
    pids = set(known)
    for pid in list(pids):
        pids.update(descendants(pid))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# How long the guard of a serve killed while its admin was starting waits for that admin to listen
# (it is then shut down), and how long it then waits for the admin to be gone.
GUARD_ADMIN_WAIT_S = START_TIMEOUT_S
GUARD_STOP_WAIT_S = 3 * SHUTDOWN_GRACE_S
GUARD_STOP_RETRY_S = 2.0   # a stop not done by then is tried again


class StartupGuard:
    """A process of its own (ab-guard) that shuts the actor system down if serve dies before the
    root actor watches serve.

    The admin daemonizes (THESPIAN-NOTES.md, "Process tree"): nothing ties it to serve until the
    root actor opens its pidfd of serve, on StartBroker. serve killed before that (kill -9 while
    starting) left the admin, its logger and maybe the root running for good, holding the admin
    port. serve tells the guard, over a pipe, each admin port it starts an admin on, whether that
    admin came up, and "done" once the root has answered BrokerStarted (it watches serve from
    then on). The pipe's end without "done" means serve is gone (or returned): the guard then
    shuts down the admin on the last port that was ours, waiting for it to listen if it was still
    starting. Forked, it holds the secret Thespian's shutdown must be signed with; in a session
    of its own, a kill of serve's process group does not take it along."""

    def __init__(self, secret, host, data_dir, log_format="text"):
        read_end, self.pipe = os.pipe()
        child = os.fork()
        if child == 0:   # forks the guard and ends: the guard is not serve's child (no zombie)
            code = 0
            try:
                os.close(self.pipe)
                if os.fork() == 0:
                    _guard(read_end, secret, host, data_dir, log_format)
            except BaseException:   # noqa: BLE001 - never return into serve's code
                code = 1
            finally:
                os._exit(code)
        os.close(read_end)
        os.waitpid(child, 0)

    def tell(self, *words):
        if self.pipe is None:
            return
        try:
            os.write(self.pipe, (" ".join(map(str, words)) + "\n").encode())
        except OSError:   # the guard is gone (killed): serve goes on without it
            pass
        if words[0] == "done":
            self.close()

    def close(self):
        """serve returns: the guard reads the end of the pipe (and ends; after "done" at once)."""
        if self.pipe is not None:
            os.close(self.pipe)
            self.pipe = None


def _guard(read_end, secret, host, data_dir, log_format):
    from actorbroker.actors.process import name_process
    os.setsid()
    name_process("ab-guard")
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a Ctrl-C is serve's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):   # never hold serve's stdout (a test's pipe, a terminal) open
        os.dup2(devnull, fd)
    os.close(devnull)
    port, up = None, False
    with os.fdopen(read_end, "rb") as pipe:
        for line in pipe:
            word, *rest = line.decode().split()
            if word == "done":
                return
            if word == "starting":
                port, up = int(rest[0]), False
            elif word == "up":
                up = True
            elif word == "failed":
                port = None
    if port is None:
        return
    deadline = time.monotonic() + (0 if up else GUARD_ADMIN_WAIT_S)
    while not _accepts(host, port):
        if time.monotonic() >= deadline:
            return   # no admin came up (or serve had shut it down itself)
        time.sleep(0.05)
    try:   # a line in broker.log, in its format
        import logging.config
        from actorbroker.actors.system import log_defs
        defs = log_defs(os.path.join(data_dir, "broker.log"), "INFO", log_format)
        defs["loggers"] = {"actorbroker.serve": defs.pop("root")}   # not Thespian's lines
        logging.config.dictConfig(defs)
        logging.getLogger("actorbroker.serve").warning(
            "serve ended before the broker had started; shutting the actor system down")
    except (OSError, ValueError):
        pass
    from actorbroker.actors.process import stop_actor_system
    # Again while the admin still listens: an admin that has just started on a busy machine may
    # not answer Thespian's status query in time, and the stop then gives up (InvalidActorAddress,
    # as when it is gone) with the admin still running.
    deadline = time.monotonic() + GUARD_STOP_WAIT_S
    while True:
        try:
            stop_actor_system(port, host, secret)
        except Exception:   # noqa: BLE001 - the admin went away meanwhile (the root stopped it)
            pass
        stopping = time.monotonic() + GUARD_STOP_RETRY_S
        while _accepts(host, port) and time.monotonic() < min(stopping, deadline):
            time.sleep(0.05)
        if not _accepts(host, port) or time.monotonic() >= deadline:
            return


def _accepts(host, port):
    """Does something listen on host:port?"""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False
