"""Base class of every broker actor: dispatch on message type, ordered channels, held messages
until initialisation, and dying with the parent process."""
import dataclasses
import logging
import multiprocessing
import os
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from thespian.actors import (
    Actor, ActorExitRequest, ActorSystemMessage, ChildActorExited, PoisonMessage, WakeupMessage)
from thespian.system.transport import TransmitIntent

from actorbroker.actors.process import close_siblings_fds_in_children, die_with_parent, name_process
from actorbroker.actors.reporting import REPORT_EVERY, REPORT_UNCHANGED_EVERY, MetricsReport
from actorbroker.transport.errors import INTERNAL

log = logging.getLogger("actorbroker")
# Thespian forwards every record its root logger lets through to the logger process, one Thespian
# message each, and lets everything through: filter here, at the level `serve --log-level` set.
log.setLevel(os.environ.get("ACTORBROKER_LOG_LEVEL", "INFO"))

@dataclass(frozen=True)
class Ordered:
    """A message of an ordered channel. Thespian does not promise order between two actors (and
    a just-created actor visibly gets messages out of order), so streams whose order matters
    carry a sequence number and the receiver puts them back in order."""
    channel: tuple   # (sender instance id, stream)
    seq: int
    msg: Any

    def __repr__(self):
        # Thespian formats every message it sends or receives (for a debug log it then drops):
        # keep that O(1), whatever the size of the batch inside
        return f"Ordered({self.channel!r}, {self.seq}, {type(self.msg).__name__})"


@dataclass(frozen=True)
class ChannelEnd:
    """The last message of an ordered channel: its sender forgot it (forget_ordered) or is
    exiting. Its receiver drops the channel's state once it has handled everything before it."""


@dataclass(frozen=True)
class Batch:
    """Several messages of one ordered channel, sent as one Thespian message. A Thespian message
    costs about a millisecond here whatever its size: everything an actor sends on one channel
    while it handles one message goes together (a burst of closes, of subscribes, ...)."""
    msgs: tuple

    def __repr__(self):
        return f"Batch({len(self.msgs)} messages, first {type(self.msgs[0]).__name__ if self.msgs else None})"


# An ordered channel has at most one Thespian message in flight: what is sent on it before that
# one has reached its receiver's transport waits in the outbox and goes as the next Batch. Thespian
# keeps one message in flight per pair of actors and walks every waiting transmit on every pass
# of its loop: a burst of small messages to one receiver made each pass cost milliseconds, and
# 2,000 concurrent subscribes collapsed to ~100/s (docs/benchmarks.md). Batches grow with the
# load instead, and a lone message goes at once.
_FLUSH = "actorbroker-flush"
# Thespian tells of every transmit's end (arrived, failed, or expired after 5 minutes); should
# that word never come, the channel's next message goes after this long all the same.
IN_FLIGHT_WAIT_S = 2.0
# A transmit that broke (the connection reset under it) is tried again after this, then twice
# this, ...: Thespian's default waits 35 s, so a message sent as its receiver exited held its
# sender's shutdown for the whole 7 s drain (a second try finds the port closed: DeadTarget).
RETRY_AFTER = timedelta(milliseconds=200)
# A lazy message (send_ordered(lazy=True): nobody waits for it now) waits this long before it
# goes, unless its channel is expedited: a Thespian send costs its sender about a millisecond
# of CPU, and the takeover after a disconnect must not queue behind the paperwork about it.
LAZY_S = 0.01
# A message of an ordered channel that has not come this long after a later one never will (its
# sender died, or Thespian dropped it): go on without it rather than hold the channel forever.
GAP_TIMEOUT_S = 5.0
_GAP = "actorbroker-gap"
_REPORT = "actorbroker-report"
_DROP_CHANNELS = "actorbroker-drop-channels"
# Thespian looks for dead children when SIGCHLD comes, once per signal; children killed together
# sent one SIGCHLD (signals of one kind do not queue) and one of them, still ending when Thespian
# looked, was never reported (measured: kill -9 of two SubscriptionActors of a topic left one
# dead for good). After any ChildActorExited it looks again, these long after.
_RECHECK_CHILDREN = "actorbroker-recheck-children"
RECHECK_CHILDREN_AFTER = (timedelta(milliseconds=100), timedelta(seconds=1))
EXIT_WITHIN_S = 5.0   # an actor process still there this long after its ActorExitRequest ends itself


