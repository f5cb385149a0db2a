"""The `operability` scenario of `actorbroker bench`: what metrics and an attached `watch` cost.

Two brokers in the same run, alike but for `--metrics-port`: on the observed one a watcher takes
every lifecycle event (pattern "*") and a scraper reads /metrics every SCRAPE_EVERY_S, as a
Prometheus would (more often than the usual 15 s). Their non_reliable 1->1 throughput runs
alternate between the two brokers, so that the machine's other load falls on both alike; the
cost is 1 - observed / plain of the medians (issue 11's target: under 5%). On a busy machine
throughput varies far more than that from run to run, so each run also measures the CPU time
the broker's processes spent on it, per message, which other load hardly changes.
"""
import os
import sys
import threading
import time
import urllib.request

from actorbroker.scripts.local_broker import LocalBroker
from actorbroker.transport.client import Client

SCRAPE_EVERY_S = 1.0
SETTLE_S = 0.5


class Observer:
    """A watcher of every event and a scraper of the metrics, on threads of their own."""

    def __init__(self, broker):
        self.stop = threading.Event()
        self.events = 0
        self.scrapes = 0
        self.client = Client(*broker.address, name="bench-watcher")
        self.client.watch("*")
        self.threads = [threading.Thread(target=self._watch, daemon=True),
                        threading.Thread(target=self._scrape, args=(broker.metrics_url,), daemon=True)]
        for t in self.threads:
            t.start()

    def _watch(self):
        while not self.stop.is_set():
            try:
                self.client.next_event(timeout=0.5)
                self.events += 1
            except TimeoutError:
                continue
            except Exception:   # noqa: BLE001 - the connection ended: the bench goes on
                return

    def _scrape(self, url):
        while not self.stop.wait(SCRAPE_EVERY_S):
            with urllib.request.urlopen(url, timeout=10) as response:
                response.read()
            self.scrapes += 1

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join()
        self.client.close()


def run(bench, big_backlog):
    plain = LocalBroker(bench.tmp / "broker-plain", "--max-backlog", str(big_backlog))
    observed = LocalBroker(bench.tmp / "broker-observed", "--max-backlog", str(big_backlog), "--metrics-port", "0")
    observer = Observer(observed)
    results = {"plain": [], "observed": []}
    cpu = {"plain": [], "observed": []}
    try:
        for broker in (plain, observed):   # not counted: a new broker's first run also forks its actors
            bench.pubsub(f"{broker.host}:{broker.port}", bench.topic("warm"), "non_reliable",
                         max(100, bench.n // 10), [("op", "exclusive")])
        for i in range(bench.runs):
            order = (("plain", plain), ("observed", observed))
            for label, broker in order if i % 2 == 0 else order[::-1]:
                url = f"{broker.host}:{broker.port}"
                topic = bench.topic("op")
                before = broker_cpu_s(broker)
                pres, (cres,) = bench.pubsub(url, topic, "non_reliable", bench.n, [("op", "exclusive")])
                time.sleep(SETTLE_S)   # the subscription's processes end and are reaped: counted
                cpu[label].append(round((broker_cpu_s(broker) - before) / bench.n * 1e6, 2))
                results[label].append(cres["msg_s"])
                note(f"operability {label} run {i + 1}/{bench.runs}: {cres['msg_s']:,.0f} msg/s, "
                     f"broker CPU {cpu[label][-1]} us/msg (lost {bench.n - cres['received']})")
    finally:
        observer.close()
        for broker in (plain, observed):
            left = broker.stop()
            if left:
                bench.failures.append(f"operability: broker processes left after stop: {left}")
    plain_row = bench.add("operability", "metrics off", "delivered", "msg/s", results["plain"], messages=bench.n)
    row = bench.add("operability", "metrics + watch", "delivered", "msg/s", results["observed"], messages=bench.n,
                    events=observer.events, scrapes=observer.scrapes)
    if plain_row["median"] and row["median"]:
        row["cost_pct"] = round(100 * (1 - row["median"] / plain_row["median"]), 1)
    plain_row = bench.add("operability", "metrics off", "broker CPU per message", "us", cpu["plain"])
    row = bench.add("operability", "metrics + watch", "broker CPU per message", "us", cpu["observed"])
    if plain_row["median"] and row["median"]:
        row["cost_pct"] = round(100 * (row["median"] / plain_row["median"] - 1), 1)


def broker_cpu_s(broker):
    """CPU seconds (user + system) of the broker's processes and of their children already reaped."""
    total = 0
    for pid in broker.processes():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])   # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def note(text):
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)
