"""The ordered channels of actors/base.py, as pure logic (no actor system): batching, order
restored, a gap that never fills is skipped instead of holding the channel forever, and a
channel's state is kept exactly as long as its sender may still send on it."""
from thespian.actors import ActorExitRequest, ChildActorExited, PoisonMessage, WakeupMessage

from actorbroker.actors import base


class Probe(base.BrokerActor):
    def __init__(self):
        super().__init__()
        self.got = []
        self.sent = []
        self.wakeups = []

    def on_str(self, msg, sender):
        self.got.append(msg)

    # what Thespian would do, recorded instead
    def send(self, address, msg):
        self.sent.append((address, msg))

    def wakeupAfter(self, delay, payload=None):
        self.wakeups.append(payload)


def ordered(seq, msg, channel=("peer", "s")):
    return base.Ordered(channel, seq, msg)


def test_out_of_order_messages_are_handled_in_order():
    a = Probe()
    a.receiveMessage(ordered(1, "b"), None)
    a.receiveMessage(ordered(2, "c"), None)
    assert a.got == []
    a.receiveMessage(ordered(0, "a"), None)
    assert a.got == ["a", "b", "c"]


def test_a_batch_is_handled_as_its_messages_in_order():
    a = Probe()
    a.receiveMessage(ordered(0, base.Batch(("a", "b", "c"))), None)
    assert a.got == ["a", "b", "c"]


def test_what_one_message_sends_on_a_channel_goes_as_one_batch():
    a = Probe()

    def fan(msg, sender):
        for i in range(3):
            a.send_ordered("target", f"m{i}", "out")
    a.on_int = fan
    a.receiveMessage(7, None)
    assert len(a.sent) == 1
    address, sent = a.sent[0]
    assert address == "target" and sent.msg == base.Batch(("m0", "m1", "m2")) and sent.seq == 0


class GatedProbe(Probe):
    """Sends are tracked: `arrive()` is what Thespian's transmit callback would do. Each string
    it receives it sends to "target" on the channel `channel(msg)`."""
    def __init__(self, channel=lambda msg: "out"):
        super().__init__()
        self.in_transit = []
        self.channel = channel

    def on_str(self, msg, sender):
        self.send_ordered("target", msg, self.channel(msg))

    def _send_tracked(self, address, msg, done):
        self.sent.append((address, msg))
        self.in_transit.append(done)

    def arrive(self):
        self.in_transit.pop(0)()


def test_a_channel_has_one_message_in_flight_and_what_waits_goes_as_the_next_batch():
    a = GatedProbe()
    a.receiveMessage("m0", None)
    assert [m.msg for _, m in a.sent] == ["m0"]        # a lone message goes at once
    a.receiveMessage("m1", None)
    a.receiveMessage("m2", None)
    assert len(a.sent) == 1                             # m0 has not arrived yet: these wait
    a.arrive()
    assert [(m.seq, m.msg) for _, m in a.sent[1:]] == [(1, base.Batch(("m1", "m2")))]
    a.arrive()
    a.receiveMessage("m3", None)                        # nothing in flight: goes at once
    assert [(m.seq, m.msg) for _, m in a.sent[2:]] == [(2, "m3")]


def test_a_message_in_flight_that_is_never_heard_of_holds_its_channel_for_a_bounded_time(monkeypatch):
    a = GatedProbe()
    a.receiveMessage("m0", None)
    a.receiveMessage("m1", None)
    assert len(a.sent) == 1 and a.wakeups          # m1 waits, with a wakeup to look again
    monkeypatch.setattr(base.time, "monotonic", lambda real=base.time.monotonic: real() + base.IN_FLIGHT_WAIT_S)
    a.receiveMessage(WakeupMessage(None, a.wakeups[-1]), None)
    assert [(m.seq, m.msg) for _, m in a.sent] == [(0, "m0"), (1, "m1")]
    a.arrive()                                      # word of m0 at last: m1 is still the one in flight
    a.receiveMessage("m2", None)
    assert len(a.sent) == 2
    a.arrive()
    assert [(m.seq, m.msg) for _, m in a.sent[2:]] == [(2, "m2")]


def test_other_channels_do_not_wait_for_a_message_in_flight():
    a = GatedProbe(channel=lambda msg: msg[0])
    a.receiveMessage("a0", None)
    a.receiveMessage("b0", None)
    a.receiveMessage("a1", None)
    assert [m.msg for _, m in a.sent] == ["a0", "b0"]


def test_an_exiting_actor_sends_what_waits_behind_a_message_in_flight():
    from thespian.actors import ActorExitRequest
    a = GatedProbe()
    a.receiveMessage("m0", None)
    a.receiveMessage("m1", None)
    a.receiveMessage(ActorExitRequest(), None)
    # ... and ends the channel with them (its receiver forgets it: see below)
    assert [m.msg for _, m in a.sent] == ["m0", base.Batch(("m1", base.ChannelEnd()))]


