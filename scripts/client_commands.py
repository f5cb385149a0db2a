"""Client subcommands of the `actorbroker` command: produce, consume, topics, stats, delete-topic,
events.

Each command returns an exit code: 0 on success, 1 on an error (printed as one line
`error: CODE: message` on stderr), 130 on Ctrl-C.
"""
import argparse
import json
import math
import os
import select
import sys
import time

from actorbroker.transport.client import DEFAULT_HOST, DEFAULT_PORT, Client, TlsOptions, parse_address
from actorbroker.transport.errors import BrokerError, ConnectionLost, ConsumerClosed, ProducerClosed
from actorbroker.transport.validate import MAX_COUNT, MAX_DELAY_MS

DEFAULT_URL = f"{DEFAULT_HOST}:{DEFAULT_PORT}"
SUBSCRIPTION_TYPES = ["exclusive", "shared", "failover", "key_shared"]
DISPATCH_MODES = ["non_reliable", "reliable"]
MAX_SECONDS = 86400   # --timeout, --interval: a day (a time far beyond overflows the clock calls)


def add_client_commands(subparsers):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=DEFAULT_URL, type=url_arg,
                        help="broker address HOST:PORT, or tls://HOST:PORT for a broker serving TLS "
                             "(default %(default)s)")
    common.add_argument("--token", help="auth token, when the broker has auth on")
    common.add_argument("--tls-ca", metavar="FILE",
                        help="tls://: trust the broker's certificate if these CAs (PEM) signed it "
                             "(default: the system's CAs)")
    common.add_argument("--tls-cert", metavar="FILE", help="tls://: our certificate, for mutual TLS")
    common.add_argument("--tls-key", metavar="FILE", help="tls://: its key (default: in --tls-cert)")
    common.add_argument("--tls-server-name", metavar="NAME",
                        help="tls://: the name the broker's certificate must carry (default: HOST)")
    common.add_argument("--tls-no-check-hostname", action="store_true",
                        help="tls://: accept any name in a certificate of a trusted CA")

    p = subparsers.add_parser(
        "produce", parents=[common], help="send messages to a topic",
        description="Send messages to TOPIC (created if missing). With -m, send MESSAGE (COUNT "
                    "times); otherwise send each line of standard input (or of --file) as one "
                    "message. Prints the offsets the messages got.")
    p.add_argument("topic", metavar="TOPIC", help="topic name, /namespace/name")
    source = p.add_mutually_exclusive_group()
    source.add_argument("-m", "--message", help="the message to send (UTF-8 text)")
    source.add_argument("--file", type=argparse.FileType("rb"), help="send the lines of this file")
    p.add_argument("-n", "--count", type=positive_int,
                   help="with -m: how many copies to send (default 1); with lines: send at most this many")
    p.add_argument("--key", help="routing key of every message (key_shared subscriptions)")
    p.add_argument("--attr", action="append", type=attr_arg, default=[], metavar="K=V",
                   help="attribute of every message; repeat for more")
    p.add_argument("--rate", type=rate_arg, metavar="R", help="send at most R messages per second")
    p.add_argument("--dispatch", choices=DISPATCH_MODES,
                   help="mode of the topic if this creates it (default: the broker's default)")
    p.set_defaults(func=produce)

    p = subparsers.add_parser(
        "consume", parents=[common], help="receive messages from a subscription",
        description="Attach a consumer to SUBSCRIPTION of TOPIC (both created if missing) and print "
                    "each message's payload, one line each. Stops after --count messages, after "
                    "--timeout seconds without a message, or on Ctrl-C.")
    p.add_argument("topic", metavar="TOPIC", help="topic name, /namespace/name")
    p.add_argument("-s", "--subscription", required=True, help="subscription name")
    p.add_argument("-t", "--type", default="exclusive", choices=SUBSCRIPTION_TYPES,
                   help="subscription type (default %(default)s)")
    p.add_argument("--consumer", help="consumer name (default: a generated unique one); reusing a "
                                      "name takes over that consumer's place")
    p.add_argument("-n", "--count", type=positive_int, help="stop after this many messages")
    p.add_argument("--ack", action=argparse.BooleanOptionalAction, default=True,
                   help="acknowledge each message (default: yes)")
    p.add_argument("--start", choices=["earliest", "latest"],
                   help="reliable topics: where a new subscription starts (default: latest)")
    p.add_argument("--dispatch", choices=DISPATCH_MODES,
                   help="mode of the topic if this creates it (default: the broker's default)")
    p.add_argument("--timeout", type=seconds_arg(0, MAX_SECONDS), metavar="SECONDS",
                   help="stop when no message has arrived for this long")
    p.add_argument("--nack-every", type=positive_int, metavar="K",
                   help="negatively acknowledge every K-th message instead of acking it (tests redelivery)")
    p.add_argument("--show-meta", action="store_true",
                   help="print id, key and redeliveries before each payload")
    p.add_argument("--max-unacked", type=int_arg(1, MAX_COUNT), metavar="N",
                   help="reliable: this consumer's bound on delivered, unacknowledged messages")
    p.add_argument("--ack-timeout-ms", type=int_arg(1, MAX_DELAY_MS), metavar="MS",
                   help="reliable, set when this creates the subscription: redeliver what is not "
                        "acknowledged in time")
    p.add_argument("--max-redeliveries", type=int_arg(1, MAX_COUNT), metavar="N",
                   help="reliable, set when this creates the subscription: then dead-letter")
    p.add_argument("--dead-letter-topic", metavar="TOPIC",
                   help="reliable, set when this creates the subscription: where to dead-letter")
    p.set_defaults(func=consume)

    p = subparsers.add_parser("topics", parents=[common], help="list topics",
                              description="List the broker's topics.")
    p.add_argument("--json", action="store_true", help="print the broker's answer as JSON")
    p.set_defaults(func=topics)

    p = subparsers.add_parser("stats", parents=[common], help="show a topic's statistics",
                              description="Print a topic's statistics as JSON: counters, "
                                          "subscriptions and their consumers.")
    p.add_argument("topic", metavar="TOPIC")
    p.set_defaults(func=stats)

    from actorbroker.scripts.cluster_commands import add_cluster_commands
    add_cluster_commands(subparsers, common, with_client)

    p = subparsers.add_parser("delete-topic", parents=[common], help="delete a topic",
                              description="Delete a topic; its producers and consumers are closed.")
    p.add_argument("topic", metavar="TOPIC")
    p.set_defaults(func=delete_topic)

    p = subparsers.add_parser(
        "events", parents=[common], help="print the broker's lifecycle events live",
        description="Watch the broker's lifecycle events (connections opened and closed, consumers "
                    "attached and detached, failover promotions, redeliveries, slow consumers, "
                    "topics created and deleted) and print them as they happen, one line each, "
                    "until Ctrl-C. Needs the admin permission when auth is on.")
    p.add_argument("pattern", metavar="PATTERN", nargs="?", default="*",
                   help="shell-style pattern over topic names; events of connections always show "
                        "(default: every topic)")
    p.add_argument("--json", action="store_true", help="print each event frame as one JSON line")
    p.add_argument("-n", "--count", type=positive_int, help="stop after this many events")
    p.set_defaults(func=events)
    from actorbroker.scripts.top import add_top_command
    add_top_command(subparsers, common)


