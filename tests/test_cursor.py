from actorbroker.actors.cursor import Cursor


def test_floor_advances_over_contiguous_acks():
    c = Cursor(10)
    assert c.ack(12) and c.floor == 10 and c.state()["acked"] == [12]
    assert c.ack(10) and c.floor == 11
    assert c.ack(11) and c.floor == 13 and c.state() == {"floor": 13, "acked": []}
    assert not c.ack(12) and not c.ack(3)


def test_state_round_trips_and_skip_to():
    c = Cursor(0)
    for o in (0, 2, 5):
        c.ack(o)
    again = Cursor(**c.state())
    assert again.is_acked(0) and again.is_acked(2) and not again.is_acked(1)
    again.skip_to(3)
    assert again.floor == 3 and again.is_acked(5) and not again.is_acked(4)
