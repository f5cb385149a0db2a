"""The scenario library (scripts/scenarios/*.toml) run by pytest, one test per scenario, plus
the scenario format's own checks (errors name file, step and field; JUnit output)."""
import io
import os
import shutil
import xml.etree.ElementTree as ET

import pytest

from actorbroker.scripts import proctree
from actorbroker.scripts.scenario import run_command
from actorbroker.scripts.scenario.format import ScenarioError, library, load
from actorbroker.scripts.scenario.runner import Runner

SLOW = os.environ.get("ACTORBROKER_SLOW") == "1"


def _param(path):
    marks = []
    if load(path).slow:
        marks = [pytest.mark.slow,
                 pytest.mark.skipif(not SLOW, reason="slow scenario: set ACTORBROKER_SLOW=1")]
    return pytest.param(path, id=path.stem, marks=marks)


@pytest.mark.parametrize("path", [_param(p) for p in library()])
def test_library_scenario(path, tmp_path):
    out = io.StringIO()
    runner = Runner(load(path), out=out, workdir=tmp_path / "work")
    ok = runner.run()
    assert ok, "\n" + out.getvalue()
    if runner.skipped:
        pytest.skip(runner.skipped)
    for agent in runner.all_agents:
        assert not proctree.alive(agent.pid), f"client agent {agent.pid} left behind"


def test_the_library_is_not_empty_and_valid():
    names = [load(p).name for p in library()]
    assert len(names) >= 10
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("text, step, field", [
    ('name = "x"\ndescription = "d"\n[[step]]\naction = "open"\n', 1, "client"),
    ('name = "x"\ndescription = "d"\n[[step]]\naction = "open"\nclient = "a"\n'
     '[[step]]\naction = "subscribe"\nclient = "a"\nconsumer = "c"\ntopic = "/a/b"\n'
     'subscription = "s"\ntype = "roundrobin"\n', 2, "type"),
    ('name = "x"\ndescription = "d"\n[[step]]\naction = "fly"\n', 1, "action"),
    ('name = "x"\ndescription = "d"\n[[step]]\naction = "pause"\nseconds = 1\nsecs = 2\n', 1, "secs"),
    ('name = "x"\ndescription = "d"\n[[step]]\naction = "expect"\nconsumer = "c"\n', 1, "messages"),
])
def test_errors_name_file_step_and_field(tmp_path, text, step, field):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load(path)
    assert (info.value.step, info.value.field) == (step, field)
    assert str(path) in str(info.value) and f"step {step}" in str(info.value) and field in str(info.value)


def test_toml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "x\n')
    with pytest.raises(ScenarioError, match="broken.toml: not valid TOML"):
        load(path)


def test_a_failing_scenario_reports_expected_vs_arrived_and_writes_junit(tmp_path, capsys):
    path = tmp_path / "fails.toml"
    path.write_text('''name = "fails"
description = "expects a message that never comes"
[[step]]
action = "open"
client = "a"
[[step]]
action = "subscribe"
client = "a"
consumer = "c"
topic = "/t/fails"
subscription = "s"
type = "shared"
[[step]]
action = "producer"
client = "a"
producer = "p"
topic = "/t/fails"
[[step]]
action = "produce"
producer = "p"
count = 2
payload = "m{i}"
[[step]]
action = "expect"
consumer = "c"
payloads = ["m0", "m1", "never"]
within = 0.5
[[step]]
action = "pause"
seconds = 1
''')
    junit = tmp_path / "out.xml"

    class Args:
        files = [str(path)]
        keep = False
    Args.junit = str(junit)
    assert run_command(Args) == 1
    out = capsys.readouterr().out
    assert "FAILED at step 5" in out
    assert "expected: payloads ['m0', 'm1', 'never']" in out
    assert "arrived:  c: [0:m0, 1:m1]" in out
    assert "broker log tail:" in out
    kept = out.split("work dir kept: ")[1].split()[0]
    shutil.rmtree(kept, ignore_errors=True)
    case = ET.parse(junit).getroot().find("testsuite/testcase")
    assert case.get("name") == "fails"
    assert "step 5" in case.find("failure").get("message")
