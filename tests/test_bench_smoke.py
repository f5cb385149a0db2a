"""`actorbroker bench --quick` runs every scenario end to end and writes its JSON (no timing checks);
with --compare nats,redis when their servers and clients are installed."""
import json
import subprocess
import sys

import pytest

from actorbroker.scripts import proctree
from actorbroker.scripts.bench import ALL_SCENARIOS
from actorbroker.scripts.local_broker import ROOT


@pytest.mark.timeout(150)
def test_bench_quick_writes_every_scenario(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "actorbroker.scripts.cli", "bench", "--quick", "--messages", "500", "--reps", "2",
         "--conns", "3", "--latency-seconds", "0.5", "--json", str(out), "--plot", str(tmp_path / "img")],
        cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["scenarios"]) == set(ALL_SCENARIOS)
    assert all(s["ok"] for s in results["scenarios"].values()), results["scenarios"]
    scenarios_with_rows = {r["scenario"] for r in results["rows"]}
    assert scenarios_with_rows == set(ALL_SCENARIOS), results["failures"]
    assert results["machine"]["nproc"] >= 1
    assert "scenario" in proc.stdout and "baseline" in proc.stdout   # the table was printed
    assert "== throughput" in proc.stderr                             # progress went to stderr
    # The brokers it started were stopped without leaving a process behind (LocalBroker.stop).
    assert not [f for f in results["failures"] if "left after stop" in f], results["failures"]


def _compare_missing():
    """Why the compare smoke run cannot run here (server binaries or Python clients), or None."""
    from actorbroker.scripts import bench_peers
    reasons = [why for why in map(bench_peers.missing, bench_peers.PEERS) if why]
    return "; ".join(reasons) or None


@pytest.mark.timeout(150)
def test_bench_quick_compare_nats_redis(tmp_path):
    why = _compare_missing()
    if why:
        pytest.skip(why)
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "actorbroker.scripts.cli", "bench", "--quick", "--compare", "nats,redis",
         "--scenarios", "throughput,fanout,latency", "--messages", "500", "--latency-seconds", "0.5",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["scenarios"]["compare"]["ok"], results["scenarios"]
    variants = {r["variant"] for r in results["rows"] if r["scenario"] == "compare"}
    for peer in ("nats", "redis"):
        assert {f"{peer} 1->1", f"{peer} 1->4", f"{peer} @1000/s"} <= variants, variants
    # Our rows carry the ratio to NATS; latency rows carry NATS's figure.
    ours = {(r["scenario"], r["variant"], r["metric"]): r for r in results["rows"]}
    assert ours[("throughput", "non_reliable", "delivered")]["x_nats"] > 0
    assert ours[("fanout", "K=4", "delivered (all subscriptions)")]["x_nats"] > 0
    assert ours[("latency", "non_reliable @1000/s", "p50")]["nats_us"] > 0
    assert "vs nats" in proc.stdout
    assert not results["skipped"], results["skipped"]
    # The servers it started are gone.
    for peer in ("nats", "redis"):
        assert not proctree.alive(results["peers"][peer]["pid"]), results["peers"][peer]


@pytest.mark.timeout(400)
def test_bench_cluster_scenario(tmp_path):
    """`bench --scenarios cluster` on three namespaces, small: every row is there, nothing was lost
    (1->1 runs; receipted reliable messages with --shared-data), and every namespace it made is
    gone (its processes too: a broker left after stop is a failure, exit status 1). No timings."""
    from actorbroker.scripts import netns
    why = netns.unavailable()
    if why:
        pytest.skip(f"the cluster scenario needs network namespaces: {why}")
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "actorbroker.scripts.cli", "bench", "--scenarios", "cluster", "--messages", "2000",
         "--runs", "1", "--kills", "2", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["scenarios"]["cluster"]["ok"], results["scenarios"]
    rows = {(r["variant"], r["metric"]): r for r in results["rows"] if r["scenario"] == "cluster"}
    variants = {v for v, _ in rows}
    for start in ("1->1 single node", "1->1 on one cluster node", "1->1 cross-node", "cross-node / single node",
                  "member loss declared", "member loss seen", "non_reliable topic of b re-homed"):
        assert any(v.startswith(start) for v in variants), (start, variants)
    for (variant, metric), r in rows.items():
        assert r["median"] is not None, (variant, metric)
        if variant.startswith("1->1"):
            assert r["lost"] == 0, r
        if metric in ("p50", "p99") and not variant.startswith("--shared-data"):
            assert r["samples"] == 2, r          # both kills measured
    shared = [r for (v, m), r in rows.items() if m == "lost"]
    if shared:
        assert shared[0]["median"] == 0 and shared[0]["receipted"] > 0, shared
    else:
        assert "cluster: shared-data cycles skipped: serve has no --shared-data" in results["skipped"]
    existing = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not existing & set(results["details"]["cluster"]["namespaces"].values())
