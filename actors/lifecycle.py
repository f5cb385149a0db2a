"""Lifecycle events as the deciding actors send them to the EventsActor (actors/events.py).

A module of its own, importing no actor: every actor that decides something emits from here.
"""
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    kind: str
    time: float          # time.time() when the broker decided it
    fields: dict         # the frame's fields of this kind (`topic` among them when it has one)


def emit(actor, events_address, kind, decided=None, **fields):
    """Send an event, decided now (or at `decided`, a time.time() taken earlier), to the
    EventsActor (when the broker has one). One ordered channel per sender: its events arrive in
    the order it decided them, batched."""
    if events_address is not None:
        event = Event(kind, time.time() if decided is None else decided, fields)
        actor.send_ordered(events_address, event, "events", lazy=True)
