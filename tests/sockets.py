"""Socket facts of processes from /proc (Linux), for the tests: which sockets a process holds,
which TCP sockets listen or are established and where."""
import ipaddress
import os


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


def unix_listening_names(pids):
    """Names of the abstract Unix sockets in LISTEN state that these processes hold."""
    inodes = set()
    for pid in pids:
        inodes |= socket_inodes(pid)
    names = []
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            parts = line.split()   # Num RefCount Protocol Flags Type St Inode [Path]
            listening = int(parts[3], 16) & 0x10000   # __SO_ACCEPTCON
            if len(parts) > 7 and listening and int(parts[6]) in inodes and parts[7].startswith("@"):
                names.append(parts[7][1:])
    return names
