"""Open files of the broker's actor processes do not grow with the number of topics.

Thespian forks each actor's children with multiprocessing, which keeps two pipe fds per child in
the parent; every child forked later inherited those of all its elder siblings. Each topic's
processes held the root's pipes of every earlier topic: open fds grew with the square of the
topic count (an acceptance probe: 300 reliable topics, 405,000 open fds; ~700 would reach the
machine's file-max)."""
import os

from actorbroker.transport.client import Client
from tests.util import processes_of_kind, wait_for


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def newest_topic_process(b, known):
    return wait_for(lambda: [p for p in processes_of_kind(b, "ab-topic") if p not in known],
                    lambda found: len(found) == 1)[0]


def test_a_new_topics_processes_hold_no_fds_of_the_earlier_topics(start_broker):
    b = start_broker()
    with Client(*b.address) as c:
        for i in range(3):
            c.producer(f"/fds/warm{i}", dispatch="reliable").close()
        known = set(processes_of_kind(b, "ab-topic"))
        c.producer("/fds/first", dispatch="reliable").close()
        first = newest_topic_process(b, known)
        for i in range(30):
            c.producer(f"/fds/t{i}", dispatch="reliable").close()
        known = set(processes_of_kind(b, "ab-topic"))
        c.producer("/fds/last", dispatch="reliable").close()
        last = newest_topic_process(b, known)
        # 31 topics later: before, ~2 more fds per topic in between (62 here)
        assert open_fds(last) <= open_fds(first) + 8, (open_fds(first), open_fds(last))
