"""actors/starting.py: how many subscriptions a topic lets start at once (pure logic)."""
from actorbroker.actors import starting
from actorbroker.actors.starting import Starting


def test_before_any_measure_the_guess_and_the_floor_bound_it():
    s = Starting()
    allowed = int(starting.WITHIN * 30.0 / starting.INTERVAL_GUESS_S)   # a 30 s deadline
    for i in range(allowed - 1):
        s.begin(i, i, 0.01)
        assert not s.full(30_000)
    s.begin("last", 0, 0.01)
    assert s.full(30_000)
    short = Starting()
    for i in range(starting.LIMIT_FLOOR - 1):
        short.begin(i, i, 0.0)
    assert not short.full(1)   # a tiny deadline still lets the floor start
    short.begin("x", 0, 0.0)
    assert short.full(1)


def test_a_fast_burst_raises_the_limit_and_slow_forks_lower_it(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(starting.time, "monotonic", lambda: clock[0])
    s = Starting()
    for i in range(40):
        s.begin(i, i, 0.001)
    for i in range(39):   # ending 10 ms apart while others still start: the pace is learned
        clock[0] += 0.01
        s.done(i, i)
    assert s.pace() < 0.05
    assert not s.full(30_000)   # 1 starting, and far more may now
    slow = Starting()
    for i in range(20):
        slow.begin(i, i, 2.0)   # each fork held the topic 2 s
    assert slow.pace() > 1.5 and slow.full(30_000)


def test_a_stale_token_or_a_forgotten_start_changes_nothing():
    s = Starting()
    s.begin("a", 1, 0.0)
    s.done("a", 2)            # an earlier start's readiness
    assert len(s) == 1
    s.forget("a")
    assert len(s) == 0
    s.done("a", 1)            # too late: nothing to end
    assert len(s) == 0