def _ends(msg):
    """Whether `msg` (an Ordered's content) is, or ends with, a ChannelEnd."""
    if type(msg) is Batch:
        return bool(msg.msgs) and type(msg.msgs[-1]) is ChannelEnd
    return type(msg) is ChannelEnd


def _unwrapped(msg):
    """The messages inside an Ordered / Batch."""
    if isinstance(msg, Ordered):
        msg = msg.msg
    if isinstance(msg, Batch):
        yield from msg.msgs
    else:
        yield msg


@dataclass(frozen=True)
class OperabilityMoved:
    """Down the tree from the root: the EventsActor or MetricsActor died (kill -9) and was
    restarted; these are their addresses now. Every actor takes them (BrokerActor does) and passes
    the message on to its children (`operability_children`)."""
    events: Any
    metrics: Any


class BrokerActor(Actor):
    """`receiveMessage` calls `on_<MessageType>(msg, sender)` and returns `self.watch()`.

    Returning the watch on every path matters: Thespian replaces an actor's watched sockets
    after every message, so a path that forgot it would silently stop reading its socket.

    An actor whose class sets `init_message` holds every other (non-system) message until that
    one has been handled: an actor's init and its first requests come from different senders.

    Every message is handled on its own: a handler that raises is logged and counted
    (`handler_errors`), a request it was handling is answered INTERNAL, and the next message (of
    the same Batch too) is handled all the same. Thespian would retry the message and then drop
    it, with the rest of its Batch, and the request would never be answered.
    """
    init_message = None
    process_name = None     # see name_process

    thespian_sends = 0   # messages sent or queued through Thespian (see quiet_since)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        die_with_parent()
        close_siblings_fds_in_children(self)
        if self.process_name:
            name_process(self.process_name)
        self._uid = uuid.uuid4().hex
        self._out_seq = {}     # stream -> next seq
        self._in_seq = {}      # channel -> [expected seq, {seq: (msg, sender)}, its sender's address]
        self._out_to = {}      # stream -> the address its last message went to
        self._channel_id = self._uid   # first half of our channels' keys (new once they have ended)
        self._outbox = {}      # stream -> (address, [msgs]) sent when the current message is handled
        self._in_flight = {}   # stream -> (when, token) of its last Thespian message, until it arrived
        self._lazy_due = {}    # lazy stream -> when what waits in it goes
        self._flush_wakeups = set()   # due times of the flush wakeups scheduled
        self._rechecks_due = set()    # RECHECK_CHILDREN_AFTER delays with a wakeup pending
        self._gaps = {}        # channel -> when it started waiting for a missing message
        self._gap_check_due = False
        self.gaps_skipped = 0
        self.poison_messages = 0
        self.handler_errors = 0
        self._initialized = self.init_message is None
        self._held = []
        self._metrics_to = None   # the MetricsActor, once start_reports was called
        self._exit_timer = None   # armed by an ActorExitRequest (_arm_exit_deadline)
        self._last_report = (None, 0.0)   # (what was reported, when)
        # ACTORBROKER_PROFILE_DIR=dir: profile message handling, one .prof per actor, written at
        # exit (for finding the hot spots of the record path; off by default). CPU time, not wall
        # time: on a busy machine a socket call that wakes another process often loses the core.
        self._profile = None
        if os.environ.get("ACTORBROKER_PROFILE_DIR"):
            import cProfile
            import time
            self._profile = cProfile.Profile(time.process_time)

    def receiveMessage(self, msg, sender):
        if self._profile is not None:
            self._profile.enable()
            try:
                return self._receive(msg, sender)
            finally:
                self._profile.disable()
                if isinstance(msg, ActorExitRequest):
                    path = os.path.join(os.environ["ACTORBROKER_PROFILE_DIR"],
                                        f"{type(self).__name__}-{os.getpid()}.prof")
                    self._profile.dump_stats(path)
        return self._receive(msg, sender)

    def _receive(self, msg, sender):
        if isinstance(msg, WakeupMessage) and isinstance(msg.payload, tuple) and msg.payload[0] == _FLUSH:
            self._flush_wakeups.discard(msg.payload[1])
            self._flush_outbox()
            return self.watch()
        if isinstance(msg, WakeupMessage) and msg.payload == _REPORT:
            self._report_metrics()
            self.wakeupAfter(REPORT_EVERY, payload=_REPORT)
            return self.watch()
        if isinstance(msg, WakeupMessage) and isinstance(msg.payload, tuple) and msg.payload[0] == _RECHECK_CHILDREN:
            self._rechecks_due.discard(msg.payload[1])
            transport = getattr(getattr(self, "_myRef", None), "transport", None)
            if hasattr(transport, "interrupt_wait"):   # Thespian's own check: ChildActorExited per dead child
                transport.interrupt_wait(check_children=True)
            self._children_missing()
            return self.watch()
        if isinstance(msg, ChildActorExited):
            for delay in RECHECK_CHILDREN_AFTER:   # one of each pending: a burst of exits, one check
                if delay not in self._rechecks_due:
                    self._rechecks_due.add(delay)
                    self.wakeupAfter(delay, payload=(_RECHECK_CHILDREN, delay))
            self._sender_gone(msg.childAddress)
        if isinstance(msg, WakeupMessage) and isinstance(msg.payload, tuple) and msg.payload[0] == _DROP_CHANNELS:
            for channel in msg.payload[1]:
                self._drop_channel(channel)
            return self.watch()
        if isinstance(msg, ActorExitRequest):
            self._arm_exit_deadline()
        if isinstance(msg, ActorExitRequest) and self._metrics_to is not None:
            self._report_metrics()   # what was counted since the last report
        try:
            if isinstance(msg, WakeupMessage) and msg.payload == _GAP:
                self._gap_check_due = False
                self._ordered_deliver(self._ordered_skip_gaps())
            elif isinstance(msg, PoisonMessage):
                # A message we sent failed twice in its receiver (which lives on): count it.
                self.poison_messages += 1
                log.error("%s: a %s we sent failed in its receiver: %s", type(self).__name__,
                          type(msg.poisonMessage).__name__, (msg.details or "")[-500:])
            elif isinstance(msg, Ordered):
                self._ordered_deliver(self._ordered_release(msg, sender))
            else:
                self._base_dispatch(msg, sender)
        except Exception:
            # not a handler's failure (those are caught in _base_handle): a message of a shape
            # this module cannot use, an Ordered whose channel is a list, say
            log.exception("%s: a %s could not be handled", type(self).__name__, type(msg).__name__)
            self.handler_errors += 1
        finally:
            if isinstance(msg, ActorExitRequest):
                self._end_channels()
            # an exiting actor gets no wakeup: what waits to gather more must go now
            self._flush_outbox(force=isinstance(msg, ActorExitRequest))
        return self.watch()

    def _arm_exit_deadline(self):
        """Thespian ends an exiting actor only once every child has reported its exit, and waits
        for that without limit; a child whose end it never saw (children ending together send one
        SIGCHLD) kept a deleted topic's process, and serve's stop, waiting for good. As an OTP
        supervisor's shutdown timeout: the process ends itself EXIT_WITHIN_S later if it is still
        there (its parent sees it exit, its children die with it)."""
        if multiprocessing.parent_process() is None:   # not a process of its own (simpleSystemBase)
            return
        if self._exit_timer is None:
            self._exit_timer = threading.Timer(EXIT_WITHIN_S, os._exit, args=(70,))   # EX_SOFTWARE: never silent
            self._exit_timer.daemon = True
            self._exit_timer.start()

    def undeliverable(self, address, msgs):
        """Messages sent on an ordered channel to `address` that never reached it (its actor is
        gone): an actor that passed requests on may answer or re-route them here."""

    def known_children(self):
        """Addresses of the children this actor supervises (for _children_missing)."""
        return []

    def _children_missing(self):
        """A child Thespian has found dead (gone from its list of child processes) whose
        ChildActorExited never reached us: handled as if it had (the handlers are idempotent).
        Seen when two children were killed together: both were reaped, one was reported."""
        procs = getattr(getattr(self, "_myRef", None), "_child_procs", None)
        if procs is None:
            return
        # (addresses are not hashable; their str is: comparing every known child with every live
        # one made each exit's check quadratic: 300 topics deleted took 44 s, the root stalled)
        # a child is known by the address createActor gave (local until it started) or by the one
        # it has since (Thespian's childRealAddr): either may be what an actor kept, and a live
        # child taken for a dead one has its subscription restarted under its consumers
        live = {str(child.childAddr) for child in procs}
        live.update(str(child.childRealAddr) for child in procs if hasattr(child, "childRealAddr"))
        for address in self.known_children():
            if address is not None and str(address) not in live:
                log.warning("%s: child %s is gone and was not reported; handling its exit now",
                            type(self).__name__, address)
                self._base_dispatch(ChildActorExited(address), self.myAddress)
                forget = getattr(self._myRef, "_handleChildExited", None)
                if forget is not None:   # as Thespian does after a reported exit: else, when this
                    forget(address)      # actor exits, it waits ~10 s for that child to answer

    def _ordered_deliver(self, released):
        for inner, inner_sender in released:
            if isinstance(inner, Batch):
                for one in inner.msgs:
                    if type(one) is not ChannelEnd:
                        self._base_dispatch(one, inner_sender)
            elif type(inner) is not ChannelEnd:
                self._base_dispatch(inner, inner_sender)

    def _base_dispatch(self, msg, sender):
        if not self._initialized and not isinstance(msg, ActorSystemMessage):
            if not isinstance(msg, self.init_message):
                self._held.append((msg, sender))
                return
            self._initialized = True
            self._base_handle(msg, sender)
            held, self._held = self._held, []
            for m, s in held:
                self._base_handle(m, s)
            return
        self._base_handle(msg, sender)

    def _base_handle(self, msg, sender):
        handler = getattr(self, "on_" + type(msg).__name__, None)
        if handler is None:
            return
        try:
            handler(msg, sender)
        except Exception as exc:
            log.exception("%s: handling a %s failed", type(self).__name__, type(msg).__name__)
            self._base_failed(msg, f"{type(exc).__name__} in the broker (logged)")

    def _base_failed(self, msg, text):
        """Count the failure, and answer the request `msg` carried, if any, with INTERNAL."""
        self.handler_errors += 1
        request = getattr(msg, "request", msg)   # a TopicRequest carries its request
        rid, reply_to = getattr(request, "rid", None), getattr(request, "reply_to", None)
        if rid is not None and reply_to is not None:
            # imported here: connection.py imports this module
            from actorbroker.actors.connection import RequestFailed
            try:
                self.send(reply_to, RequestFailed(rid, INTERNAL, text))
            except Exception:
                log.exception("%s: could not answer a failed %s", type(self).__name__, type(msg).__name__)

    def _ordered_release(self, msg, sender):
        state = self._in_seq.get(msg.channel)
        if state is None:
            if type(msg.msg) is ChannelEnd:
                # the end of a channel we hold nothing of (ended already, or sent to the address
                # of an actor gone, where a new one lives now): nothing to forget
                return []
            state = self._in_seq[msg.channel] = [0, {}, sender]
        if msg.seq < state[0]:
            return []   # after a gap was skipped, a straggler: too late
        state[1][msg.seq] = (msg.msg, sender)
        return self._ordered_run(msg.channel, state)

    def _ordered_run(self, channel, state):
        """The messages that are next in order; a channel still missing one starts waiting."""
        ready = []
        while state[0] in state[1]:
            ready.append(state[1].pop(state[0]))
            state[0] += 1
            if _ends(ready[-1][0]):   # its last message: nothing more will come on it
                self._drop_channel(channel)
                return ready
        if state[1]:
            if ready or channel not in self._gaps:
                self._gaps[channel] = time.monotonic()
            if not self._gap_check_due:
                self._gap_check_due = True
                self.wakeupAfter(timedelta(seconds=GAP_TIMEOUT_S), payload=_GAP)
        else:
            self._gaps.pop(channel, None)
        return ready

    def _ordered_skip_gaps(self):
        released = []
        now = time.monotonic()
        for channel, since in list(self._gaps.items()):
            state = self._in_seq.get(channel)
            if state is None or not state[1]:
                self._gaps.pop(channel, None)
                continue
            if now - since >= GAP_TIMEOUT_S:
                first = min(state[1])
                log.error("%s: ordered channel %s: messages %d..%d never came; going on without them",
                          type(self).__name__, channel[1], state[0], first - 1)
                self.gaps_skipped += 1
                state[0] = first
                released += self._ordered_run(channel, state)
        if self._gaps and not self._gap_check_due:
            self._gap_check_due = True
            self.wakeupAfter(timedelta(seconds=GAP_TIMEOUT_S / 2), payload=_GAP)
        return released

    def _drop_channel(self, channel):
        self._in_seq.pop(channel, None)
        self._gaps.pop(channel, None)

    def _sender_gone(self, address):
        """The actor at `address` is dead (its ChildActorExited; a kill -9 sends no ChannelEnd):
        its channels to us are dropped GAP_TIMEOUT_S from now, time for what it sent before it
        died to come. Only the channels it has now: a new actor at the same address has others."""
        channels = tuple(channel for channel, state in self._in_seq.items() if state[2] == address)
        if channels:
            self.wakeupAfter(timedelta(seconds=GAP_TIMEOUT_S), payload=(_DROP_CHANNELS, channels))

    def send(self, targetAddr, msg):
        self.thespian_sends += 1
        super().send(targetAddr, msg)

    def quiet_since(self, sends):
        """Whether nothing was sent through Thespian since thespian_sends was `sends`: a
        record-path actor lingering in its own epoll (transport.lanes.Reactor) returns to
        Thespian's loop as soon as it has something for it to carry now (a lazy message waits)."""
        return self.thespian_sends == sends

    def send_ordered(self, address, msg, stream, lazy=False):
        """Send on the ordered channel `stream`: a key naming one receiver, stable for its life
        (not the address itself: a new actor's address changes form once it has started). What
        is sent on one channel while one message is handled goes as one Batch."""
        if not lazy:   # a lazy one does not end a record-path actor's lingering (see quiet_since)
            self.thespian_sends += 1
        entry = self._outbox.get(stream)
        if entry is None:
            self._outbox[stream] = (address, [msg])
            if lazy:
                self._lazy_due[stream] = time.monotonic() + LAZY_S
        else:
            entry[1].append(msg)
        if not lazy:
            self._lazy_due.pop(stream, None)   # someone waits for this one: the batch goes as usual

    def _flush_outbox(self, streams=None, force=False):
        """Send what waits in the outbox (of every stream, or of `streams`). A stream with a
        message in flight waits for it (see _sent), a lazy one for its due time; `force` sends
        now whatever waits (the actor is exiting, or the receiver is being forgotten)."""
        streams = list(self._outbox) if streams is None else streams
        now = time.monotonic()
        for stream in streams:
            if stream not in self._outbox:   # sent meanwhile (a transmit completed during a send)
                continue
            if not force:
                in_flight = self._in_flight.get(stream)
                if in_flight is not None:   # goes when the one in flight has arrived...
                    if now < in_flight[0] + IN_FLIGHT_WAIT_S:
                        self._flush_at(in_flight[0] + IN_FLIGHT_WAIT_S, now)
                        continue
                    # ... or, should Thespian never tell, after IN_FLIGHT_WAIT_S: a channel
                    # must not stop for good on a lost callback
                    log.warning("%s: ordered channel %r: no word of the message in flight for %.0f s; "
                                "sending the next one", type(self).__name__, stream, now - in_flight[0])
                due = self._lazy_due.get(stream, 0.0)
                if now < due:   # lazy: waits and gathers more
                    self._flush_at(due, now)
                    continue
            self._lazy_due.pop(stream, None)
            address, msgs = self._outbox.pop(stream)
            seq = self._out_seq.get(stream, 0)
            self._out_seq[stream] = seq + 1
            self._out_to[stream] = address
            try:
                self._send_stream(stream, address, Ordered((self._channel_id, stream), seq,
                                                           msgs[0] if len(msgs) == 1 else Batch(tuple(msgs))))
            except Exception:   # not an address (a handler's bug): the other channels still go
                self._in_flight.pop(stream, None)
                log.exception("%s: ordered channel %r: cannot send to %r", type(self).__name__, stream, address)
                self.handler_errors += 1

    def _send_stream(self, stream, address, msg):
        token = object()
        self._in_flight[stream] = (time.monotonic(), token)
        self._send_tracked(address, msg, lambda: self._sent(stream, token))

    def _send_tracked(self, address, msg, done, max_period=None):
        """Actor.send, then `done()` once the message has reached its receiver's transport or
        failed. Actor.send does not tell: this builds the TransmitIntent it would, with callbacks."""
        manager = getattr(self, "_myRef", None)
        if not hasattr(manager, "_send_intent"):   # not a multiproc actor system: no gate
            self.send(address, msg)
            done()
            return
        self.thespian_sends += 1

        def arrived(_result, _intent):
            done()

        def failed(result, intent):
            done()
            manager.actor_send_fail(result, intent)   # dead letters, as Actor.send has them
            try:
                self.undeliverable(address, list(_unwrapped(msg)))
            except Exception:   # a handler's bug must not break Thespian's callback
                log.exception("%s: undeliverable() failed", type(self).__name__)
                self.handler_errors += 1

        manager._send_intent(TransmitIntent(address, msg, onSuccess=arrived, onError=failed,
                                            maxPeriod=max_period, retryPeriod=RETRY_AFTER))

    def _sent(self, stream, token):
        """The message in flight on `stream` arrived or failed: what gathered meanwhile goes."""
        if self._in_flight.get(stream, (None, None))[1] is not token:
            return   # an older one, given up on (IN_FLIGHT_WAIT_S)
        del self._in_flight[stream]
        if stream in self._outbox:
            self._flush_outbox([stream])

    def expedite(self, stream):
        """What waits lazily on `stream` goes with this message's sends after all."""
        self._lazy_due.pop(stream, None)

    def _flush_at(self, due, now):
        # one wakeup serves every stream due by then (within a millisecond)
        if not any(t <= due + 0.001 for t in self._flush_wakeups):
            self._flush_wakeups.add(due)
            self.wakeupAfter(timedelta(seconds=max(0.0, due - now)), payload=(_FLUSH, due))

    def forget_ordered(self, stream, end=True):
        """The receiver is gone, or this actor sends it nothing more on `stream`: what waits goes
        now, to the old receiver, and ends with a ChannelEnd (unless `end` is False: the
        receiver is known dead), so that a receiver still alive forgets the channel. A new
        receiver under the same key starts from zero."""
        if end:
            self._end_stream(stream)
        self._flush_outbox([stream], force=True)
        self._out_seq.pop(stream, None)
        self._out_to.pop(stream, None)

    def _end_stream(self, stream):
        entry = self._outbox.get(stream)
        if entry is not None:
            entry[1].append(ChannelEnd())
            self._lazy_due.pop(stream, None)
        elif stream in self._out_to:
            self._outbox[stream] = (self._out_to[stream], [ChannelEnd()])

    def _end_channels(self):
        """This actor is exiting: every channel it sent on ends (its receivers forget it), but
        those to its children, which exit with it. Sent with what waits (one Batch each). Should
        it send more before it is gone (to whom its exit is no concern), those go on new channels."""
        procs = getattr(getattr(self, "_myRef", None), "_child_procs", None) or ()
        children = [child.childAddr for child in procs]
        for stream in set(self._out_to) | set(self._outbox):
            address = self._outbox[stream][0] if stream in self._outbox else self._out_to[stream]
            if address not in children:
                self._end_stream(stream)
        self._flush_outbox(force=True)
        self._out_seq.clear()
        self._out_to.clear()
        self._channel_id = uuid.uuid4().hex

    def hold_until(self, message_type):
        """Hold every other message until one of `message_type` has been handled."""
        self.init_message = message_type
        self._initialized = False

    def watch(self):
        return None

    # --- metrics (actors/reporting.py) ----------------------------------------------------------
    def on_OperabilityMoved(self, msg, sender):
        config = getattr(self, "config", None)
        old_events = getattr(self, "events", None) or getattr(config, "events", None)
        if old_events is not None and old_events != msg.events:
            # the new EventsActor must not wait for what this channel sent to the old one (dead)
            self.forget_ordered("events", end=False)
        if config is not None and hasattr(config, "events"):
            self.config = dataclasses.replace(config, events=msg.events, metrics=msg.metrics)
        if getattr(self, "events", None) is not None:
            self.events = msg.events
        if self._metrics_to is not None:
            self._metrics_to = msg.metrics
        for child in self.operability_children():
            self.send(child, msg)

    def operability_children(self):
        """The actors this one started that send events or metrics, or start such actors."""
        return ()

    def start_reports(self, metrics_address):
        """Report `metrics_snapshot` to the MetricsActor every REPORT_EVERY (None: metrics off)."""
        if metrics_address is not None and self._metrics_to is None:
            self._metrics_to = metrics_address
            self.wakeupAfter(REPORT_EVERY, payload=_REPORT)

    def metrics_snapshot(self, counters, gauges, histograms):
        """Fill the three dicts, {(metric name, label values): number}; see actors/metrics.py."""

    def _report_metrics(self):
        counters, gauges, histograms = {}, {}, {}
        try:
            self.metrics_snapshot(counters, gauges, histograms)
            kind = self.process_name or type(self).__name__   # the state of its ordered channels
            gauges[("actorbroker_ordered_channels", (kind, "in"))] = len(self._in_seq)
            gauges[("actorbroker_ordered_channels", (kind, "out"))] = len(self._out_to)
            now = time.monotonic()
            # an idle actor (most of them, most of the time) says so only now and then
            if (counters, gauges, histograms) == self._last_report[0] and \
                    now - self._last_report[1] < REPORT_UNCHANGED_EVERY:
                return
            self._last_report = ((counters, gauges, histograms), now)
            self.send(self._metrics_to, MetricsReport(self._uid, counters, gauges, histograms))
        except Exception:
            log.exception("%s: metrics report failed", type(self).__name__)

    def exit_self(self):
        # what waits lazily goes with this message's sends: sent while the exit is handled, it
        # cost the reply sent just before (seen: a delete_topic never answered)
        self._lazy_due.clear()
        self.send(self.myAddress, ActorExitRequest())

