"""CPU per message of every process of one 1 -> K run: each broker process (by its name, ab-shard,
ab-topic, ...) and the client processes, in microseconds per published message.

    python -m actorbroker.scripts.bench_cpu N [K] [non_reliable|reliable]

Less noisy than throughput on a shared machine: it counts what each process spent (utime + stime
from /proc for the broker's processes, wait4 for the clients, whose start-up is measured once
and subtracted), not how fast the run went. The broker is started here and stopped by PID.
"""
import collections
import os
import subprocess
import sys
import tempfile
import time

from actorbroker.scripts.local_broker import LocalBroker

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid):
    """(name, CPU seconds) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            name = f.read().strip()
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return name, (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return None


def _worker(role, *options):
    return subprocess.Popen([sys.executable, "-m", "actorbroker.scripts.bench_worker", role,
                             *map(str, options)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)


def _reap(proc):
    """CPU seconds of a finished worker (wait4) and its output."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = status
    out = proc.stdout.read().decode()
    proc.stdout.close()
    return usage.ru_utime + usage.ru_stime, out


def measure(n, k=1, dispatch="non_reliable"):
    folder = tempfile.mkdtemp(prefix="ab-cpu-")
    broker = LocalBroker(folder, "--max-backlog", "1000000")
    try:
        url = f"127.0.0.1:{broker.port}"
        startup, _ = _reap(_worker("produce", "--url", url, "--topic", "/cpu/warm", "--n", 1))
        ready = [os.path.join(folder, f"ready-{i}") for i in range(k)]
        ack = ["--ack"] if dispatch == "reliable" else []
        consumers = [_worker("consume", "--url", url, "--topic", "/cpu/t", "--subscription", f"s{i}",
                             "--dispatch", dispatch, "--n", n, "--ready", ready[i], "--idle", 3, *ack)
                     for i in range(k)]
        deadline = time.monotonic() + 60
        while not all(os.path.exists(r) for r in ready):
            if time.monotonic() > deadline:
                raise RuntimeError("the consumers did not start")
            time.sleep(0.05)
        before = {pid: _stat(pid) for pid in broker.processes()}
        producer = _worker("produce", "--url", url, "--topic", "/cpu/t", "--dispatch", dispatch, "--n", n)
        produced, _ = _reap(producer)
        consumed = [_reap(c)[0] for c in consumers]
        per_name = collections.defaultdict(float)
        for pid in broker.processes():
            now, then = _stat(pid), before.get(pid)
            if now is not None:
                per_name[now[0]] += now[1] - (then[1] if then else 0.0)
    finally:
        broker.stop()
    us = 1e6 / n
    rows = [("producer client", (produced - startup) * us)]
    rows += [(f"consumer client {i}", (c - startup) * us) for i, c in enumerate(consumed)]
    rows += sorted(((name, cpu * us) for name, cpu in per_name.items()), key=lambda r: -r[1])
    return rows, sum(cpu for _, cpu in per_name.items()) * us


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    n = int(argv[0]) if argv else 200_000
    k = int(argv[1]) if len(argv) > 1 else 1
    dispatch = argv[2] if len(argv) > 2 else "non_reliable"
    rows, broker_total = measure(n, k, dispatch)
    print(f"N={n} K={k} {dispatch}: CPU per published message")
    for name, value in rows:
        if value >= 0.05:
            print(f"  {name:18s} {value:6.2f} us")
    print(f"  {'broker in all':18s} {broker_total:6.2f} us")


if __name__ == "__main__":
    main()
