"""What actorbroker relies on in Thespian's internals (pinned in setup.cfg): the work-around for
Thespian 4.0.1 losing a message that arrives right behind another on a reused actor socket
(actors/system.py, keep_trailing_messages), the names the packet signing replaces
(actors/signing.py), and the other work-arounds of actors/system.py and actors/base.py. These
fail when upstream changes them: then re-check the patches."""
import importlib.metadata
import json
import pickle
import subprocess
import sys
from datetime import timedelta

from actorbroker.actors.system import keep_trailing_messages
from tests.util import ROOT

TESTED_THESPIAN = ("4.0.1",)


def in_fresh_process(function):
    """Run a function of this module in a new interpreter (Thespian unpatched); its JSON result."""
    code = f"import json, tests.test_thespian_patch as t; print(json.dumps(t.{function}()))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode()
    return json.loads(run.stdout)


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


def two_packets_read_at_once(patched=False):
    """The messages Thespian's receive path delivers when one socket read holds two packets."""
    from thespian.system.transport import TCPTransport
    from thespian.system.transport.streamBuffer import toSendBuffer
    if patched:
        keep_trailing_messages()
    delivered = []

    class Socket:
        def send(self, data):
            return len(data)

    class Transport:   # what _addedDataToIncoming uses of its TCPTransport
        _addedDataToIncoming = TCPTransport.TCPTransport._addedDataToIncoming

        def _processReceivedEnvelope(self, envelope, has_exclusive_flag=False):
            delivered.append(envelope.message)

        def _finishIncoming(self, incoming, sender):
            pass

    incoming = TCPTransport.TCPIncomingPersistent("sender", Socket())
    incoming.addData(toSendBuffer(("sender", "first")) + toSendBuffer(("sender", "second")))
    Transport()._addedDataToIncoming(incoming)
    return delivered


def test_thespian_still_loses_the_second_of_two_packets_read_at_once():
    """If this fails, upstream fixed the bug: drop keep_trailing_messages."""
    assert in_fresh_process("two_packets_read_at_once") == ["first"]
    assert two_packets_read_at_once(patched=True) == ["first", "second"]


def thespian_names_signing_replaces():
    from thespian.system.transport import TCPTransport, streamBuffer
    frames = {name: getattr(streamBuffer, name, None) for name in ("ackMsg", "ackDataErrMsg")}
    remade = {"ackMsg": streamBuffer.toSendBuffer(streamBuffer.ackPacket, pickle.dumps),
              "ackDataErrMsg": streamBuffer.toSendBuffer(streamBuffer.ackDataErrPacket, pickle.dumps)}
    return {
        "serializer_is_pickle": TCPTransport.serializer is pickle,
        "acks_imported_by_name": all(getattr(TCPTransport, n, None) is f for n, f in frames.items()),
        "acks_are_the_pickled_packets": frames == remade,
    }


def signing_applies_to_new_incoming_sockets():
    """After install: a packet Thespian receives is checked (the serializer is looked up at call
    time), and the acks it sends are signed."""
    from thespian.system.transport import TCPTransport
    from thespian.system.transport.streamBuffer import toSendBuffer
    from actorbroker.actors import signing
    signer = signing.install(signing.new_secret())
    unsigned = TCPTransport.TCPIncomingPersistent("sender", None)
    unsigned.addData(toSendBuffer(("sender", "hello")))
    signed = TCPTransport.TCPIncomingPersistent("sender", None)
    signed.addData(toSendBuffer(("sender", "hello"), signer.dumps))
    try:
        unsigned.data
        refused = False
    except signing.UnsignedPacket:
        refused = True
    ack = TCPTransport.ackMsg
    return {"unsigned_refused": refused, "signed_accepted": signed.data[0] == ("sender", "hello"),
            "ack_signed": signer.loads(ack[ack.index(b">") + 1:]) == "ACK"}


def test_thespian_version_is_one_this_was_tested_with():
    assert importlib.metadata.version("thespian") in TESTED_THESPIAN


def test_thespian_names_the_signing_replaces_still_exist():
    """TCPTransport.serializer and the ack frames pickled at import (actors/signing.py)."""
    assert all(in_fresh_process("thespian_names_signing_replaces").values())


def test_signing_reaches_thespian_receive_path_and_acks():
    assert all(in_fresh_process("signing_applies_to_new_incoming_sockets").values())


def test_an_exiting_actor_no_longer_watches_its_fds():
    """ActorExitRequest is the one message after which Thespian keeps the old ThespianWatch list
    (actors/system.py, forget_watch_on_exit): the patched exit clears it before shutting down."""
    from thespian.actors import ActorExitRequest
    from thespian.system.actorManager import ActorManager
    from actorbroker.actors.system import forget_watch_on_exit
    forget_watch_on_exit()
    steps = []

    class Transport:
        def set_watch(self, fds):
            steps.append(("watch", fds))

    class Manager:
        transport = Transport()

        def _shutdownActor(self, recursive):
            steps.append(("shutdown", recursive))

    ActorManager._actorExit(Manager(), ActorExitRequest())
    assert steps == [("watch", []), ("shutdown", True)]


def test_queued_transmits_are_checked_for_expiry_rarely_and_still_expire():
    """asyncTransportBase walks its queue of waiting transmits for expired ones on every send
    (actors/system.py, scan_for_expired_transmits_rarely): patched, at most every EXPIRY_SCAN_S,
    and an expired transmit still fails."""
    import time
    from thespian.system.transport import SendStatus, TransmitIntent
    from thespian.system.transport.asyncTransportBase import asyncTransportBase
    from actorbroker.actors import system
    system.scan_for_expired_transmits_rarely()
    transport = asyncTransportBase()
    results = []
    expired = TransmitIntent("target", "old", onError=lambda r, i: results.append(r),
                             maxPeriod=timedelta(microseconds=1))
    transport._aTB_queuedPendingTransmits.append(expired)
    assert transport._complete_expired_intents() == (0, True) and results == [SendStatus.Failed]
    transport._aTB_queuedPendingTransmits.append(
        TransmitIntent("target", "new", onError=lambda r, i: results.append(r), maxPeriod=timedelta(microseconds=1)))
    assert transport._complete_expired_intents() == (1, False)   # within EXPIRY_SCAN_S: not walked
    transport._actorbroker_next_expiry_scan = time.monotonic()
    assert transport._complete_expired_intents() == (0, True) and len(results) == 2


def test_messages_are_described_by_type_not_by_contents():
    """Thespian formats every message it sends or receives for its debug log (actors/system.py,
    describe_messages_briefly): patched, a large message costs no more to describe than a small."""
    from thespian.system.transport import ReceiveEnvelope, TransmitIntent
    from actorbroker.actors import system
    system.describe_messages_briefly()
    big = list(range(100_000))
    assert "list" in TransmitIntent("target", big).identify()
    assert len(TransmitIntent("target", big).identify()) < 200
    assert len(ReceiveEnvelope("sender", big).identify()) < 200


def test_what_the_tracked_send_builds_on_exists():
    """BrokerActor._send_tracked builds Actor.send's TransmitIntent itself, with callbacks."""
    import inspect
    from thespian.system.actorManager import ActorManager
    from thespian.system.transport import TransmitIntent
    assert {"onSuccess", "onError"} <= set(inspect.signature(TransmitIntent).parameters)
    assert callable(getattr(ActorManager, "_send_intent", None))
    assert callable(getattr(ActorManager, "actor_send_fail", None))
