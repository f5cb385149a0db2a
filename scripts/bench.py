"""`actorbroker bench`: throughput, latency, fan-out, shared, disconnect, scale and a bare
forwarder baseline, measured with real client processes (scripts/bench_worker.py).

Brokers are started on free ports in a temp dir (one per fsync mode) unless --url names one.
With --compare nats,redis the same 1->1, fan-out 1->4 and latency runs go to NATS and Redis
servers it starts (scripts/bench_peers.py; clients in scripts/bench_peer_worker.py). Every figure is the median of --runs runs, with min and max. Progress goes to stderr, the table
to stdout, the results to --json, the charts to --plot DIR (needs matplotlib: pip install
'actorbroker[plot]').
"""
import json
import functools
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

from actorbroker.scripts import bench_cluster, bench_operability, bench_peers, proctree
from actorbroker.scripts.bench_common import make_payload, term_with_parent
from actorbroker.transport.client import parse_url
from actorbroker.scripts.local_broker import ROOT, LocalBroker

ALL_SCENARIOS = ["baseline", "throughput", "latency", "fanout", "shared", "disconnect", "scale", "operability"]
# run only when named in --scenarios: `cluster` needs root (network namespaces) and takes minutes
EXTRA_SCENARIOS = ["cluster"]
FSYNC_MODES = ["group", "always", "interval:5"]
BIG_BACKLOG = 1_000_000
SPARSE_GAP_S = 0.6   # latency scenario: the gap between the messages of its sparse variant


def add_bench_command(subparsers):
    p = subparsers.add_parser("bench", help="run the benchmark suite",
                              description="Benchmark a broker with real client processes; see docs/benchmarks.md.")
    p.add_argument("--url", help="HOST:PORT of a running broker (default: start brokers on free ports); "
                                 "then every fsync variant runs against that one broker")
    p.add_argument("--scenarios", default=",".join(ALL_SCENARIOS),
                   help="comma-separated subset of: " + ",".join(ALL_SCENARIOS) + " (the default), and "
                        + ",".join(EXTRA_SCENARIOS) + " (three nodes in network namespaces: needs root and "
                        "ip netns; only when named)")
    p.add_argument("--messages", type=int, default=None, help="messages per throughput run (default 20000)")
    p.add_argument("--payload", type=int, default=100, help="payload bytes (default %(default)s, at least 16)")
    p.add_argument("--runs", type=int, default=None, help="runs per figure; median with min-max (default 3)")
    p.add_argument("--rate", type=int, default=1000, help="latency scenario: msg/s (default %(default)s)")
    p.add_argument("--latency-seconds", type=float, default=None, help="latency scenario duration (default 3)")
    p.add_argument("--reps", type=int, default=None, help="disconnect: repetitions per kind (default 20)")
    p.add_argument("--conns", default=None, help="scale: idle connection counts (default 10,100,1000,10000)")
    p.add_argument("--scale-type", default="shared", choices=("shared", "key_shared", "failover"),
                   help="scale: the type of the subscription all the idle connections join (default shared)")
    p.add_argument("--kills", type=int, default=None,
                   help="cluster: kill -9 / return cycles of a node (default 10, --quick 2; 0: throughput only)")
    p.add_argument("--compare", default="", metavar="PEERS",
                   help="also run 1->1, fan-out 1->4 and latency against these systems (of: "
                        + ",".join(bench_peers.PEERS) + "), on servers started here; needs "
                        "nats-server / redis-server on PATH and pip install 'actorbroker[bench]'")
    p.add_argument("--client", default="python", metavar="CLIENTS",
                   help="comma-separated client libraries for the client processes, of: "
                        + ",".join(CLIENTS) + " (default %(default)s). python runs every scenario; node "
                        "(clients/node: needs node 20+ and `npm ci` there) runs throughput non_reliable 1->1 "
                        "and latency non_reliable, next to python when both are named; the other scenarios use python")
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds): checks that everything works")
    p.add_argument("--json", default="bench-results.json", help="results file (default %(default)s)")
    p.add_argument("--plot", metavar="DIR", help="write PNG charts there (needs matplotlib)")
    p.set_defaults(func=run_bench)


# --- processes ----------------------------------------------------------------------------------

def _term_with_parent():
    """A preexec_fn for every child: SIGTERM it if the bench dies (all of them are started from the
    bench's main thread, whose exit is what PR_SET_PDEATHSIG watches)."""
    return functools.partial(term_with_parent, os.getpid())


WORKER = "actorbroker.scripts.bench_worker"
CLIENTS = ["python", "node"]
NODE_CLIENT = ROOT / "clients" / "node"
NODE_WORKER = NODE_CLIENT / "bench" / "worker.js"   # the produce and consume roles, same options
PEER_WORKER = "actorbroker.scripts.bench_peer_worker"
CONNS_WORKER = "actorbroker.scripts.bench_conns"


class Worker:
    """One client process (bench_worker ROLE, or another `module`); its stdout JSON lines are
    collected by a thread."""

    def __init__(self, bench, role, *options, module=WORKER, client="python", prefix=()):
        """prefix: a command that execs the worker in place (`ip netns exec NAME`: the pid stays)."""
        self.bench = bench
        self.role = role
        self.ready = str(bench.tmp / f"ready-{uuid.uuid4().hex[:10]}")
        err_path = bench.tmp / f"worker-{role}-{uuid.uuid4().hex[:6]}.stderr"
        self.err_path = err_path
        self._err = open(err_path, "wb")
        argv = [role, "--ready", self.ready] if module != CONNS_WORKER else []
        program = ["node", str(NODE_WORKER)] if client == "node" else [sys.executable, "-m", module]
        self.proc = subprocess.Popen(
            [*prefix, *program, *argv, *map(str, options)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=self._err, stdin=subprocess.DEVNULL,
            preexec_fn=_term_with_parent())
        self.pid = self.proc.pid
        bench.workers.add(self)
        self.lines = queue.Queue()
        self.eof_ns = None   # when its stdout ended: the kernel closed its files (exit), or it did
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                pass
        self.eof_ns = time.time_ns()
        self.lines.put(None)

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.ready):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} worker exited ({self.proc.returncode}): {self.stderr_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.role} worker not ready within {timeout}s")
            time.sleep(0.01)

    def next_line(self, timeout):
        try:
            line = self.lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if line is None:
            self.lines.put(None)   # stays at the end
        return line

    def result(self, timeout):
        """The worker's JSON result line; raises if none within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.next_line(deadline - time.monotonic())
            if line is not None:
                break
            if time.monotonic() >= deadline or self.lines.queue and self.lines.queue[0] is None:
                self.stop()
                raise RuntimeError(f"{self.role} worker gave no result: {self.stderr_tail()}")
        self.stop()
        return line

    def stderr_tail(self):
        """The last line of the worker's stderr (the exception, when it died of one)."""
        try:
            lines = [x for x in self.err_path.read_text(errors="replace").splitlines() if x.strip()]
        except OSError:
            return ""
        return lines[-1][-300:] if lines else "(no stderr)"

    def signal(self, sig):
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, sig)
            except OSError:
                pass

    def stop(self, timeout=5):
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
        self._err.close()
        self.bench.workers.discard(self)


