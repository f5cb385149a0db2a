"""One broker over many hosts: membership by heartbeats, topic placement, and the messages the
root actors of the nodes exchange (docs/cluster.md).

Thespian's convention joins the nodes' actor systems and lets a node create an actor on another
by capabilities (the JoinAgent, which finds the leader's root); it notices a crashed member only
after about 22 minutes, so the roots heartbeat each other and declare a member lost on their own
(`--member-timeout-ms`). Everything here but the messages is plain logic with no I/O: the root
actor feeds it what arrives and the time.

Placement: a topic that exists stays where it is (every heartbeat lists the topics of its sender);
a new one goes to the live member with the highest rendezvous hash of (member, topic). Rendezvous
hashing needs no coordination: two nodes with the same view of the live members place a topic on
the same member, and a member coming or going moves only the topics that hashed to it.
"""
import hashlib
from dataclasses import dataclass
from typing import Any

ROOT_GLOBAL_NAME = "actorbroker-root"   # the root actor of each node's system, found by the JoinAgent
NODE_CAPABILITY = "actorbroker.node"
LEADER_CAPABILITY = "actorbroker.leader"
HEARTBEATS_PER_TIMEOUT = 6               # heartbeats sent to a live member per member timeout
# A member silent for this share of the member timeout (four heartbeats missed) is declared lost
# at the next check (every heartbeat): so within the member timeout of its last heartbeat.
SILENCE_SHARE = 4 / HEARTBEATS_PER_TIMEOUT
# How long a member back as a new incarnation is still told that its former one was declared lost
# (Membership.former): long enough for heartbeats to reach it again after a stop or a cut.
FORMER_LOSS_S = 60.0
LOST_HEARTBEAT_EVERY_S = 2.0             # to a lost member: slower (a stopped peer queues them)


@dataclass(frozen=True)
class Heartbeat:
    """A root to the others, several times per member timeout."""
    node: str
    incarnation: str       # new each time the node's root starts, or after it fenced itself
    root: Any              # the sender's root actor
    client_address: str    # host:port clients connect to
    leader: bool
    topics: tuple          # ((name, dispatch), ...) the topics this node owns
    load: tuple            # (("connections", n), ("topics", n), ("msgs_in", n)): for `cluster`
    members: tuple         # ((node, root), ...) the live members the sender knows, to spread them
    lost: tuple            # ((node, incarnation), ...) the members the sender declared lost
    seen: tuple = ()       # ((topic, node), ...) topics of the members live in the sender's view


@dataclass(frozen=True)
class Introduce:
    """To the leader's root, from a JoinAgent: this root wants to join."""
    root: Any


@dataclass(frozen=True)
class Introduced:
    """The leader's root to the JoinAgent: done, you may end."""


@dataclass(frozen=True)
class FindLeaderRoot:
    """To a JoinAgent just created on the leader: introduce `root` to the leader's root."""
    root: Any


@dataclass(frozen=True)
class Placed:
    """A TopicRequest (or DeleteTopic) another node's root placed here: handle it, never forward."""
    request: Any


@dataclass(frozen=True)
class NodeTopicsRequest:
    """`topics` across the cluster: the summaries of the topics this node owns, please."""
    token: int


@dataclass(frozen=True)
class NodeTopics:
    token: int
    summaries: tuple


@dataclass(frozen=True)
class NodeLost:
    """A member was declared lost. To the ConnectionActors: end what is attached to its topics.
    To this node's topics, and by them to their dispatchers: drop the producers and consumers
    whose connections are on it (a cut keeps their lanes open: no EOF would ever tell)."""
    node: str


def shard_ident(index, uuid_hex, node):
    """A shard's name on its lanes: unique, and naming its node (in a cluster), so that a topic
    or dispatcher on another node can tell which producers and consumers a lost member had."""
    return f"shard-{index}-{uuid_hex}" + (f"@{node}" if node else "")


def node_of_shard(ident):
    """The node in a shard_ident ("" on a single broker). (Nothing before the "@" has one.)"""
    return ident.partition("@")[2]


@dataclass(frozen=True)
class NodeLoadRequest:
    """Root -> listener, with every heartbeat: the open client connections, for `cluster`."""


@dataclass(frozen=True)
class ConnectionCount:
    count: int


