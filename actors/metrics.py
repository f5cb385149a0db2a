"""MetricsActor: the broker's Prometheus endpoint (`serve --metrics-port`).

It gathers what the other actors report (actors/reporting.py: one MetricsReport per actor per
second, counters as totals) and serves them over HTTP from a socket in its own epoll
(actors/metrics_http.py), rendered by prometheus_client. A scrape is answered from what was last
reported, so it never waits for another actor and never holds one up. A source that stops
reporting (its actor exited) keeps its counters, folded into the totals, and loses its gauges;
but the series of a deleted topic or a removed subscription go altogether (ForgetSeries), so the
state kept here, and the series exported, follow the live topics and subscriptions.
The processes and memory of the broker are read from /proc at each scrape: those of this host.
"""
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from thespian.actors import ThespianWatch

from actorbroker.actors.base import BrokerActor, log
from actorbroker.actors.metrics_http import HttpServer
from actorbroker.actors.reporting import LATENCY_BUCKETS, ForgetSeries
from actorbroker.transport.lanes import Reactor

SOURCE_EXPIRES_S = 5.0   # no report for this long (an idle actor reports every 3 s): it is gone
# Between scrapes, sources are retired once silent this long (their number stays bounded by the
# live actors however long nobody scrapes; longer: a busy actor's late report is no new source)
SOURCE_GONE_S = 30.0
# A source that ends within this long of its topic's or subscription's deletion (ForgetSeries)
# leaves nothing of that one's series: its ending actors' last reports come after the word
FORGET_FOR_S = 2 * SOURCE_GONE_S

# name -> (type, help, label names); counters are named without their `_total`, which the
# exposition adds. The reporting actors use these names (see their metrics_snapshot).
FAMILIES = {
    "actorbroker_topic_messages_in": ("counter", "Messages published to the topic.", ("topic",)),
    "actorbroker_topic_bytes_in": ("counter", "Payload bytes published to the topic.", ("topic",)),
    "actorbroker_topic_messages_out": ("counter", "Messages delivered to consumers of the topic "
                                       "(all its subscriptions).", ("topic",)),
    "actorbroker_topic_bytes_out": ("counter", "Payload bytes delivered to consumers of the topic, "
                                    "as packed for the wire (each with its length header).", ("topic",)),
    "actorbroker_subscription_messages_out": ("counter", "Messages delivered to the subscription's "
                                              "consumers.", ("topic", "subscription")),
    "actorbroker_subscription_redelivered": ("counter", "Messages put back for redelivery.",
                                             ("topic", "subscription")),
    "actorbroker_subscription_dropped": ("counter", "non_reliable: messages dropped beyond the "
                                         "subscription's backlog bound.", ("topic", "subscription")),
    "actorbroker_subscription_dead_lettered": ("counter", "Messages moved to the dead-letter topic.",
                                               ("topic", "subscription")),
    "actorbroker_subscription_promotions": ("counter", "Failover: times another consumer became the "
                                            "active one.", ("topic", "subscription")),
    "actorbroker_subscription_backlog_messages": ("gauge", "Messages waiting for a consumer.",
                                                  ("topic", "subscription")),
    "actorbroker_subscription_unacked_messages": ("gauge", "Reliable: messages delivered and not "
                                                  "acknowledged.", ("topic", "subscription")),
    "actorbroker_subscription_consumers": ("gauge", "Consumers attached.", ("topic", "subscription")),
    "actorbroker_connections": ("gauge", "Client connections by state (handshake: before hello; "
                                "open; closing: ended, its last frames being written).", ("state",)),
    "actorbroker_disconnects": ("counter", "Ended client connections by cause, and consumers replaced "
                                "by a subscribe of the same name (cause replaced).", ("cause",)),
    "actorbroker_publish_to_deliver_seconds": ("histogram", "Time from a record's publish to its "
                                               "delivery being written to the consumer's connection "
                                               "(the oldest record of each delivery; to the "
                                               "millisecond).", ()),
    "actorbroker_consumer_cleanup_seconds": ("histogram", "Time from detecting a consumer's "
                                             "connection lost to its dispatcher having removed it "
                                             "(failover promoted, unacked put back).", ()),
    "actorbroker_ordered_channels": ("gauge", "Ordered actor channels whose state the broker's "
                                     "actors keep, by process kind and side (in: channels received "
                                     "on, out: sent on); bounded by the live actors.", ("kind", "side")),
    "actorbroker_processes": ("gauge", "Processes of the broker on this host, by kind.", ("kind",)),
    "actorbroker_process_resident_memory_bytes": ("gauge", "Resident memory of the broker's processes "
                                                  "on this host, by kind.", ("kind",)),
}


