"""The EventsActor's ordering, as pure logic (its real class, Thespian's reference recorded):
a consumer_detached caused by its connection's end never comes before that connection_closed,
even when the shard's event arrives after the hold that orders events by their stamps."""
import time

from thespian.actors import ActorAddress, WakeupMessage

from actorbroker.actors import events, shard
from actorbroker.actors.lifecycle import Event
from actorbroker.transport.codec import FrameDecoder
from tests.test_actor_handlers import make

SHARD = ActorAddress("watcher-shard")


def watching():
    actor = make(events.EventsActor)
    actor.receiveMessage(events.Watch(1, 5, "*", SHARD), ActorAddress("conn"))
    return actor


def published(actor):
    decoder = FrameDecoder()
    for target, msg in actor._myRef.sent:
        inner = getattr(msg, "msg", msg)
        for one in getattr(inner, "msgs", [inner]):
            if isinstance(one, shard.Outbound):
                decoder.feed(one.data)
    frames = []
    while (frame := decoder.next_frame()) is not None:
        if frame["op"] == "event":
            frames.append((frame["kind"], frame.get("connection"), frame["seq"]))
    return frames


def release(actor):
    actor.receiveMessage(WakeupMessage(0, events._RELEASE), ActorAddress("self"))


def detached(stamp, connection):
    return Event("consumer_detached", stamp, {"topic": "/t/x", "subscription": "s", "consumer": 3,
                                              "consumer_name": "c", "cause": "connection_closed",
                                              "connection": connection})


def test_a_detach_waits_for_the_close_that_caused_it_when_that_close_is_late():
    actor = watching()
    decided = time.time() - 1.0   # both decided a second ago: past the hold
    actor.receiveMessage(detached(decided + 0.001, 7), ActorAddress("dispatcher"))
    actor.receiveMessage(Event("connection_opened", decided + 0.002, {"connection": 8}), ActorAddress("shard"))
    release(actor)
    assert [f[0] for f in published(actor)] == ["connection_opened"]   # the detach waits
    actor.receiveMessage(Event("connection_closed", decided, {"connection": 7, "cause": "eof"}),
                         ActorAddress("shard"))   # the shard's, late
    release(actor)
    assert published(actor) == [("connection_opened", 8, 1), ("connection_closed", 7, 2),
                                ("consumer_detached", 7, 3)]


def test_a_detach_whose_close_arrived_first_goes_in_stamp_order_and_one_whose_close_never_comes_goes_anyway():
    actor = watching()
    decided = time.time() - 1.0
    actor.receiveMessage(Event("connection_closed", decided, {"connection": 7, "cause": "eof"}), ActorAddress("shard"))
    actor.receiveMessage(detached(decided + 0.001, 7), ActorAddress("dispatcher"))
    release(actor)
    assert published(actor) == [("connection_closed", 7, 1), ("consumer_detached", 7, 2)]
    actor.receiveMessage(detached(decided + 0.002, 9), ActorAddress("dispatcher"))   # 9's close: lost
    release(actor)
    assert len(published(actor)) == 2
    actor.waiting[9] = [(time.monotonic() - events.CAUSE_WAIT_S - 1, entry) for _, entry in actor.waiting[9]]
    release(actor)   # waited its bound: published all the same
    assert published(actor)[-1] == ("consumer_detached", 9, 3)