class Forwarder:
    """The bare asyncio forwarder (scripts/bench_baseline.py) as a process."""

    def __init__(self, bench):
        self.proc = subprocess.Popen([sys.executable, "-m", "actorbroker.scripts.bench_baseline", "--port", "0"],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, text=True, preexec_fn=_term_with_parent())
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"forwarder did not start: {line!r}")
        self.url = line.split()[-1]

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


# --- the bench ---------------------------------------------------------------------------------

def note(text):
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


class Bench:
    def __init__(self, args):
        self.args = args
        quick = args.quick
        self.n = args.messages or (2000 if quick else 20000)
        self.runs = args.runs or (1 if quick else 3)
        self.payload = max(16, args.payload)
        self.latency_s = args.latency_seconds or (1.0 if quick else 3.0)
        self.reps = args.reps or (3 if quick else 20)
        self.fanout_k = [1, 2] if quick else [1, 2, 4, 8]
        self.shared_c = [1, 2] if quick else [1, 2, 4]
        self.conns = ([int(c) for c in args.conns.split(",")] if args.conns
                      else ([5, 20] if quick else [10, 100, 1000, 10000]))
        self.compare = [p.strip() for p in (args.compare or "").split(",") if p.strip()]
        self.clients = [c.strip() for c in args.client.split(",") if c.strip()]
        if self.compare and 4 not in self.fanout_k:   # the same shape as the peers' fan-out 1->4
            self.fanout_k = sorted(self.fanout_k + [4])
        self.tmpdir = tempfile.TemporaryDirectory(prefix="actorbroker-bench-")
        self.tmp = Path(self.tmpdir.name)
        self.brokers = {}           # fsync mode -> LocalBroker
        self.workers = set()
        self.rows = []              # the table: dicts
        self.details = {}           # scenario -> raw data
        self.failures = []
        self.skipped = []           # notes: what was not run here, and why (not failures)
        self.peer_servers = {}      # "nats"/"redis" -> bench_peers.PeerServer
        self.peer_versions = {}
        self.chosen = list(ALL_SCENARIOS)

    # brokers

    def url_for(self, fsync="group"):
        if self.args.url:
            return self.args.url
        if fsync not in self.brokers:
            note(f"starting a broker (--fsync {fsync} --max-backlog {BIG_BACKLOG})")
            self.brokers[fsync] = LocalBroker(self.tmp / f"broker-{fsync.replace(':', '-')}",
                                                "--fsync", fsync, "--max-backlog", str(BIG_BACKLOG))
        host, port = self.brokers[fsync].address
        return f"{host}:{port}"

    def stop_broker(self, fsync):
        b = self.brokers.pop(fsync, None)
        if b is not None:
            left = b.stop()
            if left:
                self.failures.append(f"broker {fsync}: processes left after stop: {left}")

    def stop_peer(self, peer):
        server = self.peer_servers.pop(peer, None)
        if server is not None and not server.stop():
            self.failures.append(f"compare {peer}: {bench_peers.BINARIES[peer]} (pid {server.pid}) still alive "
                                 f"after SIGKILL")

    def close(self):
        for w in list(self.workers):
            w.stop()
        for peer in list(self.peer_servers):
            self.stop_peer(peer)
        for mode in list(self.brokers):
            self.stop_broker(mode)
        self.tmpdir.cleanup()

    def topic(self, label):
        return f"/bench/{label}-{uuid.uuid4().hex[:8]}"

    def stats(self, url, topic):
        c = client_for(url, "bench-stats")
        try:
            return c.stats(topic)
        finally:
            c.close(timeout=2)

    def add(self, scenario, variant, metric, unit, values, **extra):
        row = {"scenario": scenario, "variant": variant, "metric": metric, "unit": unit, **summary(values), **extra}
        self.rows.append(row)
        return row

    def repeat(self, label, fn):
        """fn() -> dict of metric values, run self.runs times; a failed run is reported and skipped."""
        results = []
        for i in range(self.runs):
            t0 = time.monotonic()
            try:
                r = fn()
            except Exception as exc:   # noqa: BLE001 - a failed run must not end the bench
                self.failures.append(f"{label} run {i + 1}: {type(exc).__name__}: {exc}")
                note(f"{label} run {i + 1}/{self.runs}: FAILED {type(exc).__name__}: {exc}")
                continue
            results.append(r)
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in r.items() if not isinstance(v, (dict, list)))
            note(f"{label} run {i + 1}/{self.runs} ({time.monotonic() - t0:.1f}s): {shown}")
        return results

    # one producer, consumers of one topic

    def pubsub(self, url, topic, dispatch, n, consumers, producer_opts=(), consumer_opts=(), timeout=None,
               client="python"):
        """Start `consumers` [(subscription, type)], wait until they are subscribed, run one producer
        of n messages; returns (producer result, [consumer results])."""
        timeout = timeout or max(60.0, n / 500)
        ack = ["--ack"] if dispatch == "reliable" else []
        cons = [Worker(self, "consume", "--url", url, "--topic", topic, "--subscription", sub, "--type", typ,
                       "--dispatch", dispatch, "--n", n, "--payload", self.payload, "--deadline", timeout,
                       "--idle", 3, *ack, *consumer_opts, client=client) for sub, typ in consumers]
        try:
            for c in cons:
                c.wait_ready()
            prod = Worker(self, "produce", "--url", url, "--topic", topic, "--dispatch", dispatch, "--n", n,
                          "--payload", self.payload, "--deadline", timeout, *producer_opts, client=client)
            pres = prod.result(timeout + 10)
            # Stats now, while the consumers are attached: a non_reliable subscription is removed
            # (with its counters) once its last consumer has gone.
            try:
                self.snapshot = self.stats(url, topic)
            except Exception as exc:   # noqa: BLE001
                self.snapshot = {"error": str(exc)}
            cres = [c.result(timeout + 10) for c in cons]
        finally:
            for c in cons:
                c.stop()
        received = sum(c["received"] for c in cres)
        if received < n * (len(consumers) if consumers[0][1] != "shared" else 1):
            self.details.setdefault("losses", []).append(
                {"topic": topic, "dispatch": dispatch, "n": n, "producer": pres, "consumers": cres,
                 "stats_after_producer": self.snapshot, "stats_at_end": self._stats_or_error(url, topic)})
            note(f"loss on {topic}: consumers got {[c['received'] for c in cres]} of {n} "
                 f"(stopped: {[c['stopped'] for c in cres]}); details in the JSON")
        return pres, cres

    def _stats_or_error(self, url, topic):
        try:
            return self.stats(url, topic)
        except Exception as exc:   # noqa: BLE001
            return {"error": str(exc)}

    def dropped(self, url, topic):
        """Drops counted by the broker: from the snapshot taken while the consumers were attached,
        or now, whichever is larger."""
        counts = []
        for st in (getattr(self, "snapshot", None) or {}, self._stats_or_error(url, topic)):
            if "subscriptions" in st:
                counts.append(sum(x.get("dropped", 0) for x in st["subscriptions"]))
        return max(counts) if counts else None

    # scenarios

    def sc_baseline(self):
        fwd_n = self.n * 5
        for per_write, variant in ((1, "unbatched"), (100, "batched (100 frames/write)")):
            def once():
                fwd = Forwarder(self)
                try:
                    cons = Worker(self, "raw-consume", "--url", fwd.url, "--n", fwd_n, "--idle", 3, "--deadline", 60)
                    cons.wait_ready()
                    prod = Worker(self, "raw-produce", "--url", fwd.url, "--n", fwd_n, "--payload", self.payload,
                                  "--per-write", per_write, "--deadline", 60)
                    pres = prod.result(70)
                    cres = cons.result(70)
                finally:
                    fwd.stop()
                return {"msg_s": cres["msg_s"], "lost": fwd_n - cres["received"], "producer_msg_s": pres["msg_s"]}
            rs = self.repeat(f"baseline {variant}", once)
            self.add("baseline", variant, "delivered", "msg/s", [r["msg_s"] for r in rs],
                     lost=max([r["lost"] for r in rs], default=None), messages=fwd_n)

    def sc_throughput(self):
        # non_reliable 1->1 with each client, in the order given, then the reliable variants (python)
        variants = [("non_reliable", "group", c) for c in self.clients]
        variants += [("reliable", m, "python") for m in FSYNC_MODES if "python" in self.clients]
        for dispatch, fsync, client in variants:
            variant = (dispatch if dispatch == "non_reliable" else f"reliable fsync={fsync}") + client_label(client)
            try:
                url = self.url_for(fsync)
            except Exception as exc:   # noqa: BLE001
                self.failures.append(f"throughput {variant}: broker: {exc}")
                note(f"throughput {variant}: broker failed to start: {exc}")
                continue

            def once():
                topic = self.topic("tp")
                pres, (cres,) = self.pubsub(url, topic, dispatch, self.n, [("tp", "exclusive")], client=client)
                return {"msg_s": cres["msg_s"], "producer_msg_s": pres["msg_s"],
                        "lost": self.n - cres["received"], "dropped": self.dropped(url, topic)}
            rs = self.repeat(f"throughput {variant}", once)
            self.add("throughput", variant, "delivered", "msg/s", [r["msg_s"] for r in rs],
                     lost=max([r["lost"] for r in rs], default=None),
                     dropped=max([r["dropped"] or 0 for r in rs], default=None),
                     producer=summary([r["producer_msg_s"] for r in rs])["median"], messages=self.n)
            if fsync != "group" and not self.args.url and client == "python":
                self.stop_broker(fsync)

    def sc_latency(self):
        url = self.url_for("group")
        n = int(self.args.rate * self.latency_s)
        variants = [("non_reliable", c, self.args.rate, n) for c in self.clients]
        variants += [("reliable", "python", self.args.rate, n)] if "python" in self.clients else []
        # Sparse: each message after a quiet moment, longer than the broker's actors idle in
        # their own epoll before asking Thespian again (transport/lanes.py, MAX_IDLE_S).
        sparse = 1 / SPARSE_GAP_S
        variants += [("non_reliable", "python", sparse, 4 if self.args.quick else 12)] if "python" in self.clients else []
        for dispatch, client, rate, count in variants:
            def once():
                topic = self.topic("lat")
                _, (cres,) = self.pubsub(url, topic, dispatch, count, [("lat", "exclusive")],
                                         producer_opts=["--rate", rate, "--max-batch", 1],
                                         consumer_opts=["--latency"], client=client)
                lat = cres.get("latency") or {}
                return {"p50_us": lat.get("p50_us"), "p99_us": lat.get("p99_us"), "p999_us": lat.get("p999_us"),
                        "max_us": lat.get("max_us"), "lost": count - cres["received"]}
            label = (f"{dispatch} @{rate}/s" if rate != sparse else
                     f"{dispatch}, one message every {SPARSE_GAP_S} s") + client_label(client)
            rs = self.repeat(f"latency {label}", once)
            for key in ("p50_us", "p99_us", "p999_us", "max_us"):
                self.add("latency", label, key[:-3], "us", [r[key] for r in rs],
                         lost=max([r["lost"] for r in rs], default=None), messages=count)

    def sc_fanout(self):
        url = self.url_for("group")
        n = self.n // 2
        for k in self.fanout_k:
            def once():
                topic = self.topic("fo")
                _, cres = self.pubsub(url, topic, "non_reliable", n, [(f"s{i}", "exclusive") for i in range(k)])
                return aggregate(cres, n * k) | {"dropped": self.dropped(url, topic)}
            rs = self.repeat(f"fanout K={k}", once)
            self.add("fanout", f"K={k}", "delivered (all subscriptions)", "msg/s", [r["msg_s"] for r in rs],
                     lost=max([r["lost"] for r in rs], default=None),
                     dropped=max([r["dropped"] or 0 for r in rs], default=None), messages=n * k)

    def sc_shared(self):
        url = self.url_for("group")
        for c in self.shared_c:
            def once():
                topic = self.topic("sh")
                _, cres = self.pubsub(url, topic, "non_reliable", self.n, [("shared", "shared")] * c)
                return aggregate(cres, self.n) | {"dropped": self.dropped(url, topic)}
            rs = self.repeat(f"shared C={c}", once)
            self.add("shared", f"C={c}", "delivered (all consumers)", "msg/s", [r["msg_s"] for r in rs],
                     lost=max([r["lost"] for r in rs], default=None),
                     dropped=max([r["dropped"] or 0 for r in rs], default=None), messages=self.n)

    # other systems (--compare)

    def sc_compare(self):
        """NATS core pub/sub and Redis PUBLISH/SUBSCRIBE, same process layout as ours (a producer
        process, consumer processes): 1->1 with `throughput`, 1->4 with `fanout`, latency at --rate
        with `latency`, for whichever of those scenarios were chosen."""
        parts = [s for s in ("throughput", "fanout", "latency") if s in self.chosen]
        if not parts:
            self.skipped.append("compare: nothing to compare (--compare goes with throughput, fanout or latency)")
            note(self.skipped[-1])
            return
        for peer in self.compare:
            why = bench_peers.missing(peer)
            if why:
                self.skipped.append(f"compare: {why}")
                note(self.skipped[-1])
                continue
            self.peer_versions[peer] = bench_peers.versions(peer)
            try:
                server = bench_peers.PeerServer(peer, self.tmp / f"peer-{peer}")
            except Exception as exc:   # noqa: BLE001
                self.failures.append(f"compare {peer}: server did not start: {exc}")
                note(self.failures[-1])
                continue
            self.peer_servers[peer] = server
            self.peer_versions[peer] |= {"pid": server.pid, "url": server.url}
            note(f"compare: {bench_peers.BINARIES[peer]} pid {server.pid} on {server.url} "
                 f"({', '.join(f'{k} {v}' for k, v in self.peer_versions[peer].items() if k not in ('pid', 'url'))})")
            try:
                if "throughput" in parts:
                    def once():
                        pres, (cres,) = self.peer_pubsub(peer, server.url, self.n, 1)
                        return {"msg_s": cres["msg_s"], "producer_msg_s": pres["msg_s"],
                                "lost": self.n - cres["received"]}
                    rs = self.repeat(f"compare {peer} 1->1", once)
                    self.add("compare", f"{peer} 1->1", "delivered", "msg/s", [r["msg_s"] for r in rs],
                             lost=max([r["lost"] for r in rs], default=None),
                             producer=summary([r["producer_msg_s"] for r in rs])["median"], messages=self.n)
                if "fanout" in parts:
                    n = self.n // 2   # as our fan-out: N/2 per subscription

                    def once():
                        _, cres = self.peer_pubsub(peer, server.url, n, 4)
                        return aggregate(cres, n * 4)
                    rs = self.repeat(f"compare {peer} 1->4", once)
                    self.add("compare", f"{peer} 1->4", "delivered (all subscriptions)", "msg/s",
                             [r["msg_s"] for r in rs], lost=max([r["lost"] for r in rs], default=None),
                             messages=n * 4)
                if "latency" in parts:
                    n = int(self.args.rate * self.latency_s)

                    def once():
                        _, (cres,) = self.peer_pubsub(peer, server.url, n, 1,
                                                      producer_opts=["--rate", self.args.rate],
                                                      consumer_opts=["--latency"])
                        lat = cres.get("latency") or {}
                        return {k: lat.get(k) for k in ("p50_us", "p99_us", "p999_us", "max_us")} | {
                            "lost": n - cres["received"]}
                    label = f"{peer} @{self.args.rate}/s"
                    rs = self.repeat(f"compare {label}", once)
                    for key in ("p50_us", "p99_us", "p999_us", "max_us"):
                        self.add("compare", label, key[:-3], "us", [r[key] for r in rs],
                                 lost=max([r["lost"] for r in rs], default=None), messages=n)
            finally:
                self.stop_peer(peer)

    def peer_pubsub(self, peer, url, n, consumers, producer_opts=(), consumer_opts=()):
        """`consumers` consumer processes of one NATS subject / Redis channel, each expecting all n
        messages, then one producer process; returns (producer result, [consumer results])."""
        timeout = max(60.0, n / 500)
        subject = f"bench.{uuid.uuid4().hex[:10]}"
        cons = [Worker(self, f"{peer}-consume", "--url", url, "--topic", subject, "--n", n, "--payload",
                       self.payload, "--deadline", timeout, "--idle", 3, *consumer_opts, module=PEER_WORKER)
                for _ in range(consumers)]
        try:
            for c in cons:
                c.wait_ready()
            prod = Worker(self, f"{peer}-produce", "--url", url, "--topic", subject, "--n", n, "--payload",
                          self.payload, "--deadline", timeout, *producer_opts, module=PEER_WORKER)
            pres = prod.result(timeout + 10)
            cres = [c.result(timeout + 10) for c in cons]
        finally:
            for c in cons:
                c.stop()
        if pres.get("error"):
            note(f"compare {peer}: producer: {pres['error']}")
        received = [c["received"] for c in cres]
        if sum(received) < n * consumers:
            self.details.setdefault("compare_losses", []).append(
                {"peer": peer, "n": n, "producer": pres, "consumers": cres})
            note(f"compare {peer}: consumers got {received} of {n} (stopped: {[c['stopped'] for c in cres]})")
        return pres, cres

    def sc_operability(self):
        """Metrics and a watcher on vs off, same run (scripts/bench_operability.py)."""
        bench_operability.run(self, BIG_BACKLOG)

    def sc_cluster(self):
        """Three nodes in network namespaces (scripts/bench_cluster.py)."""
        bench_cluster.run(self, BIG_BACKLOG)

    def sc_disconnect(self):
        url = self.url_for("group")
        try:
            close_ms, kill_ms, close_active_ms, kill_active_ms = self.failover_takeover(url)
            for label, values in (("failover takeover after socket close", close_ms),
                                  ("failover takeover after kill -9", kill_ms),
                                  ("failover standby told active after socket close", close_active_ms),
                                  ("failover standby told active after kill -9", kill_active_ms)):
                for q in (50, 99):
                    self.add("disconnect", label, f"p{q}", "ms",
                             [pct(values, q)] if values else [], samples=len(values))
            self.details["failover_ms"] = {"close": close_ms, "kill": kill_ms}
        except Exception as exc:   # noqa: BLE001
            self.failures.append(f"disconnect failover: {type(exc).__name__}: {exc}")
            note(f"disconnect failover FAILED: {exc}")
        try:
            values = self.shared_redelivery(url)
            for q in (50, 99):
                self.add("disconnect", "shared reliable: redelivered after kill -9", f"p{q}", "ms",
                         [pct(values, q)] if values else [], samples=len(values))
            self.details["redelivery_ms"] = values
        except Exception as exc:   # noqa: BLE001
            self.failures.append(f"disconnect shared: {type(exc).__name__}: {exc}")
            note(f"disconnect shared FAILED: {exc}")

    def failover_takeover(self, url):
        """Failover consumers named c0000, c0001, ...: the first by name is active. Kill or close the
        active one; the next one's first message ends the measurement; then start another standby."""
        topic, sub = self.topic("failover"), "fo"
        names = (f"c{i:04d}" for i in range(10_000))

        def standby():
            w = Worker(self, "failover", "--url", url, "--topic", topic, "--subscription", sub,
                       "--name", next(names), "--deadline", 600)
            w.wait_ready()
            return w
        stop = threading.Event()
        active, waiting = standby(), standby()
        client = client_for(url, "bench-failover-producer")
        producer = client.producer(topic, max_batch=1)

        def pump():   # one message every ~1 ms
            seq = 0
            while not stop.is_set():
                try:
                    producer.send(make_payload(seq, 16))   # stamped with its send time
                except Exception:   # noqa: BLE001
                    return
                seq += 1
                time.sleep(0.001)
        threading.Thread(target=pump, daemon=True).start()
        results = {"close": [], "kill": []}   # until the standby's first message
        pushed = {"close": [], "kill": []}    # until the standby is told it is active
        waited = {"close": [], "kill": []}
        exits = []   # kill -9 -> the kernel closed the killed process's files (its socket with them)
        try:
            first = wait_event(active, "first", 15)
            if first is None:
                raise RuntimeError("the active failover consumer received nothing")
            for rep in range(self.reps * 2):
                kind = "close" if rep % 2 == 0 else "kill"
                time.sleep(0.1)
                if kind == "close":
                    active.signal(signal.SIGUSR1)
                    ev = wait_event(active, "closed", 10)
                    t0 = ev["t_ns"] if ev else None
                else:
                    t0 = time.time_ns()
                    active.signal(signal.SIGKILL)
                # the broker's `active` push to the standby is the takeover; its first message
                # follows when the producer's next record arrives
                promoted = next_line_where(waiting, lambda line: line.get("event") in ("active", "first"), 15)
                ev = promoted if promoted is None or promoted["event"] == "first" else wait_event(waiting, "first", 15)
                if t0 is None or ev is None:
                    self.failures.append(f"failover rep {rep} ({kind}): no takeover seen")
                    note(f"failover rep {rep} ({kind}): no takeover within 15s")
                else:
                    results[kind].append((ev["t_ns"] - t0) / 1e6)
                    if promoted["event"] == "active":
                        pushed[kind].append((promoted["t_ns"] - t0) / 1e6)
                    # the part spent waiting for the producer: the standby's first record was sent
                    # this long after the kill/close (the ones before went to the gone consumer)
                    waited[kind].append(max(0, ev["sent_ns"] - t0) / 1e6)
                    if kind == "kill":
                        active.proc.wait(5)
                        for _ in range(100):   # its stdout reader notes the end a moment later
                            if active.eof_ns is not None:
                                break
                            time.sleep(0.001)
                        if active.eof_ns is not None:
                            exits.append((results[kind][-1], min(results[kind][-1], (active.eof_ns - t0) / 1e6)))
                active.stop()
                active, waiting = waiting, standby()
            note("failover takeover: " + ", ".join(
                f"{k} p50 {_fmt(pct(v, 50))} ms p99 {_fmt(pct(v, 99))} ms (n={len(v)})" for k, v in results.items()))
            note("  the standby told it is active (`active` push): " + ", ".join(
                f"{k} p50 {_fmt(pct(v, 50))} ms p99 {_fmt(pct(v, 99))} ms (n={len(v)})" for k, v in pushed.items()))
            note("  of it, waiting for the producer's next record: " + ", ".join(
                f"{k} p50 {_fmt(pct(v, 50))} ms" for k, v in waited.items()) + "; the rest: " + ", ".join(
                f"{k} p50 {_fmt(pct([t - w for t, w in zip(results[k], v)], 50))} ms" for k, v in waited.items()))
            if exits:
                note(f"  kill -9 -> the kernel closed the killed consumer's files: p50 {_fmt(pct([e for _, e in exits], 50))} ms; "
                     f"from then to the standby's first message: p50 {_fmt(pct([t - e for t, e in exits], 50))} ms, "
                     f"p99 {_fmt(pct([t - e for t, e in exits], 99))} ms")
            self.details["failover_waited_ms"] = waited
            self.details["failover_active_ms"] = pushed
            self.details["failover_exit_ms"] = [e for _, e in exits]
        finally:
            stop.set()
            active.stop()
            waiting.stop()
            client.close(timeout=2)
        return results["close"], results["kill"], pushed["close"], pushed["kill"]

    def shared_redelivery(self, url, batch=50):
        """Shared reliable subscription: Y acks all, X holds what it gets unacked; kill -9 X; time until
        Y has every message."""
        topic, sub = self.topic("redeliver"), "sh"
        y = Worker(self, "shared-watch", "--url", url, "--topic", topic, "--subscription", sub,
                   "--name", "y", "--ack", "--deadline", 600)
        y.wait_ready()
        client = client_for(url, "bench-redelivery-producer")
        producer = client.producer(topic, dispatch="reliable")
        y_d, values = 0, []
        try:
            for rep in range(self.reps):
                x = Worker(self, "shared-watch", "--url", url, "--topic", topic, "--subscription", sub,
                           "--name", f"x{rep}", "--no-ack", "--deadline", 120)
                try:
                    x.wait_ready()
                    for i in range(batch):
                        producer.send(b"m%d" % i)
                    producer.flush(10)
                    target = batch * (rep + 1)
                    x_n = 0
                    deadline = time.monotonic() + 10
                    while x_n + y_d < target and time.monotonic() < deadline:
                        for w in (x, y):
                            line = w.next_line(0.02)
                            while line:
                                if w is x:
                                    x_n = line.get("n", x_n)
                                else:
                                    y_d = line.get("d", y_d)
                                line = w.next_line(0)
                    if x_n == 0 or x_n + y_d < target:
                        note(f"redelivery rep {rep}: x held {x_n}, y has {y_d}/{target}: skipped")
                        continue
                    t0 = time.time_ns()
                    x.signal(signal.SIGKILL)
                    t1 = None
                    deadline = time.monotonic() + 20
                    while y_d < target and time.monotonic() < deadline:
                        line = y.next_line(deadline - time.monotonic())
                        if line and "d" in line:
                            y_d, t1 = line["d"], line["t_ns"]
                    if y_d < target or t1 is None:
                        self.failures.append(f"redelivery rep {rep}: y has {y_d}/{target} after 20s")
                        note(f"redelivery rep {rep}: y has {y_d}/{target} after 20s")
                        y_d = max(y_d, target)   # go on with the next batch
                        continue
                    values.append((t1 - t0) / 1e6)
                finally:
                    x.stop()
            note(f"shared redelivery after kill -9: p50 {_fmt(pct(values, 50))} ms "
                 f"p99 {_fmt(pct(values, 99))} ms (n={len(values)}, {batch} messages per rep)")
        finally:
            y.stop()
            client.close(timeout=2)
        return values

    def sc_scale(self):
        """Idle consumer connections, K at a time, opened concurrently by one process
        (scripts/bench_conns.py); broker footprint with them; then the opener is killed (-9) and
        the time until the broker is clean is measured."""
        if self.args.url:
            url, broker = self.args.url, None
            note("scale: --url given, broker memory and processes cannot be measured; set-up rate and "
                 "stats-clean time only")
        else:
            # room for the largest step and the bench's own admin connection (the default limit
            # is 10,000 connections: the 10,000th idle one would get OVERLOADED)
            room = max(self.conns, default=0) + 100
            broker = LocalBroker(self.tmp / "broker-scale", "--max-connections", str(max(room, 10_000)),
                                 "--max-connections-per-address", str(max(room, 10_000)))
            url = "%s:%d" % broker.address
        admin = ScaleAdmin(url)
        steps_done = self.details.setdefault("scale", [])
        try:
            base = broker_footprint(broker)
            if broker:
                self.add("scale", "0 connections", "broker PSS", "MiB", [base[0] / 1024], processes=base[1])
                note(f"scale: idle broker: {base[1]} processes, PSS {base[0] / 1024:.0f} MiB")
            per_conn = None   # (KiB, processes) per connection, from the last step of shared subscriptions
            steps = [(k, False) for k in self.conns] + [(self.conns[0], True)]
            for k, distinct in steps:
                kind = "" if self.args.scale_type == "shared" else f", {self.args.scale_type}"
                label = f"{k} idle connections" + (", a subscription each" if distinct else kind)
                if broker and broker.proc.poll() is not None:
                    self.fail_note(f"scale {label}: not run, the broker exited ({broker.proc.returncode}); "
                                   f"log: {broker.log_tail(3)}")
                    break
                if broker and per_conn:
                    # a subscription of its own costs at least two actor processes (subscription,
                    # dispatcher) of ~8 MiB: the shared steps' per-connection figures do not tell
                    need_kb, need_processes = ((k * max(2.5 * per_conn[0], 8 * 1024), k * max(2.5 * per_conn[1], 2))
                                               if distinct else (k * per_conn[0], k * per_conn[1]))
                    why = too_big(need_kb, need_processes)
                    if why:
                        self.fail_note(f"scale {label}: skipped, the broker cannot take it here: {why} "
                                       f"(measured {per_conn[0] / 1024:.1f} MiB and {per_conn[1]:.2f} processes "
                                       f"per connection)")
                        continue
                step = self.scale_step(url, broker, admin, k, distinct, label)
                steps_done.append(step)
                if step.get("per_conn") and not distinct:
                    per_conn = step["per_conn"]
        finally:
            admin.close()
            if broker:
                left = broker.stop()
                if left:
                    self.failures.append(f"scale broker: processes left after stop: {left}")

    def fail_note(self, msg):
        self.failures.append(msg)
        note(msg)

    def scale_step(self, url, broker, admin, k, distinct, label):
        topic = self.topic("idle")
        admin.create_topic(topic)            # so that the step's TopicActor (if any) is in `pre`
        pre_pss, pre_n = broker_footprint(broker, settle=True)
        open_deadline = min(300.0, 60 + 0.05 * k)
        w = Worker(self, "idle", "--url", url, "--topic", topic, "--conns", k, "--prefix", f"i{k}-",
                   "--deadline", open_deadline, "--hold", open_deadline + 900, "--type", self.args.scale_type,
                   *(["--distinct"] if distinct else []), module=CONNS_WORKER)
        step = {"conns": k, "distinct": distinct, "topic": topic, "pre_processes": pre_n, "pre_pss_kb": pre_pss}
        try:
            self._scale_measure(w, broker, k, distinct, label, step, open_deadline, pre_pss, pre_n)
        except Exception as exc:   # noqa: BLE001 - reported; the broker's clean-up is still measured
            self.fail_note(f"scale {label}: {type(exc).__name__}: {exc}")
        finally:
            t_kill = time.monotonic()
            w.signal(signal.SIGKILL)   # the kernel closes every socket at once
            w.stop()
        clean = self.wait_clean(admin, broker, topic, pre_n, t_kill, deadline_s=min(180.0, 30 + 0.02 * k))
        step["clean"] = clean
        took = max(clean["stats_s"] or 0, clean["processes_s"] or 0) if clean["ok"] else None
        self.add("scale", label, "broker clean after the client is killed", "s", [took] if took is not None else [],
                 stats_clean_s=_round(clean["stats_s"]), processes_back_s=_round(clean["processes_s"]),
                 left=clean["left"] or None)
        if clean["ok"]:
            note(f"scale {label}: client killed; broker clean after {took:.2f}s (stats {_fmt(clean['stats_s'])}s, "
                 f"processes {_fmt(clean['processes_s'])}s)")
        else:
            self.fail_note(f"scale {label}: broker not clean {clean['deadline_s']:g}s after the client was killed: "
                           f"consumers left {clean['consumers']}, processes {clean['left']} above the "
                           f"{pre_n} before the step")
        return step

    def _scale_measure(self, w, broker, k, distinct, label, step, open_deadline, pre_pss, pre_n):
        res = None
        end = time.monotonic() + open_deadline + 30
        while res is None and time.monotonic() < end:
            line = w.next_line(end - time.monotonic())
            if line is None and w.proc.poll() is not None:
                break   # it exited (its output is read up to the end first)
            if line and "opened" in line:
                res = line
        if res is None:
            raise RuntimeError(f"the connection opener gave no result: {w.stderr_tail()}")
        step["opener"] = res
        opened = res["opened"]
        if res["stopped"] or opened < k:
            self.fail_note(f"scale {label}: {opened}/{k} connections set up ({res['stopped']}); "
                           f"errors {res['errors']}")
        time.sleep(1.0)
        lost = 0
        line = w.next_line(0)
        while line is not None:
            lost = line.get("count", lost)
            line = w.next_line(0)
        if lost:
            self.fail_note(f"scale {label}: the broker closed {lost} of the {opened} idle connections")
        pss, nproc = broker_footprint(broker)
        extra = {}
        if broker and opened:
            step["per_conn"] = (max(1, (pss - pre_pss) / opened), max(0, (nproc - pre_n) / opened))
            extra = {"per_conn_mib": round((pss - pre_pss) / 1024 / opened, 2),
                     "per_conn_processes": round((nproc - pre_n) / opened, 2)}
            self.add("scale", label, "broker PSS", "MiB", [pss / 1024], processes=nproc, conns=opened, **extra)
        self.add("scale", label, "connection set-up", "conn/s", [res["conn_s"]] if opened else [],
                 opened=f"{opened}/{k}", failed=res["failed"] or None)
        note(f"scale {label}: {opened}/{k} set up in {res['elapsed_s']:.2f}s ({res['conn_s']:,.0f}/s)"
             + (f", broker {nproc} processes, PSS {pss / 1024:,.0f} MiB {extra}" if broker else "")
             + (f", errors {res['errors']}" if res["errors"] else ""))

    def wait_clean(self, admin, broker, topic, pre_n, t_kill, deadline_s):
        """Poll `stats` (no consumer left on the topic's subscriptions) and the broker's process
        count (back to `pre_n`) until both hold or `deadline_s` has passed since `t_kill`."""
        deadline = t_kill + deadline_s
        stats_at = procs_at = None
        consumers, left = None, None
        while True:
            now = time.monotonic()
            if stats_at is None:
                consumers = admin.consumers(topic)
                if consumers == 0:
                    stats_at = time.monotonic()
            if broker is None:
                procs_at = procs_at or now
                left = None
            elif procs_at is None:
                left = len(broker.processes()) - pre_n
                if left <= 0:
                    procs_at = time.monotonic()
            if (stats_at and procs_at) or now > deadline:
                break
            time.sleep(0.05)
        return {"ok": bool(stats_at and procs_at), "deadline_s": deadline_s, "consumers": consumers,
                "left": max(0, left) if left is not None else None,
                "stats_s": stats_at - t_kill if stats_at else None,
                "processes_s": (procs_at - t_kill if procs_at else None) if broker else None}


