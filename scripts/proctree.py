"""Process-tree facts from /proc (Linux): descendants, listening sockets, memory.

Used by the tests (no process left behind, every socket on loopback) and by the benchmark.
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


def alive(pid):
    try:
        return _stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def socket_inodes(pid):
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def _hex_addr(text, v6):
    addr, port = text.split(":")
    if not v6:
        raw = bytes.fromhex(addr)[::-1]
        host = ".".join(str(b) for b in raw)
    else:
        raw = bytes.fromhex(addr)
        words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
        import ipaddress
        host = str(ipaddress.IPv6Address(b"".join(words)))
    return host, int(port, 16)


def tcp_sockets(state):
    """(inode, local (host, port), remote (host, port)) of the machine's TCP sockets in `state`
    ("0A" LISTEN, "01" ESTABLISHED), from /proc/net/tcp and tcp6."""
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == state:
                yield int(parts[9]), _hex_addr(parts[1], v6), _hex_addr(parts[2], v6)


def listening_sockets(pids):
    """[(pid, host, port)] of the TCP sockets in LISTEN state that these processes hold."""
    by_inode = {}
    for pid in pids:
        for inode in socket_inodes(pid):
            by_inode.setdefault(inode, pid)
    return [(by_inode[inode], *local) for inode, local, _ in tcp_sockets("0A") if inode in by_inode]


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
