"""The `cluster` scenario of `actorbroker bench` (issue 9): three nodes a, b, c, each a real
`actorbroker serve` in a network namespace of its own (scripts/netns.py, scripts/local_cluster.py),
made by the bench and removed by it.

1. Throughput: non_reliable 1 -> 1 with the producer process in a's namespace connected to a, the
   topic placed on b (a name that `lookup` places there) and the consumer process in c's namespace
   connected to c; in the same runs, alternately, the same 1 -> 1 on a single `serve` (no cluster
   options, same broker options) in a's namespace, and on one node of the cluster (topic, producer
   and consumer all on a). Row `cross-node / single node`: each run's ratio.
2. --kills times: a non_reliable topic placed on b, a consumer on c and a producer on a sending
   every 2 ms, both of which open again if they are closed (scripts/bench_cluster_worker.py; the
   broker re-attaches them, so they see only a gap); once messages flow, SIGKILL of b's whole
   process tree (by PID); declared = the kill until both a and c have written their `member b
   lost` log record (their broker.log, ms resolution); seen = the kill until both report b `lost`
   in the `cluster` op (polled from the bench, every POLL_S plus the requests' time: the figure is
   late by up to one poll round, reported as poll_ms); re-homed = the kill until the consumer receives the
   first message that was sent after all of b's processes were gone (one sent while the SIGKILLs
   were landing may still have gone through b); then b is started again
   (same --node, same data directory) and the bench waits until every node sees every node live.
3. With `serve --shared-data DIR` (all three nodes given the same DIR): a reliable topic, a
   producer process connected to a node that does not own it (the next node when its connection is
   lost) sending all the time and counting every message whose receipt arrived; --kills times
   SIGKILL of the topic's owner then its return; at the end the topic is read from its earliest
   message and lost = receipted - found (issue 9: must be 0). Skipped, with a note, when `serve`
   has no --shared-data.

Without root or `ip netns` the scenario is skipped with a note. Every namespace, link and process
it makes is removed by it, by PID, also when it fails or is interrupted (SIGINT, SIGTERM). Only
the namespaces' addresses are addressed.
"""
import contextlib
import datetime
import os
import re
import signal
import subprocess
import sys
import time

from actorbroker.scripts import netns
from actorbroker.scripts.local_broker import ROOT, LocalBroker
from actorbroker.scripts.local_cluster import LocalCluster