class ScaleAdmin:
    """The scale scenario's one admin connection (stats, topic creation), opened on first use and
    opened again after an error; every call bounded."""

    def __init__(self, url):
        self.url = url
        self.client = None

    def _client(self):
        if self.client is None:
            self.client = client_for(self.url, "bench-scale-admin")
        return self.client

    def create_topic(self, topic):
        producer = self._client().producer(topic, timeout=30)
        producer.close(timeout=30)

    def consumers(self, topic):
        """Consumers attached to the topic's subscriptions now (None if stats did not answer)."""
        try:
            st = self._client().stats(topic, timeout=5)
        except Exception:   # noqa: BLE001 - a busy broker: try again at the next poll
            self.close()
            return None
        return sum(len(s.get("consumers") or []) for s in st.get("subscriptions") or [])

    def close(self):
        if self.client is not None:
            try:
                self.client.close(timeout=2)
            except Exception:   # noqa: BLE001
                pass
            self.client = None


def too_big(need_kb, need_processes):
    """Why a step needing this much memory / this many processes cannot run here, or None."""
    avail = mem_available_kb()
    if need_kb > 0.6 * avail:
        return f"it would need ~{need_kb / 1024 ** 2:.1f} GiB, {avail / 1024 ** 2:.1f} GiB available"
    limits = []
    for path in ("/proc/sys/kernel/pid_max", "/proc/sys/kernel/threads-max"):
        try:
            with open(path) as f:
                limits.append(int(f.read()))
        except (OSError, ValueError):
            pass
    running = sum(1 for name in os.listdir("/proc") if name.isdigit())
    if limits and need_processes > 0.5 * min(limits) - running:
        return f"it would need ~{need_processes:,.0f} more processes, the kernel allows {min(limits):,}"
    return None


