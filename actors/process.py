"""Process-level settings of an actor process: its name, and dying with its parent.

No logging here: the admin process imports this before it forks, and a logger created before
Thespian re-initialises logging in a child would write nowhere (see actors/system.py).
"""
import ctypes
import os
import signal
import tempfile

# Thespian logs from its SIGTERM handler (thesplog -> tempfile.gettempdir()). The first call in a
# process computes the directory, under a lock, by writing test files: an actor process forked
# just before its parent was killed got its SIGTERM (die_with_parent) in the middle of that, the
# handler waited for the lock its own thread held, and the process hung for good, an orphan
# (found idle two hours later). Computed here, in the admin process before it forks any actor,
# so every actor process inherits it and never takes that lock.
tempfile.gettempdir()

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


def tree_memory(root_pid):
    """(processes, PSS bytes) of `root_pid` and every process below it on this host, from /proc.

    PSS splits the pages that forked actors share, so the sum is what the tree really costs."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue   # ended meanwhile
    count, pss_kb, todo = 0, 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                pss_kb += next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
            count += 1
        except OSError:
            continue
    return count, pss_kb * 1024