@dataclass(frozen=True)
class StartMetrics:
    config: Any
    admin_pid: int        # the broker's processes are this one and those below it


@dataclass(frozen=True)
class MetricsListening:
    port: int


@dataclass(frozen=True)
class MetricsFailed:
    error: str


class _Source:
    __slots__ = ("seen", "counters", "gauges", "histograms")

    def __init__(self):
        self.seen = 0.0
        self.counters, self.gauges, self.histograms = {}, {}, {}


class MetricsActor(BrokerActor):
    process_name = "ab-metrics"
    init_message = StartMetrics

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reactor = Reactor()
        self.server = None
        self.admin_pid = None
        self.sources = {}          # source id -> _Source
        self.retired = _Source()   # counters and histograms of sources gone
        self.forgotten = {}        # (topic, subscription or None) -> when its series were dropped
        self.expire_due = 0.0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def watch(self):
        return ThespianWatch([self.reactor.fileno()]) if self.server is not None else None

    def on_StartMetrics(self, msg, sender):
        self.admin_pid = msg.admin_pid
        config = msg.config
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in config.metrics_host else socket.AF_INET)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((config.metrics_host, config.metrics_port))
            sock.listen(64)
        except OSError as exc:
            self.send(sender, MetricsFailed(f"cannot serve metrics on {config.metrics_host}:"
                                            f"{config.metrics_port}: {exc}"))
            return
        self.server = HttpServer(self.reactor, sock, self._render)
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, sock.getsockname()[1])
        self.send(sender, MetricsListening(sock.getsockname()[1]))

    def on_WatchMessage(self, msg, sender):
        self.reactor.poll()

    def on_MetricsReport(self, msg, sender):
        if type(msg.source) is not str:
            return
        now = time.monotonic()
        source = self.sources.get(msg.source)
        if source is None:
            source = self.sources[msg.source] = _Source()
        source.seen = now
        # kept only in the shapes collect() reads: a scrape must never fail on one bad report
        source.counters = {k: v for k, v in _items(msg.counters) if _is_number(v)}
        source.gauges = {k: v for k, v in _items(msg.gauges) if _is_number(v)}
        source.histograms = {k: v for k, v in _items(msg.histograms) if _is_histogram(v)}
        if now >= self.expire_due:   # sources gone are retired even if nobody scrapes
            self.expire_due = now + 1.0
            self._expire(SOURCE_GONE_S)

    def on_ForgetSeries(self, msg, sender):
        if type(msg.topic) is not str or not (msg.subscription is None or type(msg.subscription) is str):
            return
        # its live actors' series go as they end (_expire)
        self.forgotten[(msg.topic, msg.subscription)] = time.monotonic()
        _drop_series(self.retired, {(msg.topic, msg.subscription)})

    def on_ActorExitRequest(self, msg, sender):
        if self.server is not None:
            self.server.close()
            self.server = None
        self.reactor.close()

    # --- scrapes ----------------------------------------------------------------------------------
    def _render(self, path):
        if path not in ("/metrics", "/"):
            return "404 Not Found", "text/plain", b"see /metrics\n"
        self._expire()
        return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)

    def _expire(self, silent_s=SOURCE_EXPIRES_S):
        now = time.monotonic()
        for source_id, source in list(self.sources.items()):
            if now - source.seen > silent_s:
                del self.sources[source_id]
                if self.forgotten:   # an actor of a deleted topic or subscription
                    _drop_series(source, self.forgotten)
                _add_into(self.retired, source)
        for labels, when in list(self.forgotten.items()):
            if now - when > FORGET_FOR_S:
                del self.forgotten[labels]

    def collect(self):
        """prometheus_client's collector interface: every family, from the sources' sums."""
        total = _Source()
        _add_into(total, self.retired)
        for source in self.sources.values():
            _add_into(total, source)
            for key, value in source.gauges.items():
                total.gauges[key] = total.gauges.get(key, 0) + value
        for kind, (count, rss) in broker_processes(self.admin_pid).items():
            total.gauges[("actorbroker_processes", (kind,))] = count
            total.gauges[("actorbroker_process_resident_memory_bytes", (kind,))] = rss
        for name, (kind, text, labels) in FAMILIES.items():
            if kind == "counter":
                family = CounterMetricFamily(name, text, labels=labels)
                for (metric, values), value in sorted(total.counters.items()):
                    if metric == name:
                        family.add_metric(values, value)
            elif kind == "gauge":
                family = GaugeMetricFamily(name, text, labels=labels)
                for (metric, values), value in sorted(total.gauges.items()):
                    if metric == name:
                        family.add_metric(values, value)
            else:
                family = HistogramMetricFamily(name, text, labels=labels)
                counts, seconds = total.histograms.get((name, ()), ((0,) * (len(LATENCY_BUCKETS) + 1), 0.0))
                family.add_metric((), _cumulative(counts), seconds)
            yield family


