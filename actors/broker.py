"""BrokerActor: the root of the broker's actors.

It owns the topic registry (name -> TopicActor) and the id counter for producers and consumers,
starts the listener, and watches the `serve` process through a pidfd: when `serve` dies, even by
SIGKILL, it asks the actor system to shut down, so that no actor outlives the broker.

Supervision (restart rules): the listener is permanent (restarted on the same port; its
connection shards die with it, and the lanes of the dead shards tell every topic and dispatcher
to drop their producers and consumers); a topic that dies leaves the registry, and a reliable one
is reopened at once from its log (its durable subscriptions with it); a non_reliable one comes
back with the next producer or subscribe.
"""
import dataclasses
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from thespian.actors import ActorExitRequest, ThespianWatch

from actorbroker.actors import cluster, connection, listener, metrics, signing, topic
from actorbroker.actors.base import BrokerActor, OperabilityMoved, log
from actorbroker.actors.cluster_root import ClusterRoot
from actorbroker.actors.lifecycle import emit
from actorbroker.actors.process import stop_actor_system_process, tree_memory
from actorbroker.storage.topic_store import stored_topics
from actorbroker.transport import errors as E

GATHER_TIMEOUT = timedelta(seconds=5)
TREE_MEMORY_TTL_S = 1.0   # broker_stats: how old its process count and memory figure may be
# A topic that died is remembered this long: what was sent to it meanwhile comes back
# (undeliverable) and goes to its successor. Thespian fails a transmit to a dead child at once.
LOST_TOPIC_MEMORY = timedelta(seconds=30)
# Requests passed on to a topic that, should they come back undeliverable, are passed on again;
# those that may create the topic create it again (a non_reliable topic is not reopened).
REROUTED = {topic.Subscribe: True, topic.OpenProducer: True, topic.Publish: True, topic.StatsRequest: False}


@dataclass(frozen=True)
class StartBroker:
    config: Any
    serve_pid: int
    admin_port: int


@dataclass(frozen=True)
class BrokerStarted:
    host: str
    port: int
    admin_pid: int
    metrics_port: Any = None    # where Prometheus scrapes (None: metrics are off)


@dataclass(frozen=True)
class BrokerFailed:
    error: str
    admin_pid: int = 0   # so that serve can make sure the whole tree is gone


@dataclass(frozen=True)
class TopicRequest:
    """Route `request` to the topic `name`; create the topic first when `create_dispatch` is set.

    Requests that open a producer or consumer get their broker-wide unique id here.
    """
    name: str
    create_dispatch: Any
    request: Any


@dataclass(frozen=True)
class ListTopics:
    rid: int
    reply_to: Any


@dataclass(frozen=True)
class BrokerStatsRequest:
    """The `broker_stats` admin op: the root adds its host's processes and memory, the listener
    the connections, and answers the connection actor."""
    rid: Any
    reply_to: Any


@dataclass(frozen=True)
class DeleteTopic:
    rid: int
    name: str
    reply_to: Any


@dataclass(frozen=True)
class Lookup:
    """Which node owns (or would own) this topic."""
    rid: Any
    topic: str
    reply_to: Any


@dataclass(frozen=True)
class ClusterStatus:
    """The members, their role, load and heartbeat age (one row on a single broker)."""
    rid: Any
    reply_to: Any


@dataclass(frozen=True)
class TopicLost:
    """A connection actor learnt over a lane that this topic actor is gone, maybe before we get its
    ChildActorExited: forget it now, so that the client's next request finds a live topic."""
    address: Any


@dataclass(frozen=True)
class Undelivered:
    """To the root from itself: requests it passed on to a topic that had died came back."""
    address: Any
    requests: tuple


@dataclass(frozen=True)
class Ping:
    """serve asks the root now and then: no answer means the actor system is lost."""


@dataclass(frozen=True)
class Pong:
    pass


@dataclass(frozen=True)
class TopicSummary:
    token: int
    summary: dict



