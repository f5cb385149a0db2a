"""The cluster's pure logic (actors/cluster.py): membership by heartbeats, loss, fencing, placement."""
import collections

from actorbroker.actors.cluster import Heartbeat, Membership, rendezvous_owner


def beat(node, incarnation="i1", topics=(), members=(), lost=(), seen=(), leader=False):
    return Heartbeat(node, incarnation, f"root-{node}", f"{node}:6650", leader, tuple(topics),
                     (("connections", 0),), tuple(members), tuple(lost), tuple(seen))


def test_rendezvous_spreads_topics_and_moves_only_those_of_a_lost_member():
    names = [f"/t/{i}" for i in range(3000)]
    three = {n: rendezvous_owner(n, ["a", "b", "c"]) for n in names}
    counts = collections.Counter(three.values())
    assert all(800 < counts[m] < 1200 for m in "abc"), counts
    two = {n: rendezvous_owner(n, ["a", "c"]) for n in names}
    assert all(two[n] == three[n] for n in names if three[n] != "b")   # only b's topics move
    assert rendezvous_owner("/t/x", []) is None


def test_a_member_is_lost_after_the_timeout_and_returns_only_as_a_new_incarnation():
    m = Membership("a", timeout_s=3)
    assert m.heard(beat("b"), now=0)[0] == "returned"
    assert m.heard(beat("b"), now=1)[0] == "live"
    for now in (0, 1, 2.5, 4.5):
        m.heard(beat("c"), now=now)                   # c stays live: a keeps a majority
    assert m.expire(now=2.9) == []                    # silent for 2/3 of the timeout: lost
    assert [x.node for x in m.expire(now=3.1)] == ["b"]
    assert m.expire(now=5) == []                      # declared once
    assert m.lost_pairs() == (("b", "i1"),)
    assert m.heard(beat("b"), now=6)[0] == "fenced"  # stopped, not restarted: stays lost
    assert m.live_names() == ["a", "c"]
    assert m.heard(beat("b", "i2"), now=7)[0] == "returned"
    assert m.live_names() == ["a", "b", "c"]


def test_a_member_back_as_a_new_incarnation_is_still_told_its_former_one_was_lost():
    """B, stopped, was declared lost by C; B fenced on A's word and came back as i2 before any of
    C's heartbeats reached it: C then listed B as live only, so B never learned that C had dropped
    what B's connections had on C's topics (a consumer of C's reliable topic stayed registered on
    B alone, 1 run in about 15 of a cluster test). C keeps telling the former loss for a while."""
    from actorbroker.actors.cluster import FORMER_LOSS_S
    m = Membership("c", timeout_s=3)
    for now in (0, 1, 2, 3, 4):
        m.heard(beat("a"), now=now)
    m.heard(beat("b"), now=0)
    assert [x.node for x in m.expire(now=3.1)] == ["b"]
    assert m.heard(beat("b", "i2"), now=4)[0] == "returned"
    assert m.lost_pairs(now=4) == (("b", "i1"),)          # b (as i2) is live, and learns of i1
    assert m.live_names() == ["c", "a", "b"]
    assert m.lost_pairs(now=4 + FORMER_LOSS_S + 1) == ()  # for a while only
    # a member lost only weakly (no majority in view) is not told so, before or after
    weak = Membership("x", timeout_s=3)
    weak.heard(beat("y"), now=0)
    weak.expire(now=3.1)
    weak.heard(beat("y", "i2"), now=4)
    assert weak.lost_pairs(now=4) == ()


