"""The cluster side of the root actor: joining, heartbeats, loss detection, fencing, and routing
each topic request to the node that owns the topic (docs/cluster.md).

A mixin of BrokerRootActor, active only when the node was started with cluster options
(`config.node`). The root keeps the topics it owns itself; a request for a topic another node owns
goes to that node's root as `Placed`, which handles it there, so that producers, consumers and
admin ops on any node reach a topic on any node: the topic's answers and lanes go straight to the
asking ConnectionActor and shard, wherever they are.
"""
import random
import time
import uuid
from datetime import timedelta

from thespian.actors import ActorExitRequest

from actorbroker.actors import cluster, connection, topic
from actorbroker.actors.base import log
from actorbroker.storage import fencing
from actorbroker.storage.topic_store import topic_dir
from actorbroker.transport import errors as E

JOIN_RETRY = timedelta(seconds=2)
LOAD_EVERY_S = 2.0   # how often a node measures its topics' message rate
LOAD_TOKEN = -1      # the NodeTopics of that measure (gather tokens are positive)
STATUS_MEASURE_WAIT = timedelta(seconds=1)   # a single broker's `cluster` answers after this at most
ID_SALT_BITS = 24   # ids of a node: counter << 24 | a random salt: unique across the nodes


class ClusterRoot:
    def cluster_start(self):
        config = self.config
        self.membership = cluster.Membership(config.node, config.member_timeout_ms / 1000)
        self.incarnation = uuid.uuid4().hex[:12]
        self.fenced_as = set()    # our incarnations before a fence (others may yet name them lost)
        self.told_lost = set()    # (member, incarnation of ours) it declared lost: told our connections
        self.next_id = 1 << ID_SALT_BITS | random.getrandbits(ID_SALT_BITS)
        self.last_lost_beat = 0.0
        self.last_tick = time.monotonic()
        self.msgs_in = (0, time.monotonic())   # messages our topics received so far, and when
        self.msgs_per_s = 0.0
        self.last_load = 0.0
        self.joining = None       # the JoinAgent in flight
        self.beating = set()      # str(root) of members a heartbeat is on its way to (see _beat)
        log.info("cluster node %s (%s), member timeout %d ms", config.node,
                 "leader" if config.cluster_leader else "member", config.member_timeout_ms)
        self.wakeupAfter(timedelta(seconds=0), payload="heartbeat")

    @property
    def clustered(self):
        """A cluster node that has joined (from the moment its client port listens)."""
        return self.membership is not None

    def own_topics(self):
        return {name: dispatch for name, (_, dispatch) in self.topics.items()}

    def next_ident(self):
        ident = self.next_id
        self.next_id += 1 << ID_SALT_BITS if self.clustered else 1
        return ident

    # --- joining: find the leader's root through a JoinAgent on the leader's system -------------------
    def _join(self):
        if self.config.cluster_leader or self.membership.leader_live() or self.stopping:
            return
        self.joining = self.createActor("actorbroker.actors.join_agent.JoinAgent",
                                        targetActorRequirements={cluster.LEADER_CAPABILITY: True})
        self.send(self.joining, cluster.FindLeaderRoot(self.myAddress))

    def on_Introduce(self, msg, sender):
        if msg.root != self.myAddress:
            self._beat(msg.root)
        self.send(sender, cluster.Introduced())

    # --- heartbeats and loss detection ------------------------------------------------------------
    def cluster_tick(self):
        every = self.config.member_timeout_ms / 1000 / cluster.HEARTBEATS_PER_TIMEOUT
        self.wakeupAfter(timedelta(seconds=every), payload="heartbeat")   # first: whatever fails below
        now = time.monotonic()
        stall = now - self.last_tick
        self.last_tick = now
        if stall > self.membership.silence_s / 2:
            log.warning("node %s did not run for %.1f s: no member is declared lost on that account",
                        self.config.node, stall)
            self.membership.stalled(now)
        for member in self.membership.expire(now):
            self._member_lost(member)
        beat = self._heartbeat()
        to_lost = now - self.last_lost_beat >= cluster.LOST_HEARTBEAT_EVERY_S
        if to_lost:
            self.last_lost_beat = now
        for member in self.membership.members.values():
            if not member.lost or to_lost:
                self._beat(member.root, beat)
        self.send(self.listener, cluster.NodeLoadRequest())
        if now - self.last_load >= LOAD_EVERY_S:   # our topics' message rate, for `cluster`
            self.last_load = now
            self.gather_local(LOAD_TOKEN, self.myAddress)
        if not self.membership.leader_live() and not self.config.cluster_leader:
            if now - getattr(self, "last_join", 0.0) >= JOIN_RETRY.total_seconds():
                self.last_join = now
                self._join()

    def _beat(self, root, beat=None):
        """A heartbeat to a member's root, unless the last one to it is still on its way. Thespian
        has at most 20 transmits in progress per process, the rest queued behind them: heartbeats
        to a member cut off (no reply, not even a reset) stayed in progress for minutes, and
        within seconds nothing else left this root, not even its answers to serve (which then
        gave the node up). One at a time per member, and each given up after the member timeout."""
        key = str(root)
        if key in self.beating:
            return
        self.beating.add(key)
        self._send_tracked(root, beat or self._heartbeat(), lambda: self.beating.discard(key),
                           max_period=timedelta(milliseconds=self.config.member_timeout_ms))

    def _heartbeat(self):
        return cluster.Heartbeat(
            self.config.node, self.incarnation, self.myAddress,
            f"{self.listen_host}:{self.listen_port}" if self.listen_port else "",
            self.config.cluster_leader, tuple(self.own_topics().items()),
            (("connections", self.connections_open), ("topics", len(self.topics)),
             ("msgs_per_s", round(self.msgs_per_s, 1))),
            tuple((m.node, m.root) for m in self.membership.live()),
            self.membership.lost_pairs(time.monotonic()), self.membership.seen_topics())

    def on_ConnectionCount(self, msg, sender):
        self.connections_open = msg.count
        self._status_part_measured("connections")

    def on_Heartbeat(self, msg, sender):
        if not self.clustered:
            return
        declared = {incarnation for node, incarnation in msg.lost if node == self.config.node}
        if self.incarnation in declared:
            self._fence(msg.node)   # declared lost by a member that had a majority in view
        for incarnation in declared & self.fenced_as:
            # It dropped what our connections had on its topics when it declared us lost (a stop
            # or a cut ends no lane, so nothing told them): they end theirs too, non_reliable
            # ones re-attached there, reliable ones `closed` `node_lost`. (Else each side thought
            # the other still had them: a consumer that got nothing more, an exclusive held.)
            if (msg.node, incarnation) not in self.told_lost:
                self.told_lost.add((msg.node, incarnation))
                self.send(self.listener, cluster.NodeLost(msg.node))
        state, peers = self.membership.heard(msg, time.monotonic())
        if state == "minority":
            # we declared it lost while we saw no majority: we were the one cut off, and may
            # have re-created its topics meanwhile. Fence, then accept it as it is.
            self._fence(msg.node, minority=True)
            state, peers = self.membership.heard(msg, time.monotonic())
        if state == "fenced":   # our heartbeat lists it as lost: it fences, and comes back anew
            self._beat(msg.root)
        elif state == "returned":
            log.warning("member %s is live (%s)", msg.node, msg.client_address)
            self._beat(msg.root)   # answer at once: it learns of us sooner
        for peer in peers:
            self._beat(peer.root)

    def _member_lost(self, member):
        log.error("member %s lost: no heartbeat for %d ms; its non_reliable topics go to the "
                  "survivors, its reliable ones are unavailable until it returns",
                  member.node, self.config.member_timeout_ms)
        self.send(self.listener, cluster.NodeLost(member.node))
        # and our topics drop what its connections had here: a cut ends no lane, and nothing
        # else would (an exclusive subscription held, a failover standby never promoted)
        for name, (address, _) in self.topics.items():
            self.send_ordered(address, cluster.NodeLost(member.node), name)

    def _fence(self, by, minority=False):
        """A member declared this node lost (we were stopped, or cut off), or we declared it
        lost while we saw no majority (we were cut off: `minority`): our non_reliable topics
        may have been re-created elsewhere meanwhile. End ours, so that no topic ever has two
        owners, and come back as a new incarnation. (A member that kept a majority in view is
        never fenced by what a minority node declared: those losses are not in its heartbeats,
        Membership.lost_pairs.)"""
        dropped = [name for name, (_, dispatch) in self.topics.items() if dispatch != "reliable"]
        # in a shared folder a survivor may have taken our reliable topics over: end ours, and
        # keep their logs (the next request reopens each where its latest epoch says)
        shared = [name for name, (_, dispatch) in self.topics.items()
                  if dispatch == "reliable" and self.config.shared_data]
        why = f"lost sight of a majority (and of {by})" if minority else f"was declared lost by {by}"
        log.error("node %s %s: fencing: ending its %d non_reliable topics%s, "
                  "rejoining", self.config.node, why, len(dropped),
                  f" and its {len(shared)} reliable ones (shared folder)" if shared else "")
        for name in dropped:
            address, _ = self.topics.pop(name)
            self.send_ordered(address, topic.DeleteTopic(None, None, topic.TOPIC_MOVED), name)
        for name in shared:
            address, _ = self.topics.pop(name)
            self.send(address, ActorExitRequest())
        self.fenced_as.add(self.incarnation)
        self.incarnation = uuid.uuid4().hex[:12]
        self.membership.forgive(time.monotonic())

    # --- routing ----------------------------------------------------------------------------------
    def route(self, name, forward, request, placed):
        """True when `forward` was sent to another node or `request` refused; False: handle it
        here."""
        if not self.clustered:
            return False
        node, held = self._shared_holder(
            name, *self.membership.place(name, self.own_topics(), bool(self.config.shared_data)))
        if (node == self.config.node and name not in self.topics) or (placed and node is not None and held is None):
            reply_to = getattr(request, "reply_to", None)
            if reply_to is not None and not self.membership.settled(time.monotonic()):
                # new here, and we fenced ourselves a moment ago: another member may own it
                self.send(reply_to, connection.RequestFailed(getattr(request, "rid", None), E.TOPIC_UNAVAILABLE, (
                    f"node {self.config.node} rejoined the cluster a moment ago and is still learning "
                    f"where topics are: {name} is not opened here yet; send it again")))
                return True
        if node == self.config.node or (placed and node is not None and held is None):
            return False   # ours, or new and placed here by the asking node
        if placed and node is not None:
            # another node owns it in our view: never open it a second time here
            node, held = None, node
        rid, reply_to = getattr(request, "rid", None), getattr(request, "reply_to", None)
        if node is None:
            if reply_to is not None:
                self.send(reply_to, connection.RequestFailed(rid, E.TOPIC_UNAVAILABLE, (
                    f"topic {name} is on node {held}, which this node cannot reach (lost, or cut "
                    f"off from here); it is available again when {held} is back")))
            return True
        member = self.membership.members[node]
        if held is None:   # a new topic: its owner's heartbeat will list it a moment later
            self.membership.placed_on(node, name, getattr(forward, "create_dispatch", None))
        self.send_ordered(member.root, cluster.Placed(forward), ("node", node, member.incarnation))
        if reply_to is not None and rid is not None:   # answered there; here if that node is lost first
            self.send(reply_to, connection.RequestForwarded(rid, node))
        return True

    def _shared_holder(self, name, node, held):
        """With --shared-data, a reliable topic that no live member lists (an owner's heartbeat)
        goes to the node holding its log's latest epoch when that node is live: the folder is
        the one truth every node reads alike. Placement by rendezvous, or a guess of where a
        request created it, could send it to a node that is refused the log while the holder
        (which did not open it: it fenced itself, or ended it) is never asked, and every node
        answered TOPIC_UNAVAILABLE for good. A holder that is lost here is taken over as
        before (rendezvous, storage/fencing.py)."""
        if not self.config.shared_data or node is None:
            return node, held
        if node == self.config.node:
            if name in self.topics:
                return node, held
        else:
            member = self.membership.members.get(node)
            if member is not None and name in member.topics:
                return node, held
        try:
            holder = fencing.latest_owner(topic_dir(self.config.shared_data, name))
        except OSError:
            return node, held
        if not holder or holder == node:
            return node, held
        if holder == self.config.node:
            return holder, None   # ours to open again: our claim is allowed
        member = self.membership.members.get(holder)
        if member is None or member.lost:
            return node, held     # a takeover: the next claim decides
        return holder, "reliable"

    def on_Placed(self, msg, sender):
        self.handle_request(msg.request, placed=True)

    def lookup(self, msg, placed):
        """Answer a Lookup; one for a topic of another live node is answered there: it knows
        its own topics now, we only as of its last heartbeat."""
        node, held = self._shared_holder(msg.topic, *self.membership.place(
            msg.topic, self.own_topics(), bool(self.config.shared_data))) \
            if self.clustered \
            else (self.config.node or "", self.own_topics().get(msg.topic))
        if node not in (None, self.config.node) and not placed:
            member = self.membership.members[node]
            self.send_ordered(member.root, cluster.Placed(msg), ("node", node, member.incarnation))
            self.send(msg.reply_to, connection.RequestForwarded(msg.rid, node))
            return
        if placed:   # the asking node placed it here: it is ours, or new here
            node, held = self.config.node, self.own_topics().get(msg.topic)
        frame = {"op": "lookup", "rid": msg.rid, "topic": msg.topic}
        if node is None:
            frame.update(node=held, exists=True, available=False)
        else:
            member = self.membership.members.get(node) if self.clustered else None
            dispatch = self.own_topics().get(msg.topic) if member is None else member.topics.get(msg.topic)
            frame.update(node=node, exists=dispatch is not None, available=True,
                         address=member.client_address if member else
                         f"{self.listen_host}:{self.listen_port}")
            if dispatch:
                frame["dispatch"] = dispatch
        self.send(msg.reply_to, connection.RequestDone(msg.rid, frame))

    def on_ClusterStatus(self, msg, sender):
        if not self.clustered and self.listener is not None:
            # One broker has no heartbeat to carry its load: measure it now (connections from
            # the listener, the message rate since the last measure), then answer.
            self.status_waiting.append(msg)
            self.send(self.listener, cluster.NodeLoadRequest())   # (again for each: a recount is cheap)
            if len(self.status_waiting) == 1:
                self.status_measured = set()
                self.gather_local(LOAD_TOKEN, self.myAddress)
                self.wakeupAfter(STATUS_MEASURE_WAIT, payload="status-measured")
            return
        self._answer_status(msg)

    def _status_part_measured(self, part=None, force=False):
        if not self.status_waiting:
            return
        self.status_measured.add(part)
        if {"connections", "rate"} <= self.status_measured or force:
            waiting, self.status_waiting = self.status_waiting, []
            for msg in waiting:
                self._answer_status(msg)

    def _answer_status(self, msg):
        now = time.monotonic()
        rows = [{"node": self.config.node or "", "role": self._role(self.config.cluster_leader),
                 "state": "live", "address": f"{self.listen_host}:{self.listen_port}",
                 "heartbeat_age_ms": 0, "connections": self.connections_open, "topics": len(self.topics),
                 "msgs_per_s": round(self.msgs_per_s, 1), "self": True}]
        for m in (self.membership.members.values() if self.clustered else ()):
            rows.append({"node": m.node, "role": self._role(m.leader), "state": "lost" if m.lost else "live",
                         "address": m.client_address, "heartbeat_age_ms": int((now - m.last_seen) * 1000),
                         "connections": m.load.get("connections", 0), "topics": len(m.topics),
                         "msgs_per_s": m.load.get("msgs_per_s", 0.0), "self": False})
        rows.sort(key=lambda r: r["node"])
        self.send(msg.reply_to, connection.RequestDone(msg.rid, {"op": "cluster", "rid": msg.rid,
                                                                  "members": rows}))

    @staticmethod
    def _role(leader):
        return "leader" if leader else "member"

    # --- `topics` across the nodes ------------------------------------------------------------------
    def gather_cluster_topics(self, rid, reply_to):
        """Ask every live member for its topics' summaries; ours are gathered as on one node."""
        token = self.next_token
        self.next_token += 1
        live = self.membership.live() if self.clustered else []
        self.node_gathers[token] = [rid, reply_to, len(live) + 1, []]
        for member in live:
            self.send(member.root, cluster.NodeTopicsRequest(token))
        self.gather_local(token, self.myAddress)
        if live:   # a member lost meanwhile must not hold the answer forever
            self.wakeupAfter(timedelta(seconds=6), payload=("cluster-gather", token))

    def on_NodeTopicsRequest(self, msg, sender):
        self.gather_local(msg.token, sender)

    def on_NodeTopics(self, msg, sender):
        if msg.token == LOAD_TOKEN:
            self._measured(sum(s.get("msgs_in", 0) for s in msg.summaries))
            self._status_part_measured("rate")
            return
        gather = self.node_gathers.get(msg.token)
        if gather is None:
            return
        gather[3].extend(msg.summaries)
        gather[2] -= 1
        if gather[2] <= 0:
            self.answer_cluster_topics(msg.token)

    def _measured(self, total):
        before, then = self.msgs_in   # (a single broker: since the last measure, or its start)
        now = time.monotonic()
        self.msgs_in = (total, now)
        if now > then:   # a deleted topic takes its count with it: never below 0
            self.msgs_per_s = max(0.0, (total - before) / (now - then))

    def answer_cluster_topics(self, token):
        gather = self.node_gathers.pop(token, None)
        if gather is not None:
            rid, reply_to, _, summaries = gather
            summaries.sort(key=lambda s: s["name"])
            if not self.config.node:   # a single broker lists no load (docs/protocol.md, `topics`)
                summaries = [{k: v for k, v in s.items() if k != "msgs_in"} for s in summaries]
            self.send(reply_to, connection.RequestDone(rid, {"op": "topics", "rid": rid, "topics": summaries}))