class BrokerRootActor(ClusterRoot, BrokerActor):
    process_name = "ab-root"
    init_message = StartBroker

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.config = None
        self.topics = {}          # name -> (address, dispatch)
        self.next_id = 1
        self.listener = None
        self.stop_asker = None   # serve, while the client connections are being closed
        self.flushing = set()    # tokens of topics still saving their cursors before the stop
        self.starter = None
        self.admin_port = None
        self.lifeline = None      # pidfd of the serve process
        self.next_token = 1
        self.stopping = False
        self.listen_port = None
        self.listen_host = None
        self.membership = None    # cluster only (actors/cluster_root.py)
        self.node_gathers = {}    # token -> [rid, reply_to, nodes expected, summaries]
        self.connections_open = 0   # as the listener last counted them
        self.msgs_in = (0, time.monotonic())   # messages our topics received so far, and when
        self.msgs_per_s = 0.0
        self.status_waiting = []     # `cluster` requests of a single broker, waiting for its measure
        self.status_measured = set() # what of that measure has come: "connections", "rate"
        self.gathers = {}         # token -> [reply_to, expected, summaries]: this node's topics
        self.metrics_port = None  # None until the MetricsActor listens (when metrics are on)
        self.tree_memory = None   # (when, processes, PSS bytes) for broker_stats
        self.lost_topics = {}     # str(address) of a topic that died -> (name, dispatch), for a while

    def watch(self):
        return ThespianWatch([self.lifeline]) if self.lifeline is not None else None

    def on_StartBroker(self, msg, sender):
        self.config = msg.config
        self.starter = sender
        self.admin_port = msg.admin_port
        try:
            self.lifeline = os.pidfd_open(msg.serve_pid)
        except ProcessLookupError:
            # serve died before we could watch it (killed while starting): nobody will stop us
            self.stopping = True
            log.warning("serve process %s died before the broker started; shutting the actor "
                        "system down", msg.serve_pid)
            stop_actor_system_process(self.admin_port, self.config.actor_host, signing.installed().secret)
            return
        except (OSError, AttributeError) as exc:
            log.warning("cannot watch serve process %s: %s", msg.serve_pid, exc)
        self._start_operability()
        if self.config.shared_data:   # the reliable topics whose latest epoch this node holds
            stored = stored_topics(self.config.shared_data, owner=self.config.node)
        else:
            stored = stored_topics(self.config.data_dir)
        for name, dispatch in stored:   # durable topics come back
            self._create_topic(name, dispatch)
        self.listener = self.createActor("actorbroker.actors.listener.ListenerActor")
        self.send(self.listener, listener.Listen(self.config, self.myAddress))
        self.start_reports(self.config.metrics)   # (its ordered channels: one per topic)

    def _start_operability(self):
        """The EventsActor, and the MetricsActor when metrics are on: every actor started after
        this finds their addresses in its config."""
        changes = {"events": self.createActor("actorbroker.actors.events.EventsActor")}
        if self.config.metrics_port is not None:
            changes["metrics"] = self.createActor("actorbroker.actors.metrics.MetricsActor")
            self.send(changes["metrics"], metrics.StartMetrics(self.config, os.getppid()))
        self.config = dataclasses.replace(self.config, **changes)

    def on_Listening(self, msg, sender):
        if self.listen_port is None:
            self.listen_port = msg.port
            self.listen_host = msg.host
            if self.config.node:   # join once clients can be served: heartbeats carry our address
                self.cluster_start()
            self._started()

    def on_MetricsListening(self, msg, sender):
        if self.metrics_port is None:
            self.metrics_port = msg.port
            self._started()

    def on_MetricsFailed(self, msg, sender):
        if self.metrics_port is not None:   # a restarted MetricsActor (the port was taken meanwhile)
            log.error("metrics not served any more: %s", msg.error)
        if self.metrics_port is None and self.starter is not None:
            self.send(self.starter, BrokerFailed(msg.error, os.getppid()))
            self.starter = None

    def _started(self):
        """serve hears of the start once clients can connect and, if on, metrics be scraped."""
        if self.listen_port is None or self.starter is None:
            return
        if self.config.metrics is not None and self.metrics_port is None:
            return
        self.send(self.starter, BrokerStarted(self.listen_host, self.listen_port, os.getppid(),
                                              self.metrics_port))
        self.starter = None

    def on_Ping(self, msg, sender):
        self.send(sender, Pong())

    def on_ListenFailed(self, msg, sender):
        if self.listen_port is None and self.starter is not None:
            self.send(self.starter, BrokerFailed(msg.error, os.getppid()))
            self.starter = None
        else:   # a restarted listener could not bind again: nothing can serve clients any more
            log.critical("listener restart failed: %s", msg.error)

    def on_WatchMessage(self, msg, sender):
        if self.lifeline is None or self.lifeline not in msg.ready:
            return
        # serve is gone: shut the whole system down from outside (an actor may not do it). Also
        # when serve died while stopping us (StopClients): nobody else would finish the stop, and
        # the pidfd, readable for good, kept this process spinning in Thespian's loop.
        log.warning("serve process died%s; shutting the actor system down",
                    " while stopping the broker" if self.stopping else "")
        self.stopping = True
        os.close(self.lifeline)
        self.lifeline = None
        stop_actor_system_process(self.admin_port, self.config.actor_host, signing.installed().secret)

    # --- topic registry -----------------------------------------------------------------------
    def on_TopicRequest(self, msg, sender):
        self.handle_request(msg, placed=False)

    def on_Lookup(self, msg, sender):
        self.lookup(msg, placed=False)

    def handle_request(self, msg, placed):
        """A TopicRequest, DeleteTopic or Lookup: here if this node owns the topic, else to its
        owner."""
        if isinstance(msg, Lookup):
            self.lookup(msg, placed)
            return
        if isinstance(msg, DeleteTopic):
            if not self.route(msg.name, msg, msg, placed):
                self._delete_topic(msg)
            return
        request = msg.request
        if getattr(request, "new_id", None) == 0:
            request = dataclasses.replace(request, new_id=self.next_ident())
            msg = dataclasses.replace(msg, request=request)
        if self.route(msg.name, msg, request, placed):
            return
        entry = self.topics.get(msg.name)
        if entry is None:
            if msg.create_dispatch is None:
                self.send(request.reply_to, connection.RequestFailed(
                    request.rid, E.TOPIC_NOT_FOUND, f"topic {msg.name} does not exist"))
                return
            # A dead-letter Publish has no one to refuse to: its subscription exists, so it may
            # create its topic even beyond the limit.
            if len(self.topics) >= self.config.max_topics and hasattr(request, "reply_to"):
                self.send(request.reply_to, connection.RequestFailed(request.rid, E.OVERLOADED, (
                    f"the broker has {len(self.topics)} topics (max_topics {self.config.max_topics})")))
                return
            # A node that sees no majority (cut off from the others) creates no reliable topic:
            # the majority side may create the same one meanwhile, and two logs of one topic
            # would both stay after the cut heals (each with receipted messages the other lacks).
            if self.clustered and msg.create_dispatch == "reliable" and not self.membership.quorum() \
                    and hasattr(request, "reply_to"):
                live = 1 + len(self.membership.live())
                self.send(request.reply_to, connection.RequestFailed(request.rid, E.TOPIC_UNAVAILABLE, (
                    f"node {self.config.node} sees {live} of {1 + len(self.membership.members)} members of "
                    f"the cluster: a new reliable topic is created only with a majority in view; send it "
                    f"again, or to another node")))
                return
            # in a shared folder, a topic whose log a lost node held is taken over (fenced)
            live = tuple(self.membership.live_names()) if self.clustered else None
            entry = self._create_topic(msg.name, msg.create_dispatch, live)
            emit(self, self.config.events, "topic_created", topic=msg.name, dispatch=msg.create_dispatch)
        self.send_ordered(entry[0], request, msg.name)

    def _create_topic(self, name, dispatch, live=None):
        address = self.createActor("actorbroker.actors.topic.TopicActor")
        self.forget_ordered(name, end=False)   # (a topic of that name before is gone)
        self.send_ordered(address, topic.InitTopic(name, dispatch, self.config, live,
                                                   getattr(self, "incarnation", "")), name)
        entry = self.topics[name] = (address, dispatch)
        return entry

    def on_DeleteTopic(self, msg, sender):
        self.handle_request(msg, placed=False)

    def _delete_topic(self, msg):
        entry = self.topics.pop(msg.name, None)
        if entry is None:
            self.send(msg.reply_to, connection.RequestFailed(
                msg.rid, E.TOPIC_NOT_FOUND, f"topic {msg.name} does not exist"))
            return
        self.send_ordered(entry[0], topic.DeleteTopic(msg.rid, msg.reply_to), msg.name)
        self.forget_ordered(msg.name)   # its last message: the channel ends with it

    def on_ListTopics(self, msg, sender):
        # every node's topics (just ours on a single broker), gathered as NodeTopics
        self.gather_cluster_topics(msg.rid, msg.reply_to)

    def gather_local(self, token, reply_to):
        """The summaries of this node's topics, sent to `reply_to` as one NodeTopics."""
        if not self.topics:
            self.send(reply_to, cluster.NodeTopics(token, ()))
            return
        local = self.next_token
        self.next_token += 1
        self.gathers[local] = [(token, reply_to), len(self.topics), []]
        for name, (address, _) in self.topics.items():
            self.send_ordered(address, topic.SummaryRequest(local), name)
        self.wakeupAfter(GATHER_TIMEOUT, payload=("gather", local))

    def on_BrokerStatsRequest(self, msg, sender):
        # Reading every process's smaps costs ~10 ms: measured at most once per TREE_MEMORY_TTL_S,
        # or a burst of requests kept the root from answering serve's liveness ping (serve exited)
        now = time.monotonic()
        if self.tree_memory is None or now - self.tree_memory[0] > TREE_MEMORY_TTL_S:
            # the admin: every broker process descends from it
            self.tree_memory = (now, *tree_memory(os.getppid()))
        _, processes, memory = self.tree_memory
        frame = {"op": "broker_stats", "rid": msg.rid[1], "topics": len(self.topics),
                 "processes": processes, "memory_bytes": memory}
        self.send(self.listener, listener.CountConnections(msg.rid, msg.reply_to, frame))

    def on_TopicSummary(self, msg, sender):
        gather = self.gathers.get(msg.token)
        if gather is None:
            return
        gather[2].append(msg.summary)
        if len(gather[2]) >= gather[1]:
            self._answer_gather(msg.token)

    def on_WakeupMessage(self, msg, sender):
        if msg.payload == "heartbeat":
            self.cluster_tick()
        elif isinstance(msg.payload, tuple) and msg.payload[0] == "gather":
            self._answer_gather(msg.payload[1])
        elif isinstance(msg.payload, tuple) and msg.payload[0] == "cluster-gather":
            self.answer_cluster_topics(msg.payload[1])
        elif msg.payload == "stop-flush":
            self._stopped_when_flushed(force=True)
        elif msg.payload == "status-measured":
            self._status_part_measured(force=True)
        elif isinstance(msg.payload, tuple) and msg.payload[0] == "lost-topic":
            self.lost_topics.pop(msg.payload[1], None)

    def _answer_gather(self, token):
        gather = self.gathers.pop(token, None)
        if gather is not None:
            (their_token, reply_to), _, summaries = gather
            self.send(reply_to, cluster.NodeTopics(their_token, tuple(summaries)))

    def on_TopicMoved(self, msg, sender):
        """A reliable topic opened here found its log held by another node (shared folder):
        forget ours, and send the next requests for it to that node."""
        entry = self.topics.get(msg.name)
        if entry is not None and entry[0] == sender:
            del self.topics[msg.name]
            self.forget_ordered(msg.name, end=False)   # (ended just below)
        if self.clustered:
            self.membership.placed_on(msg.owner, msg.name, "reliable")
        self.send(sender, ActorExitRequest())

    def on_TopicLost(self, msg, sender):
        # Lost to a connection actor means its lanes ended: the process is dead, or (a fault of
        # ours, such as an oversized lane frame) alive and cut off. Asked to exit, it does not
        # stay behind with its subscriptions and their consumers, forgotten here.
        if any(address == msg.address for address, _ in self.topics.values()):
            self.send(msg.address, ActorExitRequest())
        self._topic_exited(msg.address)

    def on_ChildActorExited(self, msg, sender):
        # delivered once or twice: both branches act only on an address still registered
        if msg.childAddress == self.listener and not self.stopping:
            log.error("listener exited; restarting it on port %s", self.listen_port)
            self.listener = self.createActor("actorbroker.actors.listener.ListenerActor")
            config = dataclasses.replace(self.config, port=self.listen_port)
            self.send(self.listener, listener.Listen(config, self.myAddress))
            return
        if msg.childAddress in (self.config.events, self.config.metrics) and not self.stopping:
            self._restart_operability(msg.childAddress)
            return
        self._topic_exited(msg.childAddress)

    def _restart_operability(self, dead):
        """The EventsActor or MetricsActor died: a new one (metrics on the port scrapers know),
        and every actor that sends to it learns its address, down the tree. Events decided
        meanwhile are lost (watchers are told: `events_lost`); metric totals come back with the
        actors' next reports."""
        events, metrics_address = self.config.events, self.config.metrics
        if dead == events:
            log.error("the events actor exited; restarting it")
            events = self.createActor("actorbroker.actors.events.EventsActor")
        else:
            log.error("the metrics actor exited; restarting it on port %s", self.metrics_port)
            metrics_address = self.createActor("actorbroker.actors.metrics.MetricsActor")
            self.send(metrics_address, metrics.StartMetrics(
                dataclasses.replace(self.config, metrics_port=self.metrics_port or 0), os.getppid()))
        # as any actor of the tree takes it (BrokerActor.on_OperabilityMoved): our own "events"
        # channel starts afresh too (our topic_created events), then the children are told
        self.on_OperabilityMoved(OperabilityMoved(events, metrics_address), self.myAddress)

    def operability_children(self):
        return [self.listener] + [address for address, _ in self.topics.values()]

    def known_children(self):
        return self.operability_children()

    def _topic_exited(self, dead):
        for name, (address, dispatch) in list(self.topics.items()):
            if address == dead:
                del self.topics[name]   # deleted, or crashed
                self.lost_topics[str(address)] = (name, dispatch)
                self.wakeupAfter(LOST_TOPIC_MEMORY, payload=("lost-topic", str(address)))
                self.forget_ordered(name, end=False)   # (what waits goes to it, and comes back)
                if dispatch == "reliable" and not self.stopping:   # (a deleted one left the registry first)
                    log.error("topic %s exited; reopening it from its log", name, extra={"topic": name})
                    self._create_topic(name, dispatch)

    def on_StopClients(self, msg, sender):
        """From serve, before it shuts the actor system down (listener.StopClients)."""
        self.stopping = True
        self.stop_asker = sender
        if self.listener is None:
            self.send(sender, listener.ClientsStopped())
        else:
            self.send(self.listener, msg)

    def on_ClientsStopped(self, msg, sender):
        """The clients are gone: now every reliable topic's cursors go to disk, so that a clean
        restart redelivers nothing acknowledged (acks without a rid wait up to CURSOR_SAVE_DELAY
        for their save); then serve hears that the broker may stop."""
        if self.stop_asker is None:
            return
        reliable = [address for address, dispatch in self.topics.values() if dispatch == "reliable"]
        self.flushing = set(range(self.next_token, self.next_token + len(reliable)))
        for address in reliable:
            self.send(address, topic.FlushCursors(self.next_token))
            self.next_token += 1
        self._stopped_when_flushed()
        self.wakeupAfter(GATHER_TIMEOUT, payload="stop-flush")

    def on_CursorsFlushed(self, msg, sender):
        self.flushing.discard(msg.token)
        self._stopped_when_flushed()

    def _stopped_when_flushed(self, force=False):
        if self.stop_asker is not None and (not self.flushing or force):
            self.send(self.stop_asker, listener.ClientsStopped())
            self.stop_asker = None

    def on_ActorExitRequest(self, msg, sender):
        self.stopping = True

    def undeliverable(self, address, msgs):
        """Requests passed on to a topic that had died (a subscribe right after its kill -9,
        before or while we heard of it): handled as a message of our own, not inside the
        transmit callback (which may run inside our own sends, amid a topic's restart)."""
        returned = tuple(m for m in msgs if type(m) in REROUTED)
        if returned:
            self.send(self.myAddress, Undelivered(address, returned))

    def on_Undelivered(self, msg, sender):
        """They go to the topic that replaced it, or create it anew, instead of waiting for the
        request deadline. A topic still registered is known dead by this: as TopicLost."""
        if any(address == msg.address for address, _ in self.topics.values()):
            self._topic_exited(msg.address)
        lost = self.lost_topics.get(str(msg.address))
        if lost is None:   # (a deleted topic: what was sent before its DeleteTopic reached it)
            return
        name, dispatch = lost
        for request in msg.requests:
            create = dispatch if REROUTED[type(request)] else None
            self.handle_request(TopicRequest(name, create, request), placed=False)