def test_a_gap_that_never_fills_is_skipped_and_the_straggler_dropped(monkeypatch):
    a = Probe()
    a.receiveMessage(ordered(1, "b"), None)
    a.receiveMessage(ordered(2, "c"), None)
    assert a.got == [] and base._GAP in a.wakeups
    a.receiveMessage(WakeupMessage(1, base._GAP), None)       # too early: still waiting
    assert a.got == []
    clock = base.time.monotonic() + base.GAP_TIMEOUT_S + 1
    monkeypatch.setattr(base.time, "monotonic", lambda: clock)
    a.receiveMessage(WakeupMessage(1, base._GAP), None)
    assert a.got == ["b", "c"] and a.gaps_skipped == 1
    a.receiveMessage(ordered(0, "a"), None)                   # came after all: too late
    a.receiveMessage(ordered(3, "d"), None)
    assert a.got == ["b", "c", "d"]


def test_a_poison_message_is_counted_and_the_actor_goes_on():
    a = Probe()
    a.receiveMessage(PoisonMessage("x", "Traceback: boom"), None)
    a.receiveMessage(ordered(0, "a"), None)
    assert a.poison_messages == 1 and a.got == ["a"]


# --- the state of a channel lives as long as its sender (ChannelEnd) ------------------------------
def deliver(sender, receiver, frm="sender-address"):
    """What `sender` has sent so far, received by `receiver` (as from the address `frm`)."""
    for _, msg in sender.sent:
        receiver.receiveMessage(msg, frm)
    sender.sent.clear()


def test_a_receiver_forgets_a_channel_its_sender_forgot_after_handling_all_of_it():
    a, b = GatedProbe(), Probe()
    a.receiveMessage("m0", None)
    a.arrive()
    a.receiveMessage("m1", None)        # in flight...
    a.receiveMessage("m2", None)        # ... this one waits in the outbox
    a.forget_ordered("out")             # what waits goes now, and the channel's end with it
    assert a._out_seq == {}
    sent = a.sent[:]
    deliver(a, b)
    assert b.got == ["m0", "m1", "m2"]
    assert b._in_seq == {} and b._gaps == {}
    # the end overtaking what came before it on the channel waits for it, as any message
    c = Probe()
    for _, msg in reversed(sent):
        c.receiveMessage(msg, "sender-address")
        assert c._in_seq or c.got == ["m0", "m1", "m2"]
    assert c.got == ["m0", "m1", "m2"] and c._in_seq == {} and c._gaps == {}


def test_an_exiting_actor_ends_its_channels_and_their_receivers_forget_them():
    a, b = GatedProbe(channel=lambda msg: msg[0]), Probe()
    a.receiveMessage("x0", None)
    a.receiveMessage("y0", None)
    a.arrive()
    a.arrive()
    a.receiveMessage(ActorExitRequest(), None)   # nothing waits: each channel gets its end alone
    deliver(a, b)
    assert b.got == ["x0", "y0"] and b._in_seq == {}


def test_an_end_the_receiver_holds_nothing_of_is_ignored():
    # a new actor at the address of one that was forgotten gets the old channel's end
    b = Probe()
    b.receiveMessage(ordered(7, base.ChannelEnd()), "somewhere")
    assert b._in_seq == {} and b._gaps == {} and base._GAP not in b.wakeups


def test_a_live_idle_channel_is_never_forgotten(monkeypatch):
    b = Probe()
    b.receiveMessage(ordered(0, "a"), "live")
    b.receiveMessage(ChildActorExited("another-child"), None)     # someone else died
    clock = base.time.monotonic() + 10 * base.GAP_TIMEOUT_S      # idle for a long time
    monkeypatch.setattr(base.time, "monotonic", lambda: clock)
    for payload in list(b.wakeups):
        b.receiveMessage(WakeupMessage(1, payload), None)
    b.receiveMessage(ordered(1, "b"), "live")                     # its next message goes at once
    assert b.got == ["a", "b"] and b.gaps_skipped == 0 and base._GAP not in b.wakeups


def test_the_channels_of_a_sender_known_dead_are_forgotten_and_a_new_one_at_its_address_is_not():
    b = Probe()
    b.receiveMessage(ordered(0, "a", channel=("dead-uid", "s")), "child")
    b.receiveMessage(ordered(2, "c", channel=("dead-uid", "s")), "child")   # 1 died with it
    b.receiveMessage(ChildActorExited("child"), None)                      # killed: no ChannelEnd
    drop = [p for p in b.wakeups if isinstance(p, tuple) and p[0] == base._DROP_CHANNELS]
    assert len(drop) == 1
    # a new actor at the same address before the drop is due: its channel is its own
    b.receiveMessage(ordered(0, "new", channel=("new-uid", "s")), "child")
    b.receiveMessage(WakeupMessage(base.GAP_TIMEOUT_S, drop[0]), None)
    assert list(b._in_seq) == [("new-uid", "s")] and ("dead-uid", "s") not in b._gaps
    b.receiveMessage(ordered(1, "more", channel=("new-uid", "s")), "child")
    assert b.got == ["a", "new", "more"]