def rendezvous_owner(topic, members):
    """The member with the highest hash of (member, topic); None if there is none."""
    def weight(member):
        return hashlib.sha256(f"{member}\0{topic}".encode()).digest()
    return max(members, key=weight, default=None)


class Member:
    __slots__ = ("node", "incarnation", "root", "client_address", "leader", "topics", "load",
                 "last_seen", "lost", "seen", "placed", "lost_at", "weak", "forgiven")

    def __init__(self, node, root, now):
        self.node = node
        self.incarnation = ""
        self.root = root
        self.client_address = ""
        self.leader = False
        self.topics = {}       # name -> dispatch
        # topics this node placed there that its heartbeats do not list yet: name -> dispatch
        # (so that a loss right after a creation still finds the reliable log's owner)
        self.placed = {}
        self.seen = {}         # topic -> node: topics of the members it sees live
        self.load = {}
        self.last_seen = now
        self.lost = False
        self.lost_at = 0.0
        # declared lost while this node saw no majority (or lost it soon after): it was maybe
        # this node that was cut off, not the member. Such a loss is not told to anyone (it
        # fences no one); when the member speaks again as the same incarnation, this node
        # fences itself first (Membership.heard: "minority").
        self.weak = False
        self.forgiven = False  # a weak loss this node has fenced itself for: accept it back