def _round(v, digits=3):
    return None if v is None else round(v, digits)


def client_for(url, name):
    """A connected Client (transport/client.py) for "host:port"."""
    from actorbroker.transport.client import Client
    host, port = parse_url(url)
    return Client(host, port, name=name)


def client_label(client):
    """The suffix of a row's variant measured with another client library than Python's."""
    return "" if client == "python" else f", {client} client"


def check_clients(clients):
    """An error text when a --client cannot run here, else None."""
    unknown = [c for c in clients if c not in CLIENTS]
    if unknown or not clients:
        return f"--client {','.join(clients)!r}: choose from {','.join(CLIENTS)}"
    if "node" in clients:
        if not shutil.which("node"):
            return "--client node: node is not on PATH"
        if not (NODE_CLIENT / "node_modules" / "@msgpack" / "msgpack").is_dir():
            return f"--client node: run `npm ci` in {NODE_CLIENT} first"
    return None


def aggregate(cres, expected):
    firsts = [c["first_ns"] for c in cres if c["first_ns"]]
    lasts = [c["last_ns"] for c in cres if c["last_ns"]]
    received = sum(c["received"] for c in cres)
    span = (max(lasts) - min(firsts)) / 1e9 if firsts and lasts else 0
    return {"msg_s": (received - 1) / span if span > 0 else 0.0, "lost": expected - received}


