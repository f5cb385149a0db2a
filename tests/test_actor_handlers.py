"""Every handler of every broker actor, fed its own message type with hostile field values
(issue 10): no exception escapes into Thespian (which would retry the message, then drop it with
the rest of its Batch), a message that carries a request (a rid and a reply_to) is answered or
passed on, and the actor still answers a valid request afterwards.

The actors are the broker's real classes, initialised with valid messages; what would reach the
actor system (sends, wakeups, children) is recorded by a stand-in for Thespian's actor reference.
"""
import dataclasses
import inspect
import os
import socket

import pytest
from thespian.actors import ActorAddress, ActorExitRequest, ChildActorExited, WakeupMessage

from actorbroker.actors import (broker, cluster, connection, dispatcher, events, lifecycle, listener,
                                log as log_actor, metrics, reporting, shard, subscription, topic)
from actorbroker.actors import join_agent
from actorbroker.actors.config import BrokerConfig
from actorbroker.transport.lanes import LaneAddress

MODULES = [broker, cluster, connection, dispatcher, events, lifecycle, listener, log_actor, metrics, reporting,
           shard, subscription, topic]
CLIENT = ActorAddress("client-connection")
NOWHERE = LaneAddress("unix", "host", name="\0actorbroker-test-nothing-listens-here")
# No small non-negative ints: an init message's fds would be the test process's own.
HOSTILE = [None, -1, 2**70, "x", "", b"\xff", 1.5, [-7, [-8]], {"k": {"v": None}}, ActorAddress("stranger"),
           ("t", [1])]


class RecordingRef:
    """Where Thespian's actor reference would be: records instead of sending."""

    def __init__(self):
        self.address = ActorAddress("the-actor")
        self.sent = []
        self.children = 0

    def actor_send(self, target, msg):
        self.sent.append((target, msg))

    def wakeupAfter(self, period, payload):
        pass

    def createActor(self, actor_class, *args, **kwargs):
        self.children += 1
        return ActorAddress(f"child-{self.children}")


def make(actor_class, *init):
    actor_class = type("Quiet" + actor_class.__name__, (actor_class,), {"process_name": None})
    actor = actor_class()
    actor._myRef = RecordingRef()
    for msg in init:
        actor.receiveMessage(msg, ActorAddress("parent"))
    return actor


def message_class(actor_class, name):
    home = inspect.getmodule(actor_class.__mro__[1])
    for module in [home] + MODULES:
        cls = getattr(module, name, None)
        if dataclasses.is_dataclass(cls):
            return cls
    return {"WakeupMessage": WakeupMessage, "ChildActorExited": ChildActorExited}.get(name)


def hostile_messages(actor_class):
    """(message, is a request) for every handler's type, every hostile value in every field."""
    skip = {"ActorExitRequest", "WatchMessage"}
    for name in sorted(n[3:] for n in dir(actor_class) if n.startswith("on_") and n[3:] not in skip):
        cls = message_class(actor_class, name)
        assert cls is not None, f"{actor_class.__name__}.on_{name}: no message class found"
        if not dataclasses.is_dataclass(cls):
            for value in HOSTILE:
                yield (WakeupMessage(1, value) if cls is WakeupMessage else ChildActorExited(value)), False
            continue
        fields = [f.name for f in dataclasses.fields(cls)]
        for value in HOSTILE:
            yield cls(**{f: value for f in fields}), False
            if "rid" in fields and "reply_to" in fields:   # a request: it must be answered
                yield cls(**{f: (1, 2) if f == "rid" else CLIENT if f == "reply_to" else value
                             for f in fields}), True
            if "request" in fields:
                inner = topic.StatsRequest((1, 2), CLIENT)
                yield cls(**{f: inner if f == "request" else value for f in fields}), True


@pytest.fixture
def config(tmp_path):
    return BrokerConfig(data_dir=str(tmp_path), port=0, io_shards=1)


