"""Prometheus metrics (`serve --metrics-port`) scraped over HTTP from a real broker while traffic
flows, checked against what the test sent; the actors report once a second, so a number is
awaited by scraping again (it is exposed only by query)."""
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from actorbroker.transport.client import Client
from tests.util import ROOT, failover_holding, wait_for


def scrape(broker):
    with urllib.request.urlopen(broker.metrics_url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0)


def test_counts_match_what_was_sent_while_traffic_flows(start_broker, topic):
    b = start_broker("--metrics-port", "0")
    assert b.metrics_url.startswith("http://127.0.0.1:")
    rounds, batch, size = 20, 50, 100
    sent = []
    with Client(*b.address) as client:
        reader = client.subscribe(topic, "read", "shared", "r", dispatch="reliable")
        client.subscribe(topic, "kept", "exclusive", "k").close()   # durable: its backlog grows
        producer = client.producer(topic)
        received = []

        def consume():
            while len(received) < rounds * batch:
                msg = reader.receive(timeout=30)
                reader.ack(msg)
                received.append(msg)

        consuming = threading.Thread(target=consume)
        consuming.start()
        seen_during = []
        for round_ in range(rounds):
            futures = [producer.send(b"x" * size) for _ in range(batch)]
            producer.flush()
            sent += [f.result(10) for f in futures]
            if round_ % 5 == 4:   # scraped while the producer and the consumer are busy
                samples = scrape(b)
                seen_during.append(value(samples, "actorbroker_topic_messages_in_total", topic=topic))
        consuming.join()
        total = rounds * batch
        assert seen_during == sorted(seen_during) and seen_during[-1] <= total

        def settled(samples):
            return (value(samples, "actorbroker_topic_messages_in_total", topic=topic) == total
                    and value(samples, "actorbroker_subscription_messages_out_total",
                              topic=topic, subscription="read") == total
                    and value(samples, "actorbroker_subscription_backlog_messages",
                              topic=topic, subscription="kept") == total)

        samples = wait_for(lambda: scrape(b), settled)
        assert value(samples, "actorbroker_topic_bytes_in_total", topic=topic) == total * size
        assert value(samples, "actorbroker_topic_messages_out_total", topic=topic) == total
        assert value(samples, "actorbroker_topic_bytes_out_total", topic=topic) > total * size
        assert value(samples, "actorbroker_subscription_consumers", topic=topic, subscription="read") == 1
        assert value(samples, "actorbroker_subscription_consumers", topic=topic, subscription="kept") == 0
        assert value(samples, "actorbroker_subscription_unacked_messages", topic=topic, subscription="read") == 0
        assert value(samples, "actorbroker_connections", state="open") >= 1
        assert value(samples, "actorbroker_publish_to_deliver_seconds_count") >= 1
        assert 0 < value(samples, "actorbroker_publish_to_deliver_seconds_bucket", le="+Inf")
        assert value(samples, "actorbroker_processes", kind="ab-topic") >= 1
        assert value(samples, "actorbroker_processes", kind="ab-shard") >= 1
        assert value(samples, "actorbroker_process_resident_memory_bytes", kind="ab-shard") > 1024 * 1024


def test_a_killed_failover_consumer_is_counted_cleaned_up_redelivered_and_promoted(start_broker, topic):
    b = start_broker("--metrics-port", "0")
    with Client(*b.address) as client:
        held, standby = failover_holding(b, client, topic, 7)
        before = scrape(b)
        held.proc.send_signal(signal.SIGKILL)
        held.stop()
        labels = {"topic": topic, "subscription": "s"}
        samples = wait_for(lambda: scrape(b), lambda s: value(
            s, "actorbroker_subscription_promotions_total", **labels) == 1 and value(
            s, "actorbroker_consumer_cleanup_seconds_count") >= 1 and value(
            s, "actorbroker_subscription_redelivered_total", **labels) >= 7)
        # the 7 held were sent again, to the standby (its receive queue has credits): 7, not more
        assert [standby.receive(timeout=10).redeliveries for _ in range(7)] == [1] * 7
        assert value(scrape(b), "actorbroker_subscription_redelivered_total", **labels) == 7
        assert value(samples, "actorbroker_disconnects_total", cause="eof") >= \
            value(before, "actorbroker_disconnects_total", cause="eof") + 1
        # detection (the shard reading EOF) to cleanup (the dispatcher done): well under a second
        assert value(samples, "actorbroker_consumer_cleanup_seconds_bucket", le="1.0") == \
            value(samples, "actorbroker_consumer_cleanup_seconds_count")
        client.subscribe(topic, "s", "failover", "b")   # the same name again: a takeover
        samples = wait_for(lambda: scrape(b), lambda s: value(s, "actorbroker_disconnects_total",
                                                              cause="replaced") == 1)


def test_metrics_are_off_unless_asked_and_a_taken_port_is_an_error(start_broker, tmp_path):
    b = start_broker()
    assert b.metrics_url is None
    kinds = [open(f"/proc/{pid}/comm").read().strip() for pid in b.processes()[1:]]
    assert "ab-metrics" not in kinds and "ab-events" in kinds
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        serve = subprocess.run([sys.executable, "-m", "actorbroker.scripts.cli", "serve", "--port", "0",
                                "--data-dir", str(tmp_path / "d"), "--metrics-port",
                                str(taken.getsockname()[1])],
                               cwd=ROOT, capture_output=True, timeout=60)
    assert serve.returncode == 1
    assert b"cannot serve metrics on 127.0.0.1:" in serve.stderr


def test_only_metrics_paths_are_served(start_broker):
    b = start_broker("--metrics-port", "0")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(b.metrics_url.replace("/metrics", "/other"), timeout=10)
    assert refused.value.code == 404
    with socket.create_connection((b.host, int(b.metrics_url.split(":")[2].split("/")[0]))) as idle:
        idle.sendall(b"GET /metr")   # a scraper that stops half way holds its socket, nothing more
        assert value(scrape(b), "actorbroker_processes", kind="ab-root") == 1


def test_a_report_of_the_wrong_shape_never_breaks_a_scrape(tmp_path):
    """Pure: the MetricsActor keeps only what it can render; the good reports still show."""

    from thespian.actors import ActorExitRequest
    from actorbroker.actors import metrics
    from actorbroker.actors.config import BrokerConfig
    from actorbroker.actors.reporting import MetricsReport
    from tests.test_actor_handlers import make
    config = BrokerConfig(data_dir=str(tmp_path), metrics_port=0)
    actor = make(metrics.MetricsActor, metrics.StartMetrics(config, 0))
    try:
        for bad in (None, {("actorbroker_topic_messages_in", ("/a/b",)): "7"},
                    {("actorbroker_topic_messages_in", ("/a/b", "extra")): 1}, {("nope", ()): 1},
                    {("actorbroker_topic_messages_in", (7,)): 1}):
            actor.receiveMessage(MetricsReport("bad", bad, bad, bad), None)
        actor.receiveMessage(MetricsReport("good", {("actorbroker_topic_messages_in", ("/a/b",)): 5}, {},
                                           {("actorbroker_consumer_cleanup_seconds", ()): ((1,) * 14, 0.5)}), None)
        status, _, body = actor._render("/metrics")
        assert status == "200 OK"
        assert b'actorbroker_topic_messages_in_total{topic="/a/b"} 5.0' in body
        assert b"actorbroker_consumer_cleanup_seconds_count 14.0" in body
    finally:
        actor.receiveMessage(ActorExitRequest(), None)
