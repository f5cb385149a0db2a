"""Topic churn leaves no state behind in the broker's long-lived actors: the ordered actor
channels they keep (actors/base.py) are those of live peers, as `actorbroker_ordered_channels`
on /metrics shows an operator (serve --metrics-port)."""
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from actorbroker.transport.client import Client
from tests.util import topic_round, wait_for

LONG_LIVED = ("ab-root", "ab-conn", "ab-shard")


def ordered_channels(broker):
    """{(kind, side): channels} of the long-lived actors, as scraped now."""
    with urllib.request.urlopen(broker.metrics_url, timeout=10) as response:
        text = response.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "actorbroker_ordered_channels" and sample.labels["kind"] in LONG_LIVED:
                found[(sample.labels["kind"], sample.labels["side"])] = sample.value
    return found


def test_topic_churn_leaves_no_channels_behind_in_long_lived_actors(start_broker, topic):
    b = start_broker("--metrics-port", "0", "--io-shards", "1")
    with Client(*b.address) as admin, Client(*b.address) as client:
        topic_round(client, admin, topic + "-warm-up")   # every long-lived channel is in use once
        base = wait_for(lambda: ordered_channels(b),
                        lambda found: len(found) == 2 * len(LONG_LIVED), timeout=30)
        assert base[("ab-conn", "out")] > 0 and base[("ab-root", "in")] > 0   # (it is counted)
        for i in range(50):
            topic_round(client, admin, f"{topic}-{i}")
        # back to what it was (or below: the warm-up's last channels may not have ended when it
        # was read): each topic's, subscription's and dispatcher's channels ended with them.
        # (The actors report every second, an unchanged figure every 3 s.)
        wait_for(lambda: ordered_channels(b),
                 lambda found: set(found) == set(base) and all(found[k] <= base[k] for k in base),
                 timeout=30)