def test_a_node_cut_off_from_the_others_declares_no_one_lost_to_them_and_fences_itself():
    """B's links go down: it stops hearing A and C (C a moment after A, while it still sees C),
    and declares both lost; A and C, a majority, declare B lost. When the links are back, A and
    C are not told they were lost (they must not fence), and B must fence before it accepts
    them again; A keeps B lost until B comes back as a new incarnation."""
    b = Membership("b", timeout_s=3)
    a = Membership("a", timeout_s=3)
    for now in (0, 0.5):
        b.heard(beat("a"), now=now)
        a.heard(beat("b"), now=now)
        a.heard(beat("c"), now=now)
    b.heard(beat("c"), now=0.9)                        # c's last heartbeat came a little later
    assert [x.node for x in b.expire(now=2.6)] == ["a"]   # b still sees c: a majority, for now
    assert [x.node for x in b.expire(now=3.0)] == ["c"]   # now b sees no majority
    assert b.lost_pairs() == ()                        # so it tells no one they were lost
    assert not b.quorum()
    a.heard(beat("c"), now=2.5)
    assert [x.node for x in a.expire(now=2.6)] == ["b"] and a.quorum()
    assert a.lost_pairs() == (("b", "i1"),)            # a majority declared b lost: b fences
    # the links are back: b hears a (same incarnation) and must fence itself first
    assert b.heard(beat("a", lost=a.lost_pairs()), now=7)[0] == "minority"
    assert not a.firmly_lost("c", "i1") and a.firmly_lost("b", "i1")
    b.forgive(now=7)                                   # ClusterRoot._fence did
    assert not b.settled(now=7)                        # it creates no topic until it heard everyone
    assert b.heard(beat("a", lost=a.lost_pairs()), now=7)[0] == "returned"
    assert not b.settled(now=7.1)                      # c not heard since
    assert b.heard(beat("c"), now=7.2)[0] == "returned" and b.live_names() == ["b", "a", "c"]
    assert b.settled(now=7.2)
    assert a.heard(beat("b"), now=7)[0] == "fenced"   # b's old incarnation stays lost on a
    assert a.heard(beat("b", "i2"), now=8)[0] == "returned"


def test_a_fenced_node_is_settled_after_the_member_timeout_even_if_a_member_stays_silent():
    m = Membership("b", timeout_s=2)
    m.heard(beat("a"), now=0)
    m.heard(beat("c"), now=0)
    m.forgive(now=1)
    m.heard(beat("a"), now=1.5)
    assert not m.settled(now=2.9)                      # c silent since the fence
    assert m.settled(now=3.1)                          # the member timeout: c is lost or not, we go on
    assert m.settled(now=3.2)


def test_a_loss_declared_with_a_majority_stays_told_when_the_majority_goes_later():
    m = Membership("a", timeout_s=3)
    m.heard(beat("b"), now=0)
    m.heard(beat("c"), now=0)
    for now in (1, 2, 3, 4, 5, 6, 7):
        m.heard(beat("c"), now=now)
    m.expire(now=2.5)                                  # b lost, c live: a majority
    assert m.lost_pairs() == (("b", "i1"),)
    m.expire(now=10)                                   # c lost long after: b's loss stays firm
    assert not m.quorum() and m.lost_pairs() == (("b", "i1"),)
    assert m.heard(beat("b"), now=11)[0] == "fenced"
    assert m.heard(beat("c"), now=11)[0] == "minority"


def test_members_spread_through_heartbeats():
    m = Membership("c", timeout_s=3)
    state, peers = m.heard(beat("a", members=[("b", "root-b")], leader=True), now=0)
    assert [p.node for p in peers] == ["b"] and m.leader_live()


def test_placement_keeps_existing_topics_and_refuses_what_it_cannot_reach():
    m = Membership("a", timeout_s=3)
    m.heard(beat("b", topics=[("/x/r", "reliable"), ("/x/n", "non_reliable")]), now=0)
    m.heard(beat("c", seen=[("/x/r", "b"), ("/x/n", "b")]), now=0)
    assert m.place("/x/r", {}) == ("b", "reliable")
    assert m.place("/mine/t", {"/mine/t": "non_reliable"}) == ("a", "non_reliable")
    node, dispatch = m.place("/new/t", {})
    assert node == rendezvous_owner("/new/t", ["a", "b", "c"]) and dispatch is None
    m.heard(beat("c", seen=[("/x/r", "b"), ("/x/n", "b")]), now=2)
    m.expire(now=2.5)                                  # b lost here, c still sees it live
    assert m.place("/x/n", {}) == (None, "b")
    m.heard(beat("c"), now=3)                          # c lost it too
    assert m.place("/x/r", {}) == (None, "b")          # reliable: its log is on b
    assert m.place("/x/n", {})[0] == rendezvous_owner("/x/n", ["a", "c"])   # re-homed


def test_a_node_that_did_not_run_declares_no_one_lost_for_it():
    m = Membership("a", timeout_s=3)
    m.heard(beat("b"), now=0)
    m.stalled(now=10)
    assert m.expire(now=12) == [] and m.live_names() == ["a", "b"]


def test_an_owner_live_here_speaks_for_itself_over_what_others_saw():
    m = Membership("a", timeout_s=3)
    m.heard(beat("b", "i2"), now=0)                          # b fenced: no topic any more
    m.heard(beat("c", seen=[("/x/n", "b")]), now=0)           # c's view is a heartbeat older
    assert m.place("/x/n", {})[0] == rendezvous_owner("/x/n", ["a", "b", "c"])
