"""Three hosts on one machine: network namespaces made by whoever runs them (the cluster tests,
`actorbroker bench --scenarios cluster`), and removed by it. Needs root and `ip` (iproute2).

Each node namespace has one address of its own (10.S.0.N on its loopback) and a veth pair to
each other node (a full mesh, so that one link can be cut with `ip link set ... down` while the
others stay up), plus a veth pair to the caller's own namespace (address 10.S.255.254 there),
through which the caller's clients reach every node. No namespace forwards packets: a cut link
is a cut path. S is chosen per run among the 10.S.0.0/16 that no address or route of the
caller's namespace uses, and every name carries a tag of the run (checked unused), so that a
test suite and a bench at once do not collide. Nothing outside these namespaces is addressed.
"""
import os
import random
import shutil
import subprocess

NODES = ("a", "b", "c")


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def unavailable():
    """Why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"abprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _free_subnet():
    """S in 64..249 such that no address or route here is in 10.S.0.0/16."""
    used = _ip("-o", "addr").stdout + _ip("route").stdout
    free = [s for s in range(64, 250) if f" 10.{s}." not in used and f"\n10.{s}." not in "\n" + used]
    if not free:
        raise RuntimeError("no free 10.S.0.0/16 for the namespaces")
    return random.choice(free)


class Hosts:
    """Namespaces a, b, c with addresses; `address(n)`, `prefix(n)` for `ip netns exec`."""

    def __init__(self):
        existing = set(_ip("netns", "list").stdout.split())
        while True:
            self.tag = f"{os.getpid() % 1000:03d}{random.randrange(16 ** 3):03x}"
            self.namespaces = {n: f"ab{self.tag}{n}" for n in NODES}
            if not existing & set(self.namespaces.values()):
                break
        self.subnet = _free_subnet()
        self.host_links = []
        try:
            self._build()
        except BaseException:
            self.remove()
            raise

    def address(self, node):
        return f"10.{self.subnet}.0.{NODES.index(node) + 1}"

    @property
    def own_address(self):
        return f"10.{self.subnet}.255.254"

    def prefix(self, node):
        return ("ip", "netns", "exec", self.namespaces[node])

    def link_name(self, here, there):
        return f"v{self.tag}{here}{there}"

    def _build(self):
        for node, ns in self.namespaces.items():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(node)}/32", "dev", "lo")
        for i, here in enumerate(NODES):
            for there in NODES[i + 1:]:
                self._pair(here, there)
            self._to_test(here)

    def _pair(self, here, there):
        a, b = self.link_name(here, there), self.link_name(there, here)
        _ip("link", "add", a, "netns", self.namespaces[here], "type", "veth",
            "peer", "name", b, "netns", self.namespaces[there])
        for node, dev, peer in ((here, a, there), (there, b, here)):
            ns = self.namespaces[node]
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "route", "add", f"{self.address(peer)}/32", "dev", dev, "src", self.address(node))

    def _to_test(self, node):
        """A veth pair between the test's namespace and the node's."""
        outer, inner = f"h{self.tag}{node}", f"g{self.tag}{node}"
        ns = self.namespaces[node]
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
        self.host_links.append(outer)
        _ip("link", "set", outer, "up")
        _ip("addr", "add", f"{self.own_address}/32", "dev", outer)
        _ip("route", "add", f"{self.address(node)}/32", "dev", outer, "src", self.own_address)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "route", "add", f"{self.own_address}/32", "dev", inner, "src", self.address(node))

    def cut(self, here, there):
        """Take the link between two nodes down (both ends)."""
        _ip("-n", self.namespaces[here], "link", "set", self.link_name(here, there), "down")
        _ip("-n", self.namespaces[there], "link", "set", self.link_name(there, here), "down")

    def mend(self, here, there):
        for node, dev, peer in ((here, self.link_name(here, there), there),
                                (there, self.link_name(there, here), here)):
            ns = self.namespaces[node]
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "route", "replace", f"{self.address(peer)}/32", "dev", dev, "src", self.address(node))

    def remove(self):
        """Delete the namespaces (their veths go with them) and our ends of the test links."""
        for link in self.host_links:
            _ip("link", "del", link, check=False)
        for ns in self.namespaces.values():
            _ip("netns", "del", ns, check=False)

    def leftovers(self):
        """Names of ours that still exist (for the test's cleanup assertion)."""
        names = set(_ip("netns", "list").stdout.split())
        links = _ip("-o", "link").stdout
        return [ns for ns in self.namespaces.values() if ns in names] + \
            [link for link in self.host_links if f" {link}@" in links or f" {link}:" in links]
