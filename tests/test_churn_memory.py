"""A broker that churns topics, subscriptions and connections for months keeps the state of its
live ones only. What an operator sees of that state: the series /metrics exports (serve
--metrics-port). Those of a deleted topic, and of a subscription removed (unsubscribed, or a
non_reliable one its consumers left), go with it, as Pulsar drops a deleted topic's series;
the metrics actor keeps nothing of them. (Raw memory is too noisy to assert on: see
docs/operations.md for what churn costs the processes.)"""
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from actorbroker.transport.client import Client
from tests.util import topic_round, wait_for

TOPICS = 15        # topic rounds: created, produced to, consumed from, closed, deleted
CONNECTIONS = 15   # connection rounds on one long-lived topic, each with a subscription of its own


def series(broker):
    """Every series exported now: {(sample name, sorted labels)}."""
    with urllib.request.urlopen(broker.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items())))
            for family in text_string_to_metric_families(text) for sample in family.samples}


def labelled(found, label):
    return {dict(labels)[label] for _, labels in found if label in dict(labels)}


def of_topics(found):
    """The series of topics and subscriptions."""
    return {(name, labels) for name, labels in found if "topic" in dict(labels)}


def connection_round(broker, keep, i):
    """A short connection: a subscription of its own on `keep`, unsubscribed, or (every other
    round) left by its only consumer, which drops a non_reliable subscription."""
    with Client(*broker.address) as client:
        consumer = client.subscribe(keep, f"sub-{i}", "exclusive", "c")
        if i % 2:
            consumer.unsubscribe()


def test_churned_topics_and_subscriptions_leave_no_series_behind(start_broker, topic):
    b = start_broker("--metrics-port", "0", "--io-shards", "1")
    keep = topic + "-keep"
    with Client(*b.address) as admin, Client(*b.address) as client:
        live = client.subscribe(keep, "live", "exclusive", "c")
        client.producer(keep).send_sync(b"x")
        assert live.receive(timeout=10).payload == b"x"

        def settled(found):   # the live topic and subscription, nothing of those gone
            return labelled(found, "topic") == {keep} and labelled(found, "subscription") == {"live"}

        def reported(found):   # by the topic and by the subscription's dispatcher: all there is
            return settled(found) and ("actorbroker_topic_messages_in_total", (("topic", keep),)) in found \
                and ("actorbroker_subscription_messages_out_total",
                     (("subscription", "live"), ("topic", keep))) in found

        base = of_topics(wait_for(lambda: series(b), reported, timeout=30))

        for i in range(TOPICS):
            topic_round(client, admin, f"{topic}-{i}")
        for i in range(CONNECTIONS):
            connection_round(b, keep, i)

        # back to the base: the live topic's and subscription's series, not one more (those of
        # an ended actor go once its last report is 5 s old)
        after = of_topics(wait_for(lambda: series(b), lambda found: settled(found) and
                                   len(of_topics(found)) <= len(base), timeout=30))
        assert after == base