# --- argument types ---------------------------------------------------------------------------

def url_arg(text):
    try:
        return parse_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not HOST:PORT or tls://HOST:PORT: {text!r}") from None


TLS_OPTIONS = ("tls_ca", "tls_cert", "tls_key", "tls_server_name", "tls_no_check_hostname")


def tls_of(args):
    """The TlsOptions of a tls:// --url (None for plain TCP)."""
    if not args.url.tls:
        if any(getattr(args, name) for name in TLS_OPTIONS):
            raise ValueError("the --tls-* options need a tls:// --url")
        return None
    for option, path in (("--tls-ca", args.tls_ca), ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path and not os.path.isfile(path):   # a local file, not a connection problem
            raise ValueError(f"{option} {path}: no such file")
    return TlsOptions(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key,
                      server_name=args.tls_server_name, check_hostname=not args.tls_no_check_hostname)


def attr_arg(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"not K=V: {text!r}")
    return key, value


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def int_arg(low, high):
    """An integer from low to high (the broker's bounds: beyond 64 bits msgpack cannot even send it)."""
    def check(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}: {text}")
        return value
    return check


def _finite(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number: {text}")
    return value


def seconds_arg(low, high):
    """Seconds, more than `low` (0: any positive time) and at most `high`."""
    def check(text):
        value = _finite(text)
        above = value > 0 if low == 0 else value >= low
        if not (above and value <= high):
            bound = "more than 0" if low == 0 else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound} and at most {high:g} seconds: {text}")
        return value
    return check


def rate_arg(text):
    """Messages per second: finite, at least one a day (a pace slower than that overflows sleep)."""
    value = _finite(text)
    if not value >= 1 / MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be at least 1/{MAX_SECONDS} (one a day): {text}")
    return value


# --- running a command ------------------------------------------------------------------------

def with_client(command):
    """Run command(client, args) on a connected client; errors become one line on stderr."""
    def run(args):
        host, port, _ = args.url
        name = f"actorbroker-cli-{getattr(args, 'command', None) or 'client'}"
        try:
            tls = tls_of(args)
        except ValueError as exc:
            return fail(str(exc))
        try:
            with Client(host, port, token=args.token, name=name, tls=tls) as client:
                return command(client, args)
        except KeyboardInterrupt:
            return 130
        except BrokerError as exc:
            return fail(f"{exc.code}: {exc.message}")
        except (ConsumerClosed, ProducerClosed) as exc:
            return fail(f"CLOSED: {exc}")
        except ConnectionLost as exc:
            return fail(f"CONNECTION_LOST: {exc}")
        except BrokenPipeError as exc:
            if stdout_gone():
                return 141   # its reader left (`| head`): quietly, as a shell tool ended by SIGPIPE
            return fail(f"CONNECTION: {host}:{port}: {exc}")
        except (OSError, TimeoutError) as exc:
            return fail(f"CONNECTION: {host}:{port}: {exc}")
        except UnicodeEncodeError as exc:   # an argument from a non-UTF-8 terminal: strings are UTF-8
            bad = exc.object[exc.start:exc.end].encode("utf-8", "surrogateescape")
            return fail(f"BAD_ARGUMENT: an argument is not valid UTF-8 text (bytes {bad!r})")
    run.__doc__ = command.__doc__
    return run


def stdout_gone():
    """Whether stdout's reader has gone (a pipe's write end polls POLLERR then); if so, stdout
    points at /dev/null from now on, so that the interpreter's last flush does not complain."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        gone = any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False
    if gone:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return gone


def fail(text):
    print(f"error: {text}", file=sys.stderr)
    return 1


# --- commands ---------------------------------------------------------------------------------

@with_client
def produce(client, args):
    """Send -m MESSAGE (count times) or lines of stdin/--file; print the offsets they got."""
    producer = client.producer(args.topic, dispatch=args.dispatch)
    attrs = dict(args.attr) or None
    futures = []
    start = time.monotonic()
    try:
        for payload in payloads(args):
            if args.rate:   # pace by schedule, not by sleeping a fixed gap: sending takes time too
                delay = start + len(futures) / args.rate - time.monotonic()
                if delay > 0:
                    producer.flush()   # what was due before the pause goes out now
                    time.sleep(delay)
            futures.append(producer.send(payload, key=args.key, attrs=attrs))
    except KeyboardInterrupt:   # Ctrl-C: what was sent so far is flushed and said, then exit 130
        producer.flush(timeout=10)
        done = sum(1 for f in futures if f.done() and f.exception(0) is None)
        print(f"interrupted: sent {done} message{'s' * (done != 1)} to {args.topic}", file=sys.stderr)
        return 130
    producer.flush(timeout=60)
    offsets = [f.result(0) for f in futures]   # raises the error of a refused send
    producer.close()
    where = f" (offsets {offsets[0]}..{offsets[-1]})" if offsets else ""
    print(f"sent {len(offsets)} message{'s' * (len(offsets) != 1)} to {args.topic}{where}")
    return 0


def payloads(args):
    if args.message is not None:
        for _ in range(args.count or 1):
            yield args.message.encode("utf-8")
        return
    source = args.file or sys.stdin.buffer
    for n, line in enumerate(source):
        if args.count and n >= args.count:
            return
        yield line.rstrip(b"\r\n")


@with_client
def consume(client, args):
    """Print the messages of a subscription until count, idle timeout or Ctrl-C."""
    # With a count, credit no more than that: extra messages would be taken from other consumers.
    queue_size = min(args.count, 1000) if args.count else 1000
    consumer = client.subscribe(args.topic, args.subscription, args.type, args.consumer,
                                start=args.start, dispatch=args.dispatch, receiver_queue=queue_size,
                                max_unacked=args.max_unacked, ack_timeout_ms=args.ack_timeout_ms,
                                max_redeliveries=args.max_redeliveries,
                                dead_letter_topic=args.dead_letter_topic)
    # On stderr, so that the messages alone go to stdout: from here on, what is published reaches
    # this subscription (a non_reliable topic keeps nothing for a subscription not there yet).
    print(f"subscribed to {args.topic} as {args.subscription} ({args.type})", file=sys.stderr, flush=True)
    received = 0
    try:
        while args.count is None or received < args.count:
            try:
                msg = consumer.receive(timeout=args.timeout)
            except TimeoutError:
                break
            received += 1
            print_message(msg, args.show_meta)
            if args.nack_every and received % args.nack_every == 0:
                consumer.nack(msg)
            elif args.ack:
                consumer.ack(msg)
    except ConsumerClosed as exc:
        return fail(f"CLOSED: consumer closed by the broker: {exc.reason}")
    consumer.close()
    return 0


def print_message(msg, show_meta):
    text = msg.payload.decode("utf-8", errors="replace")
    if show_meta:
        meta = [f"id={msg.id}", f"key={msg.key}", f"redeliveries={msg.redeliveries}"]
        meta += [f"{k}={v}" for k, v in msg.attrs.items()]
        text = " ".join(meta + [text])
    print(text, flush=True)


@with_client
def topics(client, args):
    """List topics."""
    listed = client.topics()
    if listed.truncated:   # (the broker cuts the list to fit its max_frame: docs/protocol.md)
        print(f"topics: the broker's answer was cut to fit its max_frame: {len(listed)} topics shown, "
              "more exist", file=sys.stderr)
    if args.json:
        print(json.dumps(listed, indent=2))
        return 0
    rows = [("NAME", "DISPATCH", "SUBSCRIPTIONS", "PRODUCERS")] + [
        (t["name"], t["dispatch"], str(t["subscriptions"]), str(t["producers"])) for t in listed]
    if any("node" in t for t in listed):   # a cluster: where each topic lives
        rows = [row + (t,) for row, t in zip(rows, ["NODE"] + [t.get("node", "") for t in listed])]
    print_table(rows)
    return 0


def print_table(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@with_client
def stats(client, args):
    """A topic's statistics as JSON."""
    stats = client.stats(args.topic)
    if stats.get("truncated"):
        print("stats: the broker's answer was cut to fit its max_frame: some consumers or subscriptions "
              "are not listed", file=sys.stderr)
    print(json.dumps(stats, indent=2))
    return 0


@with_client
def delete_topic(client, args):
    """Delete a topic."""
    client.delete_topic(args.topic)
    print(f"deleted {args.topic}")
    return 0


EVENT_HEAD = ("op", "seq", "time_ms", "kind")


@with_client
def events(client, args):
    """Print lifecycle events as they come (see docs/protocol.md, "Events")."""
    client.watch(args.pattern)
    print(f"watching {args.pattern} on {args.url.host}:{args.url.port} (Ctrl-C to stop)", file=sys.stderr,
          flush=True)
    expected, printed = 1, 0
    while args.count is None or printed < args.count:
        try:
            event = client.next_event()
        except ConnectionLost as exc:
            return fail(f"CONNECTION_LOST: {exc}")
        if event["kind"] == "events_lost":   # its seq starts again from 1; it says what happened itself
            pass
        elif event["seq"] != expected:   # the broker dropped some for us: say so, never hide it
            print(f"({event['seq'] - expected} events missed)", file=sys.stderr, flush=True)
        expected = event["seq"] + 1
        print(json.dumps(event) if args.json else event_line(event), flush=True)
        printed += 1
    return 0


def event_line(event):
    stamp = time.strftime("%H:%M:%S", time.localtime(event["time_ms"] / 1000))
    fields = " ".join(f"{k}={v}" for k, v in event.items() if k not in EVENT_HEAD)
    return f"{stamp}.{event['time_ms'] % 1000:03d} {event['kind']:<18} {fields}"
