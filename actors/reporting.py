"""What an actor tells the MetricsActor: its own counters, gauges and histograms, as a message.

No registry is shared between processes (any actor may be on another host): each actor keeps
plain numbers of its own and, once a second while metrics are on, sends them all in one
`MetricsReport` (BrokerActor.start_reports). Counters and histograms are the totals since the
actor started, so a lost report loses nothing; gauges are the values now. A report equal to the
last one is skipped (sent only every REPORT_UNCHANGED_EVERY), so idle actors cost next to nothing.
The MetricsActor sums the sources. Everything is counted per batch on the record path, never per message.
"""
from bisect import bisect_left
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

REPORT_EVERY = timedelta(seconds=1)
REPORT_UNCHANGED_EVERY = 3.0   # seconds: an unchanged report is sent this seldom (MetricsActor
                               # forgets a source's gauges after SOURCE_EXPIRES_S without one)
# seconds; the publish time of a record is kept to the millisecond, so is that latency
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class MetricsReport:
    """From one actor incarnation (`source`): {(metric name, label values): number}."""
    source: str
    counters: dict
    gauges: dict
    histograms: dict     # (name, labels) -> (bucket counts, one per LATENCY_BUCKETS plus +Inf; sum)


@dataclass(frozen=True)
class ForgetSeries:
    """To the MetricsActor from a TopicActor: the topic was deleted (`subscription` None), or its
    subscription `subscription` was removed (unsubscribe, or a non_reliable one left idle). Every
    series of it goes, those of actors gone (kept as totals) and those still to come from its
    ending actors: the series a broker exports follow its live topics and subscriptions."""
    topic: str
    subscription: Any = None


class Histogram:
    """Observations of one actor, in LATENCY_BUCKETS (a bucket counts what falls in it alone)."""
    __slots__ = ("counts", "sum")

    def __init__(self):
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds):
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    def snapshot(self):
        return tuple(self.counts), self.sum
