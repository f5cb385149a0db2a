"""`actorbroker bench --quick` runs every scenario end to end and writes its JSON (no timing checks)."""
import json
import subprocess
import sys

import pytest

from actorbroker.scripts.bench import ALL_SCENARIOS
from actorbroker.scripts.broker_process import ROOT


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
    # The brokers it started were stopped without leaving a process behind (BrokerProcess.stop).
    assert not [f for f in results["failures"] if "left after stop" in f], results["failures"]
