"""The work-around for Thespian 4.0.1 losing a message that arrives right behind another on a
reused actor socket (actors/system.py, keep_trailing_messages)."""
import pickle

from actorbroker.actors.system import keep_trailing_messages


def test_message_read_behind_another_is_not_lost():
    keep_trailing_messages()
    from thespian.system.transport.streamBuffer import ReceiveBuffer, toSendBuffer
    from thespian.system.transport.TCPTransport import TCPIncomingPersistent
    received = ReceiveBuffer(pickle.loads)
    received.addMore(toSendBuffer(("sender", "first")) + toSendBuffer(("sender", "second")))
    packet, trailing = received.completed()
    assert tuple(packet) == ("sender", "first") and trailing
    # what TCPTransport._addedDataToIncoming does with the trailing bytes (it passes `packet`)
    follower = TCPIncomingPersistent("sender", None)
    follower.addData(packet)
    assert follower.data == (("sender", "second"), b"")