class Membership:
    """What one node knows of the others: who is live, what each owns, where to place a topic."""

    def __init__(self, node, timeout_s):
        self.node = node
        self.timeout_s = timeout_s
        self.silence_s = timeout_s * SILENCE_SHARE
        self.members = {}      # node name -> Member (never self)
        # (node, incarnation) -> when: firm losses of members since back as a new incarnation,
        # still told in lost_pairs for FORMER_LOSS_S
        self.former = {}
        self.fenced_at = None  # when this node last fenced itself (see settled)

    def heard(self, hb, now):
        """A heartbeat arrived. Returns (state, peers): state is "live", "returned" (a lost or
        unknown member is live again), "fenced" (a member we declared lost, with a majority in
        view, speaks as the same incarnation: it must fence itself first, see
        ClusterRoot._fence) or "minority" (one we declared lost without a majority in view
        speaks as the same incarnation: it was this node that was cut off, so this node must
        fence itself first, then hear it again); peers are members we did not know that it
        knows (to heartbeat them too)."""
        if hb.node == self.node:
            return "live", []
        member = self.members.get(hb.node)
        if member is not None and member.lost and hb.incarnation == member.incarnation \
                and not member.forgiven:
            # stopped or cut off, not restarted: lost it stays, until it fences (or we do)
            return ("minority" if member.weak else "fenced"), []
        returned = "returned" if member is None or member.lost else "live"
        if member is None:
            member = self.members[hb.node] = Member(hb.node, hb.root, now)
        elif member.incarnation and member.incarnation != hb.incarnation:
            member.placed = {}   # guesses about what a former incarnation would create
            if member.lost and not member.weak:
                # It fenced (or restarted) and is back: it must still learn that we declared its
                # former incarnation lost, whether or not a heartbeat of ours said so while it was
                # stopped (none may have reached it): its connections drop what they had on our
                # topics, which we dropped then (ClusterRoot.on_Heartbeat, told_lost).
                self.former[(member.node, member.incarnation)] = now
        member.incarnation, member.root = hb.incarnation, hb.root
        member.client_address, member.leader = hb.client_address, hb.leader
        member.topics = dict(hb.topics)
        for name in [n for n in member.placed if n in member.topics]:
            del member.placed[name]
        member.seen = dict(hb.seen)
        member.load = dict(hb.load)
        member.last_seen = now
        member.lost = member.weak = member.forgiven = False
        peers = []
        for node, root in hb.members:
            if node != self.node and node not in self.members:
                peer = self.members[node] = Member(node, root, now)
                peers.append(peer)
        return returned, peers

    def expire(self, now):
        """The members silent for too long: now lost (each returned once). A loss declared while
        this node sees no majority of the members it knows (itself included), or within the
        member timeout before it stopped seeing one, is weak: a node cut off from the others
        declares them lost one by one as their heartbeats stop, the first ones while it still
        sees the rest. Only a loss declared with a majority in view, and kept with it, is told
        to the others (`lost_pairs`): the majority side never fences because a minority node
        declared it lost; the minority node fences itself when it hears from them again."""
        lost = []
        for member in self.members.values():
            if not member.lost and now - member.last_seen > self.silence_s:
                member.lost = True
                member.lost_at = now
                lost.append(member)
        if not self.quorum():
            for member in self.members.values():
                if member.lost and not member.forgiven and now - member.lost_at <= self.timeout_s:
                    member.weak = True
        return lost

    def quorum(self):
        """This node sees a strict majority of the members it knows, itself included, live."""
        return 2 * (1 + len(self.live())) > 1 + len(self.members)

    def firmly_lost(self, node, incarnation):
        """`node`, as `incarnation`, was declared lost here with a majority in view."""
        member = self.members.get(node)
        return member is not None and member.lost and not member.weak \
            and member.incarnation == incarnation

    def forgive(self, now):
        """This node fenced itself: the members it declared lost without a majority in view are
        accepted again when they speak, as the same incarnation."""
        self.fenced_at = now
        for member in self.members.values():
            if member.lost and member.weak:
                member.forgiven = True

    def settled(self, now):
        """False for a while after this node fenced itself: until every member it knows has been
        heard since (each heartbeat lists that member's topics), or the member timeout has passed.
        Meanwhile its view of who owns what is stale: a topic it created then could be one that
        another member owns (two owners; seen when a fenced node's clients were moved at once)."""
        if self.fenced_at is None:
            return True
        if now - self.fenced_at > self.timeout_s or all(
                not m.lost and m.last_seen >= self.fenced_at for m in self.members.values()):
            self.fenced_at = None
            return True
        return False

    def stalled(self, now):
        """This node itself did not run for a while (stopped, swapped out): what it did not hear
        meanwhile says nothing of the others. Give every live member a new full timeout."""
        for member in self.live():
            member.last_seen = max(member.last_seen, now)

    def live(self):
        return [m for m in self.members.values() if not m.lost]

    def live_names(self):
        return [self.node] + [m.node for m in self.live()]

    def leader_live(self):
        return any(m.leader for m in self.live())

    def lost_pairs(self, now=None):
        """The members declared lost with a majority in view: they fence when they read it; and,
        for FORMER_LOSS_S, such losses of members since back as a new incarnation."""
        if now is not None:
            for pair in [p for p, at in self.former.items() if now - at > FORMER_LOSS_S]:
                del self.former[pair]
        return tuple((m.node, m.incarnation) for m in self.members.values() if m.lost and not m.weak) \
            + tuple(self.former)

    def place(self, topic, own_topics, takeover=False):
        """(node, dispatch) of an existing topic; (node, None) for a new one (its rendezvous
        owner among the live members); (None, node) when only a lost member holds it, reliable:
        unavailable until that member returns, or while another member still sees its owner
        live. With `takeover` (the reliable logs are in a shared folder), a lost member's
        reliable topic is placed anew like a new one: its new node takes the log over, fenced."""
        if topic in own_topics:
            return self.node, own_topics[topic]
        for member in self.live():
            if topic in member.topics:
                return member.node, member.topics[topic]
        for member in self.live():
            if topic in member.placed:   # created there, or its log is held there (TopicMoved)
                return member.node, member.placed[topic]
        for member in self.live():
            owner = member.seen.get(topic)
            if owner is not None and owner != self.node and self._lost_here(owner):
                # a member still sees its owner live, we do not: we cannot reach the owner, and
                # nobody may open the topic a second time (a partition, or a loss not yet seen
                # by all). (An owner live here speaks for itself: its own list is the truth.)
                return None, owner
        for member in self.members.values():
            if member.lost and "reliable" in (member.topics.get(topic), member.placed.get(topic)) \
                    and not takeover:
                return None, member.node   # its log is there: nobody else may open it
        return rendezvous_owner(topic, self.live_names()), None

    def placed_on(self, node, topic, dispatch):
        """We sent the request that creates `topic` on `node`: remember it until its heartbeat
        lists it."""
        member = self.members.get(node)
        if member is not None and dispatch and topic not in member.topics:
            member.placed.setdefault(topic, dispatch)

    def _lost_here(self, node):
        member = self.members.get(node)
        return member is None or member.lost

    def seen_topics(self):
        """((topic, node), ...) of every topic a live member owns: part of our heartbeat."""
        return tuple((name, m.node) for m in self.live() for name in m.topics)
