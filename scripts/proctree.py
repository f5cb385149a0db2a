"""Process-tree facts from /proc (Linux): descendants, liveness, memory.

Used by the benchmark (memory of the broker's tree) and the scenario runner (is it all gone).
"""
import os


def _stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    rest = data[data.rindex(")") + 2:].split()
    return rest  # rest[0] is the state, rest[1] the ppid


def children_map():
    kids = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid = int(_stat(int(name))[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(name))
    return kids


def descendants(root):
    """`root` and every process below it, alive now (zombies excluded)."""
    kids = children_map()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if alive(pid):
            found.append(pid)
        todo.extend(kids.get(pid, []))
    return found


def name(pid):
    """What the process calls itself (/proc/PID/comm: ab-root, ab-shard, ...); None if gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def cpu_ticks(pid):
    """CPU time (user + system, in clock ticks) of a live process; None if there is none."""
    if pid is None:
        return None
    try:
        rest = _stat(pid)
        return None if rest[0] in ("Z", "X") else int(rest[11]) + int(rest[12])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid):
    try:
        return _stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def pss_kb(pids):
    """Proportional set size of these processes, summed, in KiB (shared pages split fairly)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total
