"""Process-level settings of an actor process: its name, and dying with its parent; stopping the
actor system from outside it.

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


# multiprocessing keeps, in a parent, two pipe fds per child (its sentinel, to see it exit), and a
# child forked next inherits them all: those of every sibling forked before it, useless there. A
# topic's four actor processes each held the root's pipes of every earlier topic: open fds grew
# with the square of the topic count (300 reliable topics: 405,000). Thespian forks an actor's
# children with multiprocessing (and takes them out of its list of children: its own _child_procs
# keeps them); the child closes, first thing, the fds its parent held for the others then.
_actor = None            # (pid, the actor) of this process, once it is an actor's
_siblings_fds = ()       # (parent pid, fds) computed just before a fork


def close_siblings_fds_in_children(actor):
    """Children this actor's process forks from now on close its pipes to its other children."""
    global _actor
    _actor = (os.getpid(), actor)


def _before_fork():
    global _siblings_fds
    _siblings_fds = ()
    if _actor is None or _actor[0] != os.getpid():
        return
    fds = []
    for child in getattr(getattr(_actor[1], "_myRef", None), "_child_procs", None) or ():
        finalizer = getattr(getattr(child.childProc, "_popen", None), "finalizer", None)
        if finalizer is not None and finalizer.still_active():   # its fds still open (not reused)
            fds += [fd for fd in finalizer._args if isinstance(fd, int) and fd > 2]
    _siblings_fds = (os.getpid(), fds)


def _after_fork_in_child():
    global _actor
    if _siblings_fds and _siblings_fds[0] == os.getppid():
        for fd in _siblings_fds[1]:
            try:
                os.close(fd)
            except OSError:
                pass
    _actor = None   # the parent's actor: not this process's


if hasattr(os, "register_at_fork"):   # once per interpreter: children inherit the hooks
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


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


def stop_actor_system(admin_port, host, secret):
    """Thespian's shutdown of the actor system whose admin listens on host:admin_port, from this
    process (not an actor's: an actor may not do it); nothing if no admin answers there.

    Never starts an admin: `ActorSystem()` starts one when it finds none on the port, so a stop
    racing with another (serve's startup guard and the root actor both seeing serve die) found
    the admin gone the moment after its check and started a new one, which then ran for good."""
    from thespian.actors import InvalidActorAddress
    from thespian.system.multiprocCommon import multiprocessCommon

    def refuse_to_start(self, admin_address, *args, **kwargs):
        raise InvalidActorAddress(admin_address, "no admin there (a stop starts none)")

    multiprocessCommon._startAdmin = refuse_to_start   # in this process only
    from actorbroker.actors.system import connect_system
    try:
        connect_system(admin_port, host, secret).shutdown()
    except InvalidActorAddress:
        pass   # already gone


def stop_actor_system_process(admin_port, host, secret):
    """stop_actor_system from a new process (for an actor: the root, once serve is gone); the
    secret goes through its stdin."""
    import subprocess
    import sys
    stopper = subprocess.Popen(
        [sys.executable, "-m", "actorbroker.actors.process", "--stop-system", str(admin_port), host],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    stopper.stdin.write(secret)   # a few bytes: fits the pipe, never blocks
    stopper.stdin.close()


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["--stop-system"] and len(sys.argv) == 4:
        stop_actor_system(int(sys.argv[2]), sys.argv[3], sys.stdin.buffer.read())
