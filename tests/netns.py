"""Three hosts on one machine: network namespaces the test makes itself, and removes.

Each node namespace has one address of its own (10.S.0.N on its loopback) and a veth pair to
each other node (a full mesh, so that one link can be cut with `ip link set ... down` while the
others stay up), plus a veth pair to the test's own namespace, through which the test's clients
reach every node. No namespace forwards packets: a cut link is a cut path. S is chosen per run,
and every name carries a tag of the run, so that two suites at once do not collide.
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


class Hosts:
    """Namespaces a, b, c with addresses; `address(n)`, `prefix(n)` for `ip netns exec`."""

    def __init__(self):
        self.tag = f"{os.getpid() % 100000:05d}{random.randrange(36 ** 2):02x}"[-6:]
        self.subnet = random.randrange(64, 250)
        self.namespaces = {n: f"ab{self.tag}{n}" for n in NODES}
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
