"""Process-level settings of an actor process: its name, and dying with its parent.

No logging here: the admin process imports this before it forks, and a logger created before
Thespian re-initialises logging in a child would write nowhere (see actors/system.py).
"""
import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def name_process(name):
    """Name this process (what `ps -o comm` and /proc/PID/comm show, 15 bytes at most), so that an
    operator or a test can tell the broker's processes apart: ab-root, ab-listener, ab-conn,
    ab-shard, ab-topic, ab-sub, ab-disp, ab-log."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def die_with_parent():
    """Ask the kernel for SIGTERM when our parent process dies.

    Thespian turns SIGTERM into an ActorExitRequest, so an actor whose parent was SIGKILLed
    exits cleanly instead of outliving it (and even ActorSystem.shutdown()). A parent that died
    before this call (we were forked just then) has left us to init: exit as well.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
