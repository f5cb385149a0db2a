"""Small helpers shared by the bench's processes (scripts/bench*.py): payload stamps, JSON result
lines, ready files, percentiles, "host:port" parsing and PR_SET_PDEATHSIG.

Nothing here imports the client library, so the peer workers (NATS, Redis) and the connection
opener do not depend on it.
"""
import ctypes
import gc
import json
import os
import signal
import struct
import sys
import threading
import time

STAMP = struct.Struct(">QQ")   # send time (time.time_ns) and sequence number, at a payload's start
_PR_SET_PDEATHSIG = 1
_EMIT_LOCK = threading.Lock()


def emit(obj):
    """One JSON line on stdout; whole lines even when a client's reader thread emits too."""
    with _EMIT_LOCK:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def settle():
    """Set-up done: freeze the heap built so far (imports, connection) out of the cyclic GC, so
    that a full collection of it (24-38 ms measured in a consumer process of the latency
    scenario on this loaded machine) does not land in a measurement. A latency-minded Python
    application does the same after its start-up; the peers' workers do it too."""
    gc.collect()
    gc.freeze()


def touch(path):
    """Write the ready file atomically (the bench polls for it), once settled (see settle)."""
    settle()
    if path:
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(path + ".tmp", path)


def make_payload(seq, size):
    head = STAMP.pack(time.time_ns(), seq)
    return head + bytes(max(0, size - len(head))) if size >= len(head) else head[:max(size, 8)]


def percentiles(values_us):
    if not values_us:
        return {}
    v = sorted(values_us)

    def q(p):
        return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
    return {"p50_us": q(50), "p99_us": q(99), "p999_us": q(99.9), "max_us": v[-1],
            "mean_us": sum(v) / len(v), "count": len(v)}


def term_with_parent(parent_pid=None):
    """In a child of the bench, before exec: ask the kernel for SIGTERM when the bench dies
    (PR_SET_PDEATHSIG; it watches the thread that forked, so children are started from the
    bench's main thread). If the bench (`parent_pid`, taken before the fork) died before this
    call, exit at once."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != (parent_pid or os.getppid()) or os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