def _actors(config):
    """(actor, a valid request with its reply_to, or None) for every kind of broker actor."""
    ours, theirs = socket.socketpair()
    parent = ActorAddress("parent")
    made = [
        (make(broker.BrokerRootActor, broker.StartBroker(config, 0, 0)),
         broker.DeleteTopic((1, 9), "/no/such", CLIENT)),
        # a cluster node's root: its own topics, and routing to the others
        (make(broker.BrokerRootActor, broker.StartBroker(
            dataclasses.replace(config, node="a", cluster_leader=True, lanes="tcp"), 0, 0),
              listener.Listening("127.0.0.1", 1)),
         broker.Lookup((1, 9), "/a/b", CLIENT)),
        (make(join_agent.JoinAgent), None),
        (make(listener.ListenerActor, listener.Listen(config, parent)), None),
        (make(connection.ConnectionActor, connection.StartConnections(-1, (), 0, config, parent, parent),
              connection.ClientHello(7, "c", None)),
         connection.ClientRequest(7, {"op": "close_producer", "rid": 9, "producer": 1})),
        # the shard's socket object owns the fd it is given: a copy of ours, never closed twice
        (make(shard.ShardActor, shard.StartShard(os.dup(theirs.fileno()), 0, "shard-x", config, parent)), None),
        (make(topic.TopicActor, topic.InitTopic("/a/b", "non_reliable", config)),
         topic.CloseProducer(5, (1, 9), CLIENT)),
        (make(topic.TopicActor, topic.InitTopic("/a/r", "reliable", config),
              log_actor.LogOpened(NOWHERE, 0, 0, {}, 0, 0, 1)),
         topic.CloseProducer(5, (1, 9), CLIENT)),
        (make(subscription.SubscriptionActor, subscription.InitSubscription("/a/b", "s", "shared", "non_reliable",
                                                                           parent)),
         subscription.DetachConsumer(5, (1, 9), CLIENT)),
        (make(dispatcher.DispatcherActor, dispatcher.InitDispatcher("/a/b", "s", "shared", "non_reliable", config)),
         dispatcher.AddConsumer(5, "c", "shard-x", CLIENT, (1, 9), None)),
        (make(dispatcher.DispatcherActor, dispatcher.InitDispatcher(
            "/a/r", "s", "failover", "reliable", config, log=parent, log_lane=NOWHERE, broker=parent)),
         dispatcher.AddConsumer(5, "c", "shard-x", CLIENT, (1, 9), None)),
        (make(log_actor.LogActor, log_actor.OpenLog("/a/r", "reliable", config)),
         log_actor.SaveCursor("s", {"floor": 0, "acked": []})),
        (make(events.EventsActor), None),
        (make(metrics.MetricsActor, metrics.StartMetrics(dataclasses.replace(config, metrics_port=0), 0)), None),
    ]
    return made, (ours, theirs)


def test_no_message_with_any_field_values_escapes_a_handler_or_goes_unanswered(config):
    made, sockets = _actors(config)
    try:
        for actor, probe in made:
            name = type(actor).__mro__[1].__name__
            for msg, is_request in hostile_messages(type(actor)):
                ref = actor._myRef
                before = len(ref.sent)
                actor.receiveMessage(msg, ActorAddress("sender"))   # raises nothing
                if is_request:
                    assert len(ref.sent) > before, f"{name}: {msg!r} was neither answered nor passed on"
            if probe is not None:   # and it still serves a valid request
                actor._myRef.sent.clear()
                actor.receiveMessage(probe, CLIENT)
                assert actor._myRef.sent, f"{name} no longer answers {probe!r}"
    finally:
        for actor, _ in made:
            actor.receiveMessage(ActorExitRequest(), ActorAddress("parent"))
        for s in sockets:
            s.close()


def test_a_failing_handler_answers_its_request_and_the_rest_of_the_batch_is_handled(config):
    from actorbroker.actors import base
    actor = make(topic.TopicActor, topic.InitTopic("/a/b", "non_reliable", config))
    failing = topic.OpenProducer((1, 1), CLIENT, 3, None, "shared", "shard-x")
    actor.on_OpenProducer = lambda msg, sender: 1 / 0   # a bug in one handler
    batch = base.Ordered(("peer", "s"), 0, base.Batch((failing, topic.CloseProducer(3, (1, 2), CLIENT))))
    actor.receiveMessage(batch, ActorAddress("root"))
    answers = [m for target, m in actor._myRef.sent if target == CLIENT]
    assert [type(m).__name__ for m in answers] == ["RequestFailed", "RequestDone"]
    assert answers[0].rid == (1, 1) and answers[0].code == "INTERNAL" and answers[1].rid == (1, 2)
    assert actor.handler_errors == 1
    actor.receiveMessage(ActorExitRequest(), ActorAddress("parent"))


def test_a_subscribe_resumed_by_a_probe_whose_handling_fails_is_answered(config):
    """A subscribe waits for the exclusive holder's probe (HolderProbed, which carries no
    request): a bug while it is handled answers that subscribe INTERNAL at once, instead of
    leaving it to its 30 s deadline."""
    parent = ActorAddress("topic")
    actor = make(subscription.SubscriptionActor, subscription.InitSubscription("/a/b", "s", "exclusive",
                                                                              "non_reliable", parent))
    waiting = topic.Subscribe((1, 7), CLIENT, "shard-x", 11, "s", "exclusive", "newcomer", "latest", {})
    actor.probing[3] = (waiting, 10)
    actor._subscribe = lambda msg, probed=None: 1 / 0   # a bug on the way
    actor.receiveMessage(subscription.HolderProbed(3), ActorAddress("dispatcher"))
    answers = [m for target, m in actor._myRef.sent if target == CLIENT]
    assert [(type(m).__name__, m.rid, m.code) for m in answers] == [("RequestFailed", (1, 7), "INTERNAL")]
    assert actor.handler_errors == 1 and not actor.probing
    actor.receiveMessage(ActorExitRequest(), ActorAddress("parent"))
