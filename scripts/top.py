"""`actorbroker top`: a live view of a broker, refreshed every second, in any terminal.

It polls the admin ops (`topics`, `stats` of each topic, `broker_stats`) and computes rates from
the difference of successive counters; `rich`'s Live display draws it (no escape codes of our
own), so it works over a plain SSH terminal. `q` quits (so does Ctrl-C)."""
import os
import select
import sys
import termios
import time
import tty

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from actorbroker.transport.errors import UNKNOWN_OP, BrokerError


def add_top_command(subparsers, common):
    p = subparsers.add_parser(
        "top", parents=[common], help="live view of topics, rates, backlogs and consumers",
        description="A live view of the broker, refreshed every --interval seconds: topics with their "
                    "rates in and out, subscriptions with backlog and consumers (the active one of a "
                    "failover subscription marked *), connections, processes and memory. q quits.")
    from actorbroker.scripts.client_commands import MAX_SECONDS, seconds_arg, with_client
    p.add_argument("--interval", type=seconds_arg(0.1, MAX_SECONDS), default=1.0, metavar="SECONDS",
                   help=f"refresh period, from 0.1 to {MAX_SECONDS} (default %(default)s)")
    p.add_argument("--once", action="store_true", help="print one view (rates over one interval) and exit")
    p.set_defaults(func=with_client(top))


class Rates:
    """Messages per second of counters, from their previous value and time."""

    def __init__(self):
        self.last = {}

    def rate(self, key, value, now):
        before = self.last.get(key)
        self.last[key] = (value, now)
        if before is None or now <= before[1] or value < before[0]:   # new, or counted afresh
            return None
        return (value - before[0]) / (now - before[1])


def snapshot(client):
    """What the broker says now: (broker_stats or None, [stats of each topic])."""
    try:
        broker = client.broker_stats()
    except BrokerError as exc:
        if exc.code != UNKNOWN_OP:
            raise
        broker = None   # an older broker
    stats = []
    for summary in client.topics():
        try:
            stats.append(client.stats(summary["name"]))
        except BrokerError:
            continue   # deleted meanwhile
    return broker, stats


def _rate(value):
    return "-" if value is None else f"{value:,.0f}"


def _bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024


def render(address, broker, stats, rates, now, live=True):
    """The view: a header line, the topics table, the subscriptions table (and the keys, live)."""
    head = Text(f"actorbroker top  {address}  {time.strftime('%H:%M:%S')}", style="bold")
    if broker is not None:
        head.append(f"\nconnections {broker['connections']}  processes {broker['processes']}  "
                    f"memory {_bytes(broker['memory_bytes'])}  topics {broker['topics']}")
    topics = Table(title="topics", title_justify="left", expand=False)
    for column in ("topic", "dispatch", "in/s", "out/s", "msgs_in", "producers", "subscriptions"):
        topics.add_column(column, justify="left" if column in ("topic", "dispatch") else "right")
    subs = Table(title="subscriptions (* the active consumer of a failover subscription)",
                 title_justify="left", expand=False)
    for column in ("topic", "subscription", "type", "backlog", "out/s", "consumer", "unacked", "credits"):
        subs.add_column(column, justify="left" if column in ("topic", "subscription", "type", "consumer")
                        else "right")
    for st in sorted(stats, key=lambda s: s["topic"]):
        name = st["topic"]
        rate_in = rates.rate(("in", name), st.get("msgs_in", 0), now)
        rate_out = None
        for sub in st.get("subscriptions", []):
            r = rates.rate(("out", name, sub["name"]), sub.get("msgs_out", 0), now)
            rate_out = r if rate_out is None else rate_out + (r or 0)
            add_subscription(subs, name, sub, r)
        topics.add_row(name, st.get("dispatch", ""), _rate(rate_in), _rate(rate_out),
                       f"{st.get('msgs_in', 0):,}", str(st.get("producers", 0)),
                       str(len(st.get("subscriptions", []))))
    if not live:
        return Group(head, topics, subs)
    return Group(head, topics, subs, Text("q quits", style="dim"))


def add_subscription(table, topic, sub, rate_out):
    """One row per consumer (the subscription's own cells on its first row; a row of its own if it
    has none)."""
    consumers = sub.get("consumers") or [None]
    for n, c in enumerate(consumers):
        head = (topic, sub["name"], sub.get("type", ""), f"{sub.get('backlog', 0):,}", _rate(rate_out)) \
            if n == 0 else ("", "", "", "", "")
        if c is None:
            table.add_row(*head, "(none)", "", "")
            continue
        mark = "*" if sub.get("type") == "failover" and c.get("active") else ""
        table.add_row(*head, mark + c["name"], f"{c.get('unacked', 0):,}", f"{c.get('credits', 0):,}")


class Keys:
    """Single key presses from a terminal (cbreak mode, restored on exit); none from a pipe."""

    def __init__(self, stream):
        self.fd = stream.fileno() if stream.isatty() else None
        self.saved = None

    def __enter__(self):
        if self.fd is not None:
            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def wait(self, timeout):
        """A key pressed within timeout seconds, or None."""
        if self.fd is None:
            time.sleep(timeout)
            return None
        ready, _, _ = select.select([self.fd], [], [], timeout)
        return os.read(self.fd, 1).decode(errors="replace") if ready else None


def top(client, args):
    """The live view until q or Ctrl-C."""
    host, port, tls = args.url
    address = f"{'tls://' if tls else ''}{host}:{port}"
    rates = Rates()
    # Piped or redirected (`--once > file`), rich would cut names to 80 columns: none to cut there.
    console = Console() if sys.stdout.isatty() else Console(width=1000)

    def view():
        return render(address, *snapshot(client), rates, time.monotonic(), live=not args.once)

    if args.once:   # two polls: the rates need a previous value
        view()
        time.sleep(args.interval)
        console.print(view())
        return 0
    with Keys(sys.stdin) as keys, Live(console=console, screen=True, auto_refresh=False) as live:
        while True:
            live.update(view(), refresh=True)
            deadline = time.monotonic() + args.interval
            while (left := deadline - time.monotonic()) > 0:
                if (keys.wait(left) or "").lower() == "q":
                    return 0