def _items(table):
    """The entries of a report's table keyed (known metric name, tuple of str label values)."""
    if type(table) is not dict:
        return []
    return [(key, value) for key, value in table.items()
            if type(key) is tuple and len(key) == 2 and key[0] in FAMILIES and type(key[1]) is tuple
            and len(key[1]) == len(FAMILIES[key[0]][2]) and all(type(v) is str for v in key[1])]


def _is_number(value):
    return type(value) in (int, float, bool)


def _is_histogram(value):
    return (type(value) is tuple and len(value) == 2 and _is_number(value[1]) and type(value[0]) is tuple
            and len(value[0]) == len(LATENCY_BUCKETS) + 1 and all(type(c) is int for c in value[0]))


def _drop_series(source, forgotten):
    """Remove from `source` the series of the topics and subscriptions `forgotten` names, as
    (topic, None): every series of that topic, (topic, subscription): those of that subscription."""
    for table in (source.counters, source.gauges, source.histograms):
        for key in [k for k in table if _of(k, forgotten)]:
            del table[key]


def _of(key, forgotten):
    names, values = FAMILIES[key[0]][2], key[1]
    if not names or names[0] != "topic":
        return False
    return (values[0], None) in forgotten or (
        names[1:2] == ("subscription",) and (values[0], values[1]) in forgotten)


def _add_into(total, source):
    """Add a source's counters and histograms into `total` (gauges are not added up over time)."""
    for key, value in source.counters.items():
        total.counters[key] = total.counters.get(key, 0) + value
    for key, (counts, seconds) in source.histograms.items():
        old_counts, old_seconds = total.histograms.get(key, ((0,) * len(counts), 0.0))
        total.histograms[key] = (tuple(a + b for a, b in zip(old_counts, counts)), old_seconds + seconds)


def _cumulative(counts):
    buckets, running = [], 0
    for bound, count in zip((*(str(b) for b in LATENCY_BUCKETS), "+Inf"), counts):
        running += count
        buckets.append((bound, running))
    return buckets


def broker_processes(admin_pid):
    """{process kind (its comm, ab-*): (count, resident bytes)} for `admin_pid` and below it."""
    found = {}
    page = os.sysconf("SC_PAGE_SIZE")
    todo = [admin_pid] if admin_pid else []
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/comm") as f:
                kind = f.read().strip()
            with open(f"/proc/{pid}/statm") as f:
                rss = int(f.read().split()[1]) * page
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                todo.extend(int(p) for p in f.read().split())
        except (OSError, ValueError, IndexError):
            continue
        count, total = found.get(kind, (0, 0))
        found[kind] = (count + 1, total + rss)
    return found