CLUSTER_WORKER = "actorbroker.scripts.bench_cluster_worker"
# serve's text log line of a loss (actors/cluster_root.py, _member_lost): time, pid of the record
LOST_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (\d+) \w+ \S+ member (\S+) lost: ")
POLL_S = 0.01                  # between two rounds of `cluster` requests to a and c
OBSERVERS = ("a", "c")
KILLED = "b"


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM raises KeyboardInterrupt while the scenario runs, so that its `finally` blocks
    remove what it made (SIGINT does that by itself)."""
    def interrupt(*_):
        raise KeyboardInterrupt("SIGTERM")
    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def uninterrupted():
    """Clean-up is not cut short by a second SIGINT or SIGTERM."""
    before = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def serve_has_shared_data():
    done = subprocess.run([sys.executable, "-m", "actorbroker.scripts.cli", "serve", "--help"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    return "--shared-data" in done.stdout


def run(bench, big_backlog):
    """Entry point (Bench.sc_cluster)."""
    from actorbroker.scripts.bench import note
    why = netns.unavailable()
    if why:
        bench.skipped.append(f"cluster: needs network namespaces: {why}")
        note(bench.skipped[-1])
        return
    kills = bench.args.kills if bench.args.kills is not None else (2 if bench.args.quick else 10)
    if bench.args.url:
        note(f"cluster: starts its own three nodes; --url {bench.args.url} is not used here")
    options = ("--fsync", "group", "--max-backlog", str(big_backlog))
    details = bench.details.setdefault("cluster", {"kills": kills})
    with terminate_as_interrupt():
        hosts = None
        try:
            hosts = netns.Hosts()
            details["namespaces"] = dict(hosts.namespaces)
            details["addresses"] = {n: hosts.address(n) for n in netns.NODES}
            note(f"cluster: namespaces {', '.join(hosts.namespaces.values())}, nodes on "
                 f"{', '.join(hosts.address(n) for n in netns.NODES)}")
            ClusterScenario(bench, hosts, options, kills, details).run()
        finally:
            with uninterrupted():
                if hosts is not None:
                    hosts.remove()
                    left = hosts.leftovers()
                    if left:
                        bench.fail_note(f"cluster: namespaces or links left behind: {left}")


class ClusterScenario:
    def __init__(self, bench, hosts, options, kills, details):
        from actorbroker.scripts import bench as bench_module
        self.bench, self.hosts, self.options, self.kills, self.details = bench, hosts, options, kills, details
        self.b = bench_module            # Worker, note, pct, wait_event, summary

    def run(self):
        cluster = LocalCluster(self.bench.tmp / "cluster", *self.options, hosts=self.hosts)
        try:
            self.b.note("cluster: starting nodes a (leader), b, c")
            cluster.start_all()
            self.throughput(cluster)
            if self.kills:
                self.kill_cycles(cluster)
        finally:
            with uninterrupted():
                self.stop(cluster, "cluster")
        if not self.kills:
            self.b.note("cluster: --kills 0: throughput only")
        elif serve_has_shared_data():
            shared = LocalCluster(self.bench.tmp / "cluster-shared", *self.options, "--shared-data",
                                  str(self.bench.tmp / "cluster-shared" / "shared"), hosts=self.hosts)
            try:
                self.b.note("cluster: starting nodes a, b, c with --shared-data")
                shared.start_all()
                self.shared_data_cycles(shared)
            finally:
                with uninterrupted():
                    self.stop(shared, "cluster --shared-data")
        else:
            self.bench.skipped.append("cluster: shared-data cycles skipped: serve has no --shared-data")
            self.b.note(self.bench.skipped[-1])

    def stop(self, cluster, what):
        left = cluster.stop_all()
        if left:
            self.bench.fail_note(f"{what}: broker processes left after stop: {left}")

    # --- 1. throughput ---------------------------------------------------------------------------

    def one_to_one(self, prod_url, cons_url, topic, prod_node, cons_node):
        n, payload = self.bench.n, self.bench.payload
        timeout = max(60.0, n / 500)
        cons = self.b.Worker(self.bench, "consume", "--url", cons_url, "--topic", topic, "--subscription", "tp",
                             "--type", "exclusive", "--dispatch", "non_reliable", "--n", n, "--payload", payload,
                             "--deadline", timeout, "--idle", 3, prefix=self.hosts.prefix(cons_node))
        try:
            cons.wait_ready(60)
            prod = self.b.Worker(self.bench, "produce", "--url", prod_url, "--topic", topic, "--dispatch",
                                 "non_reliable", "--n", n, "--payload", payload, "--deadline", timeout,
                                 prefix=self.hosts.prefix(prod_node))
            pres = prod.result(timeout + 10)
            cres = cons.result(timeout + 10)
        finally:
            cons.stop()
        if cres["received"] < n:
            self.details.setdefault("losses", []).append({"topic": topic, "n": n, "producer": pres,
                                                          "consumer": cres})
        return {"msg_s": cres["msg_s"], "lost": n - cres["received"], "producer": pres["msg_s"]}

    def throughput(self, cluster):
        single = LocalBroker(self.bench.tmp / "cluster-single", "--host", self.hosts.address("a"), *self.options,
                             prefix=self.hosts.prefix("a"))
        single_url = "%s:%d" % single.address
        try:
            def once():
                variants = [("single", lambda: self.one_to_one(single_url, single_url, self.bench.topic("cl1"),
                                                                "a", "a")),
                            ("one_node", lambda: self.one_to_one(cluster.url("a"), cluster.url("a"),
                                                                  cluster.topic_on("a", prefix="/bench"), "a", "a")),
                            ("cross", lambda: self.one_to_one(cluster.url("a"), cluster.url("c"),
                                                               cluster.topic_on("b", prefix="/bench"), "a", "c"))]
                once.count = getattr(once, "count", 0) + 1
                if once.count % 2 == 0:        # alternate the order: the machine's drift falls on all alike
                    variants.reverse()
                r = {name: fn() for name, fn in variants}
                return {"single_msg_s": r["single"]["msg_s"], "one_node_msg_s": r["one_node"]["msg_s"],
                        "cross_msg_s": r["cross"]["msg_s"],
                        "ratio": r["cross"]["msg_s"] / r["single"]["msg_s"] if r["single"]["msg_s"] else None,
                        "lost": max(v["lost"] for v in r.values()),
                        "producers": {k: v["producer"] for k, v in r.items()},
                        "lost_each": {k: v["lost"] for k, v in r.items()}}
            rs = self.bench.repeat("cluster 1->1 single / one node / cross-node", once)
        finally:
            with uninterrupted():
                left = single.stop()
                if left:
                    self.bench.fail_note(f"cluster single-node broker: processes left after stop: {left}")
        n = self.bench.n
        for key, variant in (("single", "1->1 single node (serve alone, in a's namespace)"),
                             ("one_node", "1->1 on one cluster node (producer, topic, consumer on a)"),
                             ("cross", "1->1 cross-node (producer on a, topic on b, consumer on c)")):
            self.bench.add("cluster", variant, "delivered", "msg/s", [r[f"{key}_msg_s"] for r in rs],
                           lost=max([r["lost_each"][key] for r in rs], default=None),
                           producer=self.b.summary([r["producers"][key] for r in rs])["median"], messages=n)
        self.bench.add("cluster", "cross-node / single node (each run)", "ratio (target >= 0.5)", "x",
                       [r["ratio"] for r in rs])
        self.details["throughput"] = rs

    # --- 2. kill -9 of b: detection and re-homing --------------------------------------------------

    def kill_cycles(self, cluster):
        detect, declared, rehome, polls = [], [], [], []
        cycles = self.details.setdefault("kill_cycles", [])
        observers = {}
        try:
            for i in range(self.kills):
                cycle = {"kill": i + 1}
                cycles.append(cycle)
                try:
                    self.kill_once(cluster, observers, cycle)
                except Exception as exc:   # noqa: BLE001 - reported; b is started again below
                    cycle["error"] = f"{type(exc).__name__}: {exc}"
                    self.bench.fail_note(f"cluster kill {i + 1}: {cycle['error']}")
                finally:
                    if KILLED not in cluster.nodes:
                        cluster.start(KILLED)
                    t0 = time.monotonic()
                    cluster.wait_all_live(90)
                    cycle["back_s"] = round(time.monotonic() - t0, 2)
                if cycle.get("detect_s") is not None:
                    detect.append(cycle["detect_s"])
                    polls.append(cycle["poll_ms"])
                if cycle.get("declared_s") is not None:
                    declared.append(cycle["declared_s"])
                if cycle.get("rehome_s") is not None:
                    rehome.append(cycle["rehome_s"])
                self.b.note(f"cluster kill {i + 1}/{self.kills}: declared lost {self.b._fmt(cycle.get('declared_s'))} s "
                            f"after the kill (logs: a {self.b._fmt(cycle.get('a_declared_s'))}, c "
                            f"{self.b._fmt(cycle.get('c_declared_s'))}), seen lost "
                            f"{self.b._fmt(cycle.get('detect_s'))} s "
                            f"(a {self.b._fmt(cycle.get('a_s'))}, c {self.b._fmt(cycle.get('c_s'))}; poll "
                            f"{self.b._fmt(cycle.get('poll_ms'))} ms), re-homed on {cycle.get('new_owner')} and "
                            f"delivering {self.b._fmt(cycle.get('rehome_s'))} s after the kill (consumer: "
                            f"{', '.join(e.get('event', '?') + ('/' + e['reason'] if 'reason' in e else '') for e in cycle.get('consumer_events', []))}); "
                            f"b restarted, seen live by all {cycle['back_s']} s after its serve was ready")
        finally:
            for c in observers.values():
                try:
                    c.close(timeout=2)
                except Exception:   # noqa: BLE001
                    pass
        poll_ms = round(self.b.pct(polls, 50), 1) if polls else None
        for q in (50, 99):
            self.bench.add("cluster", "member loss declared (kill -9 of b, by a and c, from their logs; target p99 <= 3 s)",
                           f"p{q}", "s", [self.b.pct(declared, q)] if declared else [], samples=len(declared))
        for q in (50, 99):
            self.bench.add("cluster", "member loss seen (kill -9 of b, `cluster` op of a and c polled)",
                           f"p{q}", "s", [self.b.pct(detect, q)] if detect else [], samples=len(detect),
                           poll_ms=poll_ms)
        for q in (50, 99):
            self.bench.add("cluster", "non_reliable topic of b re-homed, delivering again after the kill "
                                      "(target p99 <= 5 s)",
                           f"p{q}", "s", [self.b.pct(rehome, q)] if rehome else [], samples=len(rehome))

    def kill_once(self, cluster, observers, cycle):
        topic = cluster.topic_on(KILLED, prefix="/bench")
        cycle["topic"] = topic
        cons = self.b.Worker(self.bench, "keep-consuming", "--url", cluster.url("c"), "--topic", topic,
                             "--payload", self.bench.payload, module=CLUSTER_WORKER, prefix=self.hosts.prefix("c"))
        prod = None
        try:
            cons.wait_ready(60)
            prod = self.b.Worker(self.bench, "keep-producing", "--url", cluster.url("a"), "--topic", topic,
                                 "--payload", self.bench.payload, "--interval-ms", 2, module=CLUSTER_WORKER,
                                 prefix=self.hosts.prefix("a"))
            prod.wait_ready(60)
            if self.b.wait_event(cons, "got", 30) is None:
                raise RuntimeError(f"nothing delivered on {topic} before the kill: {cons.stderr_tail()}")
            for node in OBSERVERS:   # the bench's own connections, opened before the kill
                if node not in observers or not observers[node].connected:
                    observers[node] = cluster.client(node, name=f"bench-cluster-watch-{node}")
            killed_ns, killed, gone_ns, left = cluster.kill(KILLED)
            cycle["all_gone_s"] = round((gone_ns - killed_ns) / 1e9, 4)
            if left:
                self.bench.fail_note(f"cluster kill {cycle['kill']}: b's processes alive after SIGKILL: {left}")
            seen, rounds = self.poll_lost(cluster, observers, killed)
            cycle.update({f"{n}_s": round(t - killed, 4) for n, t in seen.items()})
            cycle["poll_ms"] = round((rounds[-1] - rounds[0]) / max(1, len(rounds) - 1) * 1000, 1) \
                if len(rounds) > 1 else None
            if len(seen) < len(OBSERVERS):
                raise RuntimeError(f"b not declared lost by {[n for n in OBSERVERS if n not in seen]} within 30 s")
            cycle["detect_s"] = round(max(seen.values()) - killed, 4)
            declared = self.declared_lost(cluster, KILLED, killed_ns)
            cycle.update({f"{n}_declared_s": round((t - killed_ns) / 1e9, 4) for n, t in declared.items()})
            if len(declared) == len(OBSERVERS):
                cycle["declared_s"] = round((max(declared.values()) - killed_ns) / 1e9, 4)
            # a message sent after b's processes were all gone can only come through the re-homed
            # topic (one sent while the SIGKILLs were landing may still have gone through b)
            ev = self.first_after(cons, gone_ns, killed_ns, 30, cycle.setdefault("consumer_events", []))
            if ev is None:
                raise RuntimeError(f"{topic}: no message after the kill within 30 s: {cons.stderr_tail()}")
            cycle["rehome_s"] = round((ev["t_ns"] - killed_ns) / 1e9, 4)
            try:
                cycle["new_owner"] = observers["a"].lookup(topic, timeout=5)["node"]
            except Exception:   # noqa: BLE001 - only for the notes
                cycle["new_owner"] = "?"
        finally:
            for w in (prod, cons):
                if w is not None:
                    w.stop()
            if prod is not None:   # its last line: sends made, and refused while the topic moved
                line = prod.next_line(0)
                while line is not None:
                    if "role" in line:
                        cycle["producer"] = {k: line[k] for k in ("sent", "failed", "unsettled")}
                    line = prod.next_line(0)

    @staticmethod
    def first_after(worker, sent_after, ns, timeout, events):
        """The consumer's first message sent after time `sent_after` (its `got` event); its other
        events after `ns` until then go to `events` (times relative to `ns`, in s): a closed, the
        retries of a subscribe (none since the broker re-attaches consumers of a re-homed topic)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = worker.next_line(deadline - time.monotonic())
            if line is None:
                if worker.proc.poll() is not None:
                    return None
                continue
            found = line.get("event") == "got" and line["sent_ns"] > sent_after
            if line.get("t_ns", 0) > ns and (line.get("event") != "got" or found):
                events.append({k: (round((v - ns) / 1e9, 4) if k.endswith("_ns") else v) for k, v in line.items()})
            if found:
                return line
        return None

    @staticmethod
    def declared_lost(cluster, node, after_ns, wait_s=5.0):
        """{observer: time.time_ns() of its log record declaring `node` lost, after `after_ns`}, from
        each observer's broker.log (the leader's log also holds the members' records: a record
        counts for the observer whose process wrote it). Millisecond resolution."""
        found = {}
        deadline = time.monotonic() + wait_s
        while len(found) < len(OBSERVERS) and time.monotonic() < deadline:
            for observer in OBSERVERS:
                if observer in found:
                    continue
                broker = cluster.nodes[observer]
                pids = set(broker.processes())
                try:
                    lines = (broker.data_dir / "broker.log").read_text(errors="replace").splitlines()
                except OSError:
                    continue
                for line in lines:
                    m = LOST_LINE.match(line)
                    if not m or m.group(4) != node or int(m.group(3)) not in pids:
                        continue
                    at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
                    ns = int(at * 1e9) + int(m.group(2)) * 1_000_000
                    if ns > after_ns - 1_000_000:   # the record's time is truncated to the ms
                        found[observer] = ns
                        break
            if len(found) < len(OBSERVERS):
                time.sleep(0.05)
        return found

    def poll_lost(self, cluster, observers, killed, limit_s=30):
        """Ask a and c for their members until both say b is `lost`: {observer: monotonic time the
        answer saying so arrived}, and the times of the polling rounds."""
        seen, rounds = {}, []
        while len(seen) < len(observers) and time.monotonic() - killed < limit_s:
            for node, client in list(observers.items()):
                if node in seen:
                    continue
                try:
                    members = cluster.members(node, client=client, timeout=2)
                except Exception:   # noqa: BLE001 - a slow answer: ask again (a new connection if it is gone)
                    if not client.connected:
                        observers[node] = cluster.client(node, name=f"bench-cluster-watch-{node}")
                    continue
                if members.get(KILLED, {}).get("state") == "lost":
                    seen[node] = time.monotonic()
            rounds.append(time.monotonic())
            time.sleep(POLL_S)
        return seen, rounds

    # --- 3. --shared-data: kill/return cycles of a reliable topic's owner ---------------------------

    def owner(self, cluster, topic):
        for node in sorted(cluster.nodes):
            try:
                with cluster.client(node) as c:
                    found = c.lookup(topic, timeout=5)
                if found.get("available", True) and found.get("node") in cluster.nodes:
                    return found["node"]
            except Exception:   # noqa: BLE001 - ask the next node
                continue
        return None

    def shared_data_cycles(self, cluster):
        from actorbroker.scripts.local_cluster import wait_for
        topic = cluster.topic_on("b", "reliable", prefix="/bench")
        self.details["shared_data"] = sd = {"topic": topic, "cycles": []}
        with cluster.client("a") as c:   # a durable subscription from the start: nothing is trimmed
            c.subscribe(topic, "audit", "exclusive", "audit", dispatch="reliable", start="earliest").close()
        urls = ",".join(f"{n}={cluster.url(n)}" for n in ("a", "c", "b"))
        avoid = self.bench.tmp / "cluster-avoid"
        avoid.write_text("")
        prod = self.b.Worker(self.bench, "reliable-producing", "--url", urls, "--topic", topic, "--payload",
                             self.bench.payload, "--interval-ms", 2, "--avoid", avoid, module=CLUSTER_WORKER)
        takeover = []
        result = None
        try:
            prod.wait_ready(60)
            progress = self.progress_waiter(prod)
            progress(0, 30)
            for i in range(self.kills):
                cycle = {"kill": i + 1}
                sd["cycles"].append(cycle)
                owner = wait_for(lambda: self.owner(cluster, topic), 30, f"{topic}: an owner")
                cycle["owner"] = owner
                avoid.write_text(owner)            # the producer moves to a node that survives
                progress.connected_away_from(owner, 30)
                progress(progress.count + 1, 30)   # receipts are flowing before the kill
                killed_ns, _, gone_ns, left = cluster.kill(owner)
                if left:
                    self.bench.fail_note(f"cluster shared-data kill {i + 1}: processes alive after SIGKILL: {left}")
                try:
                    ev = progress.receipt_sent_after(gone_ns, 60)
                    if ev is None:
                        self.bench.fail_note(f"cluster shared-data kill {i + 1}: no receipt within 60 s of the kill")
                    else:
                        cycle["receipts_again_s"] = round((ev["t_ns"] - killed_ns) / 1e9, 4)
                        takeover.append(cycle["receipts_again_s"])
                finally:
                    cluster.start(owner)
                    cluster.wait_all_live(90)
                cycle["new_owner"] = self.owner(cluster, topic)
                self.b.note(f"cluster shared-data kill {i + 1}/{self.kills}: owner {owner} killed, receipts again "
                            f"{self.b._fmt(cycle.get('receipts_again_s'))} s later, owner now {cycle['new_owner']}")
            prod.signal(signal.SIGTERM)
            result = self.final_line(prod, 60)
        finally:
            prod.stop()
        if result is None:
            raise RuntimeError(f"the reliable producer gave no result: {prod.stderr_tail()}")
        receipted = {s for first, last in result["receipted"] for s in range(first, last + 1)}
        found = self.read_all(cluster, topic, len(receipted))
        lost = len(receipted - found)
        sd.update({"sent": result["sent"], "receipted": len(receipted), "failed": result["failed"],
                   "unsettled": result["unsettled"], "found": len(found), "lost": lost,
                   "lost_first": sorted(receipted - found)[:20]})
        self.b.note(f"cluster shared-data: {len(receipted)} receipted of {result['sent']} sent, {len(found)} found "
                    f"reading from earliest, lost {lost}")
        for q in (50, 99):
            self.bench.add("cluster", "--shared-data: first receipt of a message sent after kill -9 of the topic's owner",
                           f"p{q}", "s", [self.b.pct(takeover, q)] if takeover else [], samples=len(takeover))
        self.bench.add("cluster", f"--shared-data: receipted reliable messages lost over {self.kills} kill/return "
                                  f"cycles (target 0)", "lost", "msgs", [lost], lost=lost, receipted=len(receipted),
                       kills=self.kills)
        if lost:
            self.bench.fail_note(f"cluster shared-data: {lost} receipted messages not found "
                                 f"(first: {sd['lost_first']})")

    def progress_waiter(self, prod):
        """Reads the reliable producer's event lines: progress(count, timeout) waits until its
        receipted count has grown `count` times; receipt_sent_after(ns, timeout) for the first
        receipt of a message it sent after that time; connected_away_from(node, timeout) until it
        is connected to another node."""
        state = {"receipted": 0, "receipts": [], "node": None}

        def take(timeout):
            line = prod.next_line(timeout)
            if line is None:
                if prod.proc.poll() is not None:
                    raise RuntimeError(f"the reliable producer exited: {prod.stderr_tail()}")
                return
            if line.get("event") == "progress" and line["receipted"] > state["receipted"]:
                state["receipted"] = line["receipted"]
                progress.count += 1
            elif line.get("event") == "receipt":
                state["receipts"].append(line)
            elif line.get("event") == "connected":
                state["node"] = line["node"]

        def progress(count, timeout):
            deadline = time.monotonic() + timeout
            while progress.count < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the reliable producer got no receipts within {timeout} s")
                take(deadline - time.monotonic())

        def receipt_sent_after(ns, timeout):
            deadline = time.monotonic() + timeout
            while True:
                for ev in state["receipts"]:
                    if ev["sent_ns"] > ns:
                        state["receipts"] = [e for e in state["receipts"] if e["t_ns"] > ev["t_ns"]]
                        return ev
                if time.monotonic() > deadline:
                    return None
                take(deadline - time.monotonic())
        def connected_away_from(node, timeout):
            deadline = time.monotonic() + timeout
            while state["node"] in (None, node):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the reliable producer did not leave node {node} within {timeout} s")
                take(deadline - time.monotonic())
        progress.count = 0
        progress.connected_away_from = connected_away_from
        progress.receipt_sent_after = receipt_sent_after
        return progress

    @staticmethod
    def final_line(worker, timeout):
        from actorbroker.scripts.bench import next_line_where   # bench imports this module
        return next_line_where(worker, lambda line: "role" in line, timeout)
        return None

    def read_all(self, cluster, topic, expected, idle_s=5.0, limit_s=300.0):
        """Sequence numbers of every message of the topic, from the audit subscription (earliest)."""
        from actorbroker.scripts.bench_common import STAMP
        found = set()
        with cluster.client("a", name="bench-cluster-audit") as c:
            consumer = c.subscribe(topic, "audit", "exclusive", "audit", dispatch="reliable", start="earliest",
                                   timeout=30)
            end = time.monotonic() + limit_s
            batch = []
            while time.monotonic() < end:
                try:
                    msg = consumer.receive(timeout=idle_s if len(found) >= expected else 3 * idle_s)
                except TimeoutError:
                    break
                found.add(STAMP.unpack_from(msg.payload)[1])
                batch.append(msg)
                if len(batch) >= 200:
                    consumer.ack(batch)
                    batch = []
            if batch:
                consumer.ack(batch)
        return found