def wait_event(worker, event, timeout):
    return next_line_where(worker, lambda line: line.get("event") == event, timeout)


def next_line_where(worker, match, timeout):
    """The worker's next JSON line for which match(line) is true; None if it ended first or the
    timeout passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = worker.next_line(deadline - time.monotonic())
        if line is None:
            if worker.proc.poll() is not None and worker.lines.empty():
                return None
            continue
        if match(line):
            return line
    return None


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def broker_footprint(broker, settle=False):
    """(PSS KiB, number of processes) of the broker's whole process tree; with settle, first wait
    (at most 5 s) until the number of processes has not changed for 0.5 s."""
    if broker is None:
        return 0, None
    pids = broker.processes()
    if settle:
        end, since = time.monotonic() + 5, time.monotonic()
        while time.monotonic() < end and time.monotonic() - since < 0.5:
            time.sleep(0.1)
            now = broker.processes()
            if len(now) != len(pids):
                pids, since = now, time.monotonic()
        pids = broker.processes()
    return proctree.pss_kb(pids), len(pids)


def mem_available_kb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "platform": platform.platform(), "mem_total_kb": _meminfo("MemTotal"),
            "loadavg_at_end": os.getloadavg()}


def _meminfo(key):
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


# --- output -------------------------------------------------------------------------------------

def add_ratios(rows):
    """Every msg/s row: x_unbatched / x_batched (to the forwarder) and, with --compare nats,
    x_nats (to NATS's median of this run: fan-out rows and 1->4 rows to NATS 1->4, the others to
    NATS 1->1). Every latency row (ours and Redis's): nats_us, NATS's figure of the same
    percentile at the same rate."""
    base = {r["variant"]: r["median"] for r in rows if r["scenario"] == "baseline"}
    unb = base.get("unbatched")
    bat = next((v for k, v in base.items() if k.startswith("batched")), None)
    nats = {(r["variant"], r["metric"]): r["median"] for r in rows
            if r["scenario"] == "compare" and r["variant"].startswith("nats ") and r["median"]}
    nats_11 = nats.get(("nats 1->1", "delivered"))
    nats_14 = nats.get(("nats 1->4", "delivered (all subscriptions)"))
    nats_lat = {metric: v for (variant, metric), v in nats.items() if variant.startswith("nats @")}
    for r in rows:
        if r["unit"] == "msg/s" and r["median"]:
            r["x_unbatched"] = r["median"] / unb if unb else None
            r["x_batched"] = r["median"] / bat if bat else None
            ref = nats_14 if r["scenario"] == "fanout" or r["variant"].endswith("1->4") else nats_11
            if ref and not r["variant"].startswith("nats "):
                r["x_nats"] = r["median"] / ref
        elif r["unit"] == "us" and r["median"] and nats_lat.get(r["metric"]) \
                and not r["variant"].startswith("nats "):
            r["nats_us"] = nats_lat[r["metric"]]


NOTE_KEYS = ("lost", "dropped", "processes", "per_conn_mib", "per_conn_processes", "opened", "failed",
             "stats_clean_s", "processes_back_s", "left", "samples", "cost_pct", "events", "scrapes",
             "poll_ms", "receipted", "kills")


def table(rows):
    with_nats = any(r.get("x_nats") is not None or r.get("nats_us") is not None for r in rows)
    head = ["scenario", "variant", "metric", "median", "min-max", "unit", "vs fwd 1/100"]
    head += ["vs nats"] if with_nats else []
    head += ["notes"]
    lines = []
    for r in rows:
        rng = f"{_fmt(r['min'])}-{_fmt(r['max'])}" if r["min"] is not None else "-"
        ratio = ""
        if r.get("x_unbatched") is not None:
            ratio = f"{r['x_unbatched']:.2f}"
            if r.get("x_batched"):
                ratio += f" / {r['x_batched']:.2f}"
        vs_nats = []
        if r.get("x_nats") is not None:
            vs_nats = [f"{r['x_nats']:.2f}"]
        elif r.get("nats_us") is not None:   # NATS's figure next to ours, and how many times it
            x = r["median"] / r["nats_us"]
            vs_nats = [f"nats {_fmt(r['nats_us'])} (x{x:.1f})" if x >= 1 else f"nats {_fmt(r['nats_us'])} (x{x:.2f})"]
        elif with_nats:
            vs_nats = [""]
        notes = []
        for key in NOTE_KEYS:
            if r.get(key) is not None:
                notes.append(f"{key} {r[key]}")
        if r.get("producer"):
            notes.append(f"producer {_fmt(r['producer'])}/s")
        lines.append([r["scenario"], r["variant"], r["metric"], _fmt(r["median"]), rng, r["unit"], ratio,
                      *vs_nats, ", ".join(notes)])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)] if lines else [len(h) for h in head]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths)]
    for line in lines:
        out.append(" | ".join(str(x).ljust(w) for x, w in zip(line, widths)))
    return "\n".join(out)


def plot(results, outdir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note("--plot: matplotlib is not installed (pip install matplotlib, or the 'plot' extra); no charts")
        return []
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rows = results["rows"]
    written = []

    def bars(sel, title, fname, ylabel, log=False):
        sel = [r for r in sel if r["median"] is not None]
        if not sel:
            return
        fig, ax = plt.subplots(figsize=(9, 4.5))
        labels = [textwrap.fill(f"{r['variant']} {r['metric']}" if r["unit"] != "msg/s"
                                else f"{r['scenario']}: {r['variant']}", 18) for r in sel]
        med = [r["median"] for r in sel]
        err = [[m - r["min"] for m, r in zip(med, sel)], [r["max"] - m for m, r in zip(med, sel)]]
        ax.bar(range(len(sel)), med, yerr=err, capsize=4, color="#4878a8")
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        for i, m in enumerate(med):
            ax.annotate(_fmt(m), (i, m), ha="center", va="bottom", fontsize=7)
        fig.tight_layout()
        path = outdir / fname
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))

    bars([r for r in rows if r["scenario"] in ("baseline", "throughput")
          or r["scenario"] == "compare" and r["unit"] == "msg/s"],
         "1 producer -> 1 consumer, delivered msg/s (median, min-max)", "bench-throughput.png", "msg/s", log=True)
    bars([r for r in rows if r["scenario"] in ("fanout", "shared")],
         "fan-out (K subscriptions) and shared (C consumers): aggregate msg/s", "bench-fanout-shared.png", "msg/s")
    bars([r for r in rows if r["scenario"] == "latency" or r["scenario"] == "compare" and r["unit"] == "us"],
         "latency at a fixed rate (us, median of runs, min-max)", "bench-latency.png", "us", log=True)
    bars([r for r in rows if r["scenario"] == "disconnect"],
         "disconnect: time to takeover / redelivery (ms)", "bench-disconnect.png", "ms")
    scale = [r for r in rows if r["scenario"] == "scale" and r["metric"] == "broker PSS" and r["median"]
             and "each" not in r["variant"]]
    if scale:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [int(r["variant"].split()[0]) for r in scale]
        ax.plot(xs, [r["median"] for r in scale], "o-", label="PSS (MiB)")
        ax.plot(xs, [r["processes"] for r in scale], "s--", label="broker processes")
        ax.set_xlabel("idle consumer connections")
        ax.set_title("broker footprint vs idle connections")
        ax.legend()
        fig.tight_layout()
        path = outdir / "bench-scale.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return written


def run_bench(args):
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in ALL_SCENARIOS + EXTRA_SCENARIOS]
    if unknown:
        print(f"error: unknown scenarios {unknown}; choose from {ALL_SCENARIOS + EXTRA_SCENARIOS}", file=sys.stderr)
        return 2
    peers = [p.strip() for p in (args.compare or "").split(",") if p.strip()]
    if [p for p in peers if p not in bench_peers.PEERS]:
        print(f"error: --compare {args.compare!r}: choose from {','.join(bench_peers.PEERS)}", file=sys.stderr)
        return 2
    problem = check_clients([c.strip() for c in args.client.split(",") if c.strip()])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    bench = Bench(args)
    bench.chosen = chosen
    started = time.monotonic()
    load_at_start = os.getloadavg()
    note(f"scenarios {','.join(chosen)}; {bench.n} messages of {bench.payload} B, {bench.runs} run(s) each; "
         f"non_reliable subscriptions keep up to {BIG_BACKLOG:,} messages (--max-backlog) so that a fast "
         f"producer is not counted as drops" + (" (self-started brokers only)" if not args.url else ""))
    scenarios = {}
    try:
        for name in ALL_SCENARIOS + EXTRA_SCENARIOS + ["compare"]:
            if name not in chosen and not (name == "compare" and peers):
                continue
            note(f"== {name}")
            t0 = time.monotonic()
            try:
                getattr(bench, f"sc_{name}")()
                scenarios[name] = {"ok": True}
            except Exception as exc:   # noqa: BLE001 - report and go on
                bench.failures.append(f"{name}: {type(exc).__name__}: {exc}")
                note(f"{name} FAILED: {type(exc).__name__}: {exc}")
                scenarios[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            scenarios[name]["seconds"] = round(time.monotonic() - t0, 1)
    finally:
        bench.close()
    add_ratios(bench.rows)
    results = {"machine": machine() | {"loadavg_at_start": load_at_start},
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "settings": {"messages": bench.n, "payload": bench.payload, "runs": bench.runs,
                            "rate": args.rate, "latency_seconds": bench.latency_s, "reps": bench.reps,
                            "fanout": bench.fanout_k, "shared": bench.shared_c, "conns": bench.conns,
                            "url": args.url, "quick": args.quick, "max_backlog": BIG_BACKLOG, "kills": args.kills,
                            "compare": peers, "clients": bench.clients},
               "peers": bench.peer_versions,
               "scenarios": scenarios, "rows": bench.rows, "details": bench.details,
               "skipped": bench.skipped, "failures": bench.failures,
               "seconds": round(time.monotonic() - started, 1)}
    print(table(bench.rows))
    print(f"\nload average at start {load_at_start[0]:.2f}, at end {os.getloadavg()[0]:.2f} "
          f"({os.cpu_count()} CPUs): other work on the machine skews every figure")
    backlog = (f"the self-started brokers run with --max-backlog {BIG_BACKLOG:,}" if not args.url
               else f"the broker at {args.url} keeps its own --max-backlog: a fast producer may show as drops")
    print(f"\nratios: 'vs fwd 1/100' = median / bare asyncio forwarder (unbatched / 100 frames per write); "
          f"{backlog}.")
    if any("x_nats" in r or "nats_us" in r for r in bench.rows):
        print("'vs nats' = median / NATS median of this run (fanout and 1->4 rows: / NATS 1->4, other msg/s "
              "rows: / NATS 1->1); latency rows: NATS's figure of the same percentile at the same rate "
              "(x = ours / NATS's).")
    for peer, v in bench.peer_versions.items():
        print(f"compare {peer}: " + ", ".join(f"{k} {val}" for k, val in v.items() if k not in ("pid", "url")))
    if bench.skipped:
        print("\nskipped:")
        for s in bench.skipped:
            print(f"  - {s}")
    if bench.failures:
        print("\nfailures:")
        for f in bench.failures:
            print(f"  - {f}")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    note(f"results written to {args.json} ({results['seconds']}s in all)")
    if args.plot:
        for path in plot(results, args.plot):
            note(f"chart {path}")
    return 1 if bench.failures else 0
