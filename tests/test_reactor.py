"""transport.lanes.Reactor's idle wait, without an actor system: pure epoll logic on socketpairs.

A record-path actor idles in its own epoll, Thespian's sockets included (`outside`), and must keep
doing so for as long as Thespian has nothing to do: a frame after a long quiet is handled by the
same idle wait, not by a pass through Thespian's loop."""
import os
import socket
import threading

import pytest

from actorbroker.transport import lanes
from actorbroker.transport.lanes import IN, Reactor


class Recorder:
    def __init__(self, sock):
        self.sock = sock
        self.got = []
        self.event = threading.Event()

    def on_event(self, fd, events):
        data = self.sock.recv(4096)
        self.got.append(data)
        self.event.set()


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    r, w = os.pipe()
    yield a, b, r, w
    for s in (a, b):
        s.close()
    os.close(r)
    os.close(w)


def test_the_idle_wait_outlasts_its_step_and_handles_a_late_frame(monkeypatch, pair):
    monkeypatch.setattr(lanes, "MAX_IDLE_S", 0.02)   # steps of 20 ms: the late frame comes after several
    a, b, outside_r, outside_w = pair
    reactor = Reactor(linger=0.002)
    recorder = Recorder(a)
    reactor.add(a.fileno(), recorder, IN)
    asked = []

    def outside():   # Thespian idle: its socket (a pipe here), its next timer far away
        asked.append(1)
        return [outside_r], 60.0
    reactor.outside = outside

    def later():
        b.send(b"late")   # after the first step of the idle wait has timed out (see below)
        recorder.event.wait(10)
        os.write(outside_w, b"!")   # then Thespian has work: the poll must return
    b.send(b"first")
    timer = threading.Timer(0.15, later)
    timer.start()
    try:
        reactor.poll(quiet=lambda: True)
    finally:
        timer.join()
        reactor.close()
    assert recorder.got == [b"first", b"late"]
    assert len(asked) >= 3   # the wait went on past MAX_IDLE_S, asking the outside loop each step


def test_the_idle_wait_returns_when_the_outside_loop_has_work(pair):
    a, b, outside_r, outside_w = pair
    reactor = Reactor(linger=0.002)
    recorder = Recorder(a)
    reactor.add(a.fileno(), recorder, IN)
    busy = []
    reactor.outside = lambda: None if busy else ([outside_r], 60.0)
    b.send(b"first")
    busy.append(True)   # a transmit pending, say: no idle wait at all
    reactor.poll(quiet=lambda: True)
    reactor.close()
    assert recorder.got == [b"first"]


def test_the_idle_wait_ends_at_the_outside_loops_timer(pair):
    a, b, outside_r, outside_w = pair
    reactor = Reactor(linger=0.002)
    recorder = Recorder(a)
    reactor.add(a.fileno(), recorder, IN)
    reactor.outside = lambda: ([outside_r], 0.05)   # a Thespian timer due in 50 ms, nothing else
    b.send(b"first")
    reactor.poll(quiet=lambda: True)   # returns (the timer) instead of waiting on
    reactor.close()
    assert recorder.got == [b"first"]
