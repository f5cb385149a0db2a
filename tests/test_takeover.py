"""A failover takeover inside the DispatcherActor, over its real lanes (Unix sockets): the records
read in the same wakeup as the active consumer's DETACH go to the consumer that takes over, and
the Thespian messages about the takeover go once the shard has written it.

The actor is the broker's real class; what it would send through Thespian is recorded by the
stand-in of tests/test_actor_handlers.py. Both lanes' frames are written before the actor polls,
so that one wakeup reads them both, as happens on a busy machine.
"""
import select
import socket
import struct

import msgpack
from thespian.actors import ActorAddress, WatchMessage

from actorbroker.actors import base, connection, dispatcher, subscription
from actorbroker.actors.config import BrokerConfig
from actorbroker.transport.codec import make_run
from actorbroker.transport.lanes import LaneOp, encode_lane_frame
from tests.test_actor_handlers import make

SUBSCRIPTION = ActorAddress("the-subscription")
RUN0, RUN1 = (make_run(offset, 1, "p", [b"record-%d" % offset]) for offset in (0, 1))
OWNER = ActorAddress("the-connection-actor")


class PeerLane:
    """The topic's or a shard's end of a lane to the dispatcher."""

    def __init__(self, address, ident):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(address.name)
        self.buf = b""
        self.send([LaneOp.HELLO, ident])

    def send(self, frame):
        self.sock.sendall(encode_lane_frame(frame))

    def frames(self, timeout=5):
        """What the dispatcher has written so far (at least one frame)."""
        out = []
        while not out:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            assert ready, "the dispatcher wrote nothing on this lane"
            self.buf += self.sock.recv(1 << 16)
            while len(self.buf) >= 4:
                (n,) = struct.unpack_from(">I", self.buf)
                if len(self.buf) < 4 + n:
                    break
                out.append(msgpack.unpackb(self.buf[4:4 + n], raw=False))
                self.buf = self.buf[4 + n:]
        return out


def wake(actor):
    """One Thespian wakeup of the actor's watched epoll, once something is ready in it."""
    ready, _, _ = select.select([actor.reactor.fileno()], [], [], 5)
    assert ready
    actor.receiveMessage(WatchMessage([actor.reactor.fileno()]), None)


def sent_messages(actor):
    out = []
    for _, msg in actor._myRef.sent:
        inner = msg.msg if isinstance(msg, base.Ordered) else msg
        out += list(inner.msgs) if isinstance(inner, base.Batch) else [inner]
    return out


def failover_with_one_delivery(tmp_path):
    """A non_reliable failover dispatcher with its topic's lane and a shard's lane, consumers 1
    ("a", active: the first by name) and 2 ("b") on that shard, RUN0 delivered to 1."""
    config = BrokerConfig(data_dir=str(tmp_path), port=0, io_shards=1)
    d = make(dispatcher.DispatcherActor,
             dispatcher.InitDispatcher("/t/fo", "s", "failover", "non_reliable", config))
    topic_lane, shard_lane = PeerLane(d.hub.address, "/t/fo"), PeerLane(d.hub.address, "shard-x")
    while "shard-x" not in d.shard_lanes:   # accepted, then their HELLOs read
        wake(d)
    for consumer_id, name in ((1, "a"), (2, "b")):
        d.receiveMessage(dispatcher.AddConsumer(consumer_id, name, "shard-x", OWNER, (7, consumer_id), None),
                         SUBSCRIPTION)
        shard_lane.send([LaneOp.ROUTED, consumer_id])
        shard_lane.send([LaneOp.FLOW, consumer_id, 100])
    topic_lane.send([LaneOp.DISPATCH, [RUN0]])
    delivered = []
    while not delivered:
        wake(d)
        delivered = [f for f in shard_lane.frames() if f[0] == LaneOp.DELIVER]
    assert delivered == [[LaneOp.DELIVER, 1, [RUN0]]]
    return d, topic_lane, shard_lane


def test_records_read_with_a_detach_go_to_the_standby_behind_its_active_push(tmp_path):
    d, topic_lane, shard_lane = failover_with_one_delivery(tmp_path)
    shard_lane.send([LaneOp.DELIVER_ACK, 1])
    wake(d)
    # epoll reports a level-triggered fd it reported last time first, if ready: make that the
    # topic's lane, so that the DISPATCH below is read before the DETACH
    topic_lane.send([LaneOp.DISPATCH, []])
    wake(d)
    d._myRef.sent.clear()

    # the next record, then the active consumer's connection ends: one wakeup reads both
    topic_lane.send([LaneOp.DISPATCH, [RUN1]])
    shard_lane.send([LaneOp.DETACH, 1, None])
    wake(d)
    # the standby is told it is active over the lane, ahead of its records
    assert [f for f in shard_lane.frames() if f[0] in (LaneOp.DELIVER, LaneOp.ACTIVE)] == [
        [LaneOp.ACTIVE, 2, True], [LaneOp.DELIVER, 2, [RUN1]]]
    # the paperwork waits: sent with the delivery, it took the CPU the delivery needed next
    assert subscription.MembersLost([1]) not in sent_messages(d)
    # ... until the shard has written those records
    shard_lane.send([LaneOp.DELIVER_ACK, 2])
    wake(d)
    assert subscription.MembersLost([1]) in sent_messages(d)


def test_records_the_shard_could_not_write_go_to_the_standby(tmp_path):
    """A DELIVER that reached the shard after the active consumer's connection had ended (its
    DETACH already on the way) comes back UNDELIVERED: on a non_reliable subscription nobody had
    those records, so the consumer that takes over gets them, in order, before anything newer."""
    d, topic_lane, shard_lane = failover_with_one_delivery(tmp_path)

    shard_lane.send([LaneOp.DETACH, 1, None])
    shard_lane.send([LaneOp.UNDELIVERED, 1, [RUN0]])
    topic_lane.send([LaneOp.DISPATCH, [RUN1]])
    got = []
    while sum(len(f[2]) for f in got) < 2:
        wake(d)
        got += [f for f in shard_lane.frames() if f[0] == LaneOp.DELIVER]
    assert [run[0] for f in got for run in f[2]] == [0, 1]
    assert {f[1] for f in got} == {2}
