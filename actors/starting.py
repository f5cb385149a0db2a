"""Starting: the children an actor has created and not yet heard ready from, and how many may be
starting at once (the TopicActor's subscriptions).

Each subscription is two processes, forked by its topic one after the other. A burst of
subscribes to new subscriptions used to wait for its turn until the request deadline and get
INTERNAL, with what it opened closed again. The topic refuses (OVERLOADED, at once) one more than
can start within a share of that deadline at the pace measured here: the interval between two
starts that end back to back, and at least the time the forks themselves take in the parent
(which holds up everything else it does). (Topics are one process each, forked by the root; a
burst of 300 new topics took 32 s on a loaded machine, all answered: the root has no such limit.)
"""
import time

WITHIN = 0.25            # of the request deadline: what the ones starting may take, in all
INTERVAL_GUESS_S = 0.25  # before a burst was measured (4 a second; 10-30 on 2 idle cores)
LIMIT_FLOOR = 8


class Starting:
    def __init__(self):
        self.pending = {}        # key -> a token of the start (to tell it from an earlier one's)
        self.interval = INTERVAL_GUESS_S   # seconds between starts ending back to back
        self.fork_time = 0.0     # seconds the createActor calls of one start take in the parent
        self.last_done = None    # when the last one ended (time.monotonic())

    def __len__(self):
        return len(self.pending)

    def begin(self, key, token, forked_s):
        """A start of `key` whose createActor calls took `forked_s`."""
        self.pending[key] = token
        self.fork_time = 0.8 * self.fork_time + 0.2 * forked_s

    def done(self, key, token=None):
        """`key` is ready (token None: whichever start of it)."""
        if key not in self.pending or (token is not None and self.pending[key] != token):
            return
        del self.pending[key]
        now = time.monotonic()
        if self.pending and self.last_done is not None:   # in a burst: that is the pace
            self.interval = 0.8 * self.interval + 0.2 * (now - self.last_done)
        self.last_done = now

    def forget(self, key):
        """`key` ended before it was ready (it died, or was dropped)."""
        self.pending.pop(key, None)

    def pace(self):
        return max(self.interval, self.fork_time, 1e-3)

    def full(self, deadline_ms):
        """Whether one more would not start within WITHIN of a request deadline of `deadline_ms`."""
        return len(self.pending) >= max(LIMIT_FLOOR, int(WITHIN * deadline_ms / 1000.0 / self.pace()))

    def refusal(self, what):
        return (f"{len(self.pending)} {what} are starting (about {1 / self.pace():.1f} a second here); "
                "send it again in a few seconds")
