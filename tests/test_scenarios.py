"""The scenario library (scripts/scenarios/*.toml) run by pytest, one test per scenario, plus
the scenario format's own checks (errors name file, step and field; JUnit output)."""
import io
import os
import re
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
    # a handle no step before makes: caught before the broker starts
    ('name = "x"\ndescription = "d"\n[[step]]\naction = "open"\nclient = "a"\n'
     '[[step]]\naction = "produce"\nproducer = "nope"\ncount = 1\n', 2, "producer"),
    ('name = "x"\ndescription = "d"\n[[step]]\naction = "kill"\nclient = "a"\n', 1, "client"),
    ('name = "x"\ndescription = "d"\n[[step]]\naction = "open"\nclient = "a"\n'
     '[[step]]\naction = "subscribe"\nclient = "a"\nconsumer = "c"\nas = "c1"\ntopic = "/a/b"\n'
     'subscription = "s"\ntype = "shared"\n[[step]]\naction = "expect"\nconsumers = ["c1", "c"]\n'
     'count = 1\n', 3, "consumers"),
    ('name = "x"\ndescription = "d"\n[[step]]\naction = "open"\nclient = "a"\n'
     '[[step]]\naction = "subscribe"\nclient = "a"\nconsumer = "c"\ntopic = "/a/b"\n'
     'subscription = "s"\ntype = "shared"\n[[step]]\naction = "ack"\nconsumer = "c"\n'
     'messages = "first"\n', 3, "messages"),
    ('name = "x"\ndescription = "d"\n[[step]]\naction = "wait"\ntask = "t"\n', 1, "task"),
    ('name = "x"\ndescription = "d"\n[[step]]\naction = "churn"\ntopic = "/a/b"\nsubscription = "s"\n'
     'type = "shared"\nduration = 1\nrate = 1\nseed = 1\nkill_share = 7\n', 1, "kill_share"),
])
def test_errors_name_file_step_and_field(tmp_path, text, step, field):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load(path)
    assert (info.value.step, info.value.field) == (step, field)
    assert str(path) in str(info.value) and f"step {step}" in str(info.value) and field in str(info.value)


def test_handles_made_by_an_earlier_step_or_the_same_parallel_group_are_valid(tmp_path):
    path = tmp_path / "good.toml"
    path.write_text('name = "x"\ndescription = "d"\n[[step]]\naction = "parallel"\n'
                    '[[step.steps]]\naction = "open"\nclient = "a"\n'
                    '[[step.steps]]\naction = "pause"\nseconds = 0.1\n'
                    '[[step]]\naction = "producer"\nclient = "a"\nproducer = "p"\ntopic = "/a/b"\n'
                    '[[step]]\naction = "produce"\nproducer = "p"\ncount = 1\nas = "m"\n'
                    'background = true\ntask = "t"\n'
                    '[[step]]\naction = "wait"\ntask = "t"\n')
    assert [s.action for s in load(path).steps] == ["parallel", "producer", "produce", "wait"]


def test_toml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "x\n')
    with pytest.raises(ScenarioError, match="broken.toml: not valid TOML"):
        load(path)


def test_a_file_that_is_not_utf8_is_invalid_not_a_crash(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "x"\ndescription = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ScenarioError, match="latin1.toml: not UTF-8"):
        load(path)


def test_a_broker_that_does_not_start_says_why(tmp_path):
    runner, ok, out = run_text(tmp_path, 'name = "v"\ndescription = "d"\n[broker]\noptions = ["--no-such-flag"]\n'
                               + opens("a"))
    assert not ok
    assert "unrecognized arguments: --no-such-flag" in out


@pytest.mark.parametrize("stop", ["stop", "kill9"])
def test_a_reconnecting_client_finds_the_broker_started_again_after_a_stop(tmp_path, stop):
    """`start` after `stop` or `kill9` put the broker on a new port: clients with reconnect = true
    kept trying the old one (restart_broker kept it)."""
    runner, ok, out = run_text(tmp_path, f'''name = "v"
description = "d"
[[step]]
action = "open"
client = "r"
reconnect = true
reconnect_within = 20
[[step]]
action = "subscribe"
client = "r"
consumer = "c"
topic = "/scn/ssr"
subscription = "s"
type = "exclusive"
[[step]]
action = "{stop}"
[[step]]
action = "start"
[[step]]
action = "expect_reconnected"
client = "r"
within = 15
''')
    assert ok, out


def one_producer_one_consumer(topic):
    """Steps: client a opens, subscribes consumer c (shared "s") and producer p to `topic`."""
    return f'''[[step]]
action = "open"
client = "a"
[[step]]
action = "subscribe"
client = "a"
consumer = "c"
topic = "{topic}"
subscription = "s"
type = "shared"
[[step]]
action = "producer"
client = "a"
producer = "p"
topic = "{topic}"
'''


def test_failures_list_what_arrived_once_each_and_a_lost_that_never_comes(tmp_path, capsys):
    extra = tmp_path / "extra.toml"
    extra.write_text('''name = "extra"
description = "three arrive, an expect names two"
''' + one_producer_one_consumer("/t/extra") + '''[[step]]
action = "produce"
producer = "p"
count = 3
payload = "m{i}"
[[step]]
action = "expect"
consumer = "c"
count = 3
keep = true
[[step]]
action = "expect"
consumer = "c"
payloads = ["m0", "m1"]
''')
    lost = tmp_path / "lost.toml"
    lost.write_text('''name = "lost"
description = "a connection that does not end"
[[step]]
action = "open"
client = "a"
[[step]]
action = "expect_lost"
client = "a"
within = 0.5
''')

    class Args:
        files = [str(extra), str(lost)]
        keep = False
        junit = None
    assert run_command(Args) == 1
    out = capsys.readouterr().out
    assert "FAILED at step 6: 1 unexpected message(s) arrived" in out
    assert "arrived:  c: [0:m0, 1:m1, 2:m2]\n" in out
    assert "FAILED at step 2" in out and "arrived:  still connected" in out
    for kept in out.split("work dir kept: ")[1:]:
        shutil.rmtree(kept.split()[0], ignore_errors=True)


def test_a_failing_scenario_reports_expected_vs_arrived_and_writes_junit(tmp_path, capsys):
    path = tmp_path / "fails.toml"
    path.write_text('''name = "fails"
description = "expects a message that never comes"
''' + one_producer_one_consumer("/t/fails") + '''[[step]]
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


# --- runner v2: concurrency, expect_error, per-consumer stats, events --------------------------

def opens(*clients):
    """The TOML steps that open these clients."""
    return "".join(f'[[step]]\naction = "open"\nclient = "{c}"\n' for c in clients)


def run_text(tmp_path, text):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "v2.toml"
    path.write_text(text)
    out = io.StringIO()
    runner = Runner(load(path), out=out, workdir=tmp_path / "work")
    return runner, runner.run(), out.getvalue()


@pytest.mark.parametrize("text, field", [
    ('[[step]]\naction = "wait"\nwithin = 1\n', "until"),
    ('[[step]]\naction = "wait"\nuntil = "lost"\ntask = "t"\nclient = "a"\n', "until"),
    ('[[step]]\naction = "open"\nclient = "a"\ntask = "t"\n', "task"),
    ('[[step]]\naction = "kill9"\nbackground = true\n', "background"),
    ('[[step]]\naction = "parallel"\n[[step.steps]]\naction = "open"\nclient = "a"\n', "steps"),
    ('[[step]]\naction = "parallel"\n[[step.steps]]\naction = "open"\nclient = "a"\n'
     '[[step.steps]]\naction = "wait"\ntask = "x"\n', "steps"),
    ('[[step]]\naction = "parallel"\nrefused = 1\n[[step.steps]]\naction = "open"\nclient = "a"\n'
     '[[step.steps]]\naction = "open"\nclient = "b"\n', "refused"),
    ('[[step]]\naction = "producer"\nclient = "a"\nproducer = "p"\ntopic = "/a/b"\nexpect_error = "busy"\n',
     "expect_error"),
    ('[[step]]\naction = "expect_events"\nevents = [{ topic = "/a/b" }]\n', "events"),
])
def test_v2_fields_are_checked_before_anything_starts(tmp_path, text, field):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\ndescription = "d"\n' + text)
    with pytest.raises(ScenarioError) as info:
        load(path)
    assert (info.value.step, info.value.field) == (1, field)


def test_expect_events_matches_a_subsequence_in_order():
    from actorbroker.scripts.scenario.events import match_in_order
    events = [{"kind": "connection_opened"}, {"kind": "consumer_attached", "consumer_name": "a"},
              {"kind": "consumer_attached", "consumer_name": "b"}, {"kind": "promoted", "consumer_name": "b"}]
    wanted = [{"kind": "consumer_attached", "consumer_name": "a"}, {"kind": "promoted"}]
    assert match_in_order(events, wanted) == (2, 4)
    assert match_in_order(events, list(reversed(wanted)))[0] == 1      # order matters
    assert match_in_order(events, [{"kind": "promoted", "consumer_name": "a"}])[0] == 0


def test_expect_error_on_each_kind_of_action_and_per_consumer_stats(tmp_path):
    runner, ok, out = run_text(tmp_path, '''name = "errors"
description = "each action refused as expected, and consumer fields in stats"
''' + opens("a", "b") + '''[[step]]
action = "producer"
client = "a"
producer = "only"
topic = "/t/errors"
access = "exclusive"
[[step]]
action = "producer"
client = "b"
producer = "second"
topic = "/t/errors"
expect_error = "PRODUCER_BUSY"
[[step]]
action = "subscribe"
client = "a"
consumer = "w"
as = "old"
topic = "/t/errors"
subscription = "s"
type = "exclusive"
dispatch = "reliable"
credits = 3
[[step]]
action = "expect_stats"
client = "a"
topic = "/t/errors"
subscription = "s"
consumer = "old"
values = { credits = 3, unacked = 0, active = true }
[[step]]
action = "subscribe"
client = "b"
consumer = "w"
as = "new"
topic = "/t/errors"
subscription = "s"
type = "exclusive"
[[step]]
action = "expect_closed"
consumer = "old"
reason = "replaced"
[[step]]
action = "ack"
consumer = "old"
ids = [0]
expect_error = "UNKNOWN_CONSUMER"
[[step]]
action = "flow"
consumer = "old"
credits = 5
expect_error = "UNKNOWN_CONSUMER"
[[step]]
action = "subscribe"
client = "b"
consumer = "x"
topic = "/t/errors"
subscription = "s"
type = "shared"
expect_error = "TYPE_MISMATCH"
[[step]]
action = "produce"
producer = "only"
count = 2
expect_error = "CONSUMER_BUSY"
''')
    assert not ok
    assert "refused with PRODUCER_BUSY, as expected" in out
    assert "credits=3, unacked=0, active=True" in out
    assert out.count("refused with UNKNOWN_CONSUMER, as expected") == 2
    assert "refused with TYPE_MISMATCH, as expected" in out
    assert "FAILED at step 12: all 2 receipted, expected CONSUMER_BUSY" in out   # and the opposite


def test_a_background_step_runs_while_the_next_ones_do_and_its_failure_is_reported(tmp_path):
    runner, ok, out = run_text(tmp_path, '''name = "background"
description = "a background expect that cannot pass, a step after it, the wait"
''' + opens("a") + '''[[step]]
action = "subscribe"
client = "a"
consumer = "c"
topic = "/t/bg"
subscription = "s"
type = "shared"
[[step]]
action = "expect"
consumer = "c"
count = 1
within = 1
background = true
task = "never"
[[step]]
action = "expect_stats"
client = "a"
topic = "/t/bg"
values = { msgs_in = 0 }
[[step]]
action = "wait"
task = "never"
''')
    assert not ok
    assert "started in the background (task never)" in out
    assert out.index("[ 4] expect_stats") < out.index("(background task never) ... FAILED")
    assert "FAILED at step 3: timed out after 1s waiting for 1 messages" in out


# --- acceptance defects: agents' lifetime, expect checks, churn, validation ---------------------

# clients a and b opened in a parallel group, c in a background step (then waited for)
OPENED_IN_THREADS = '''[[step]]
action = "parallel"
[[step.steps]]
action = "open"
client = "a"
[[step.steps]]
action = "open"
client = "b"
[[step]]
action = "open"
client = "c"
background = true
task = "o"
[[step]]
action = "wait"
task = "o"
'''


def test_clients_opened_in_a_parallel_group_or_a_background_step_stay_open(tmp_path):
    """The agents asked for SIGKILL when their parent died (PR_SET_PDEATHSIG), which the kernel
    sends when the *thread* that started them ends: a client opened in a parallel group or a
    background step was killed as soon as that step ended ("client a is not running")."""
    runner, ok, out = run_text(tmp_path, '''name = "opened-in-threads"
description = "clients opened in a parallel group and in the background are used later"
''' + OPENED_IN_THREADS + '''[[step]]
action = "subscribe"
client = "a"
consumer = "ca"
topic = "/scn/threads"
subscription = "s"
type = "shared"
[[step]]
action = "subscribe"
client = "c"
consumer = "cc"
topic = "/scn/threads"
subscription = "s2"
type = "shared"
[[step]]
action = "producer"
client = "b"
producer = "p"
topic = "/scn/threads"
[[step]]
action = "produce"
producer = "p"
count = 3
as = "m"
[[step]]
action = "expect"
consumer = "ca"
messages = "m"
within = 5
[[step]]
action = "expect"
consumer = "cc"
messages = "m"
within = 5
''')
    assert ok, out


def test_a_runner_killed_with_sigkill_leaves_no_client_agent_behind(tmp_path):
    """Agents die with the runner (not with the thread that started them): every agent, also
    those opened in a parallel group or a background step, and a frozen one, and the broker."""
    import signal
    import subprocess
    import sys
    import time
    path = tmp_path / "killed.toml"
    path.write_text('''name = "killed"
description = "the runner is killed with SIGKILL during the pause"
''' + OPENED_IN_THREADS + '''[[step]]
action = "open"
client = "d"
[[step]]
action = "freeze"
client = "a"
[[step]]
action = "pause"
seconds = 120
''')
    env = dict(os.environ, TMPDIR=str(tmp_path))
    runner = subprocess.Popen([sys.executable, "-m", "actorbroker.scripts.cli", "scenario", "run", str(path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tree = []
    try:
        lines = []
        for line in runner.stdout:
            lines.append(line)
            if "freeze client=a ... ok" in line:
                break
        else:
            pytest.fail("the runner ended early:\n" + "".join(lines))
        tree = [p for p in proctree.descendants(runner.pid) if p != runner.pid]
        agents = []
        for pid in tree:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"actorbroker.scripts.scenario.agent" in f.read():
                        agents.append(pid)
            except OSError:
                pass
        assert len(agents) == 4, "".join(lines)
        runner.kill()
        runner.wait()
        deadline = time.monotonic() + 30
        while any(proctree.alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in agents if proctree.alive(p)], "client agents outlived the runner"
        assert not [p for p in tree if proctree.alive(p)], "broker processes outlived the runner"
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        for pid in tree:   # this test's own descendants, by PID
            if proctree.alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


def test_sticky_keys_fails_when_one_key_is_split_between_two_live_consumers_in_one_expect(tmp_path):
    """A shared subscription round-robins one key over two consumers: sticky_keys compared each
    key only with its owner at earlier expects, so a split within one expect passed."""
    runner, ok, out = run_text(tmp_path, '''name = "split"
description = "one key to both consumers of a shared subscription"
''' + opens("a", "b") + '''[[step]]
action = "subscribe"
client = "a"
consumer = "s1"
topic = "/scn/split"
subscription = "sh"
type = "shared"
[[step]]
action = "subscribe"
client = "b"
consumer = "s2"
topic = "/scn/split"
subscription = "sh"
type = "shared"
[[step]]
action = "producer"
client = "a"
producer = "p"
topic = "/scn/split"
[[step]]
action = "produce"
producer = "p"
count = 20
keys = ["k0"]
as = "m"
[[step]]
action = "expect"
consumers = ["s1", "s2"]
messages = "m"
sticky_keys = true
within = 5
''')
    assert not ok
    assert "FAILED at step 7: key 'k0' went to s1 and s2, both still attached" in out


def payloads_scenario(payloads):
    return f'''name = "payloads"
description = "three payloads arrive, an expect with only = false lists some of them"
''' + one_producer_one_consumer("/scn/pof") + f'''[[step]]
action = "produce"
producer = "p"
count = 3
payload = "pl-{{i}}"
[[step]]
action = "expect"
consumer = "c"
payloads = {payloads}
only = false
within = 5
'''


def test_payloads_with_only_false_are_a_subsequence_in_order(tmp_path):
    """With only = false, pl-1 arriving between pl-0 and pl-2 failed "not in the expected order"."""
    runner, ok, out = run_text(tmp_path / "in-order", payloads_scenario('["pl-0", "pl-2"]'))
    assert ok, out
    runner, ok, out = run_text(tmp_path / "reversed", payloads_scenario('["pl-2", "pl-0"]'))
    assert not ok
    assert "FAILED at step 5: payloads not in the expected order" in out


def test_expect_lost_code_matches_the_whole_error_code(tmp_path):
    """`code = "CONSUMER"` passed for a connection ended after SLOW_CONSUMER (a substring)."""
    text = '''name = "cut"
description = "a client cut off with SLOW_CONSUMER"
[broker]
options = ["--max-pending-bytes", "262144"]
[[step]]
action = "open"
client = "slow"
[[step]]
action = "flood"
client = "slow"
within = 30
[[step]]
action = "expect_lost"
client = "slow"
code = "{code}"
'''
    runner, ok, out = run_text(tmp_path / "part", text.format(code="CONSUMER"))
    assert not ok
    assert "FAILED at step 3: the connection ended without CONSUMER" in out
    assert "arrived:  SLOW_CONSUMER" in out
    runner, ok, out = run_text(tmp_path / "whole", text.format(code="SLOW_CONSUMER"))
    assert ok, out


def test_churn_with_min_consumers_equal_to_max_consumers_replaces_one_at_each_event(tmp_path):
    """min_consumers = max_consumers (valid) crashed with IndexError: at the first event neither
    an attach nor a leave was allowed. Each event now replaces one consumer (it leaves, a new one
    attaches), so the count stays at 2."""
    runner, ok, out = run_text(tmp_path, '''name = "churn-fixed-count"
description = "churn at a constant number of consumers"
[[step]]
action = "churn"
topic = "/scn/chmm"
subscription = "w"
type = "shared"
duration = 2
rate = 2
seed = 1
min_consumers = 2
max_consumers = 2
''')
    assert ok, out
    assert "6 attach, " in out                      # 2 at the start, then 4 events: 4 replacements
    leaves = [int(n) for n in re.findall(r"(\d+) clean detach, (\d+) kill -9", out)[0]]
    assert sum(leaves) == 4, out


OPEN_A = '[[step]]\naction = "open"\nclient = "a"\n'
PRODUCER_P = OPEN_A + '[[step]]\naction = "producer"\nclient = "a"\nproducer = "p"\ntopic = "/a/b"\n'
CHURN = '[[step]]\naction = "churn"\ntopic = "/a/b"\nsubscription = "s"\ntype = "shared"\nseed = 1\n'


@pytest.mark.parametrize("text, step, field, says", [
    # non-finite numbers: `within = inf` hung, `seconds = inf` failed at run time (OverflowError)
    ('[[step]]\naction = "pause"\nseconds = inf\n', 1, "seconds", "finite"),
    ('[[step]]\naction = "pause"\nseconds = nan\n', 1, "seconds", "finite"),
    ('[[step]]\naction = "pause"\nseconds = -inf\n', 1, "seconds", "finite"),
    (OPEN_A + '[[step]]\naction = "expect_lost"\nclient = "a"\nwithin = inf\n', 2, "within", "finite"),
    (OPEN_A + '[[step]]\naction = "expect_stats"\nclient = "a"\ntopic = "/a/b"\nvalues = { backlog = nan }\n',
     2, "values", "finite"),
    (CHURN + 'duration = 1\nrate = 1\nkill_share = nan\n', 1, "kill_share", "finite"),
    # out of range: rate = 1e-300 failed at run time (OverflowError), the others ran for ever
    (PRODUCER_P + '[[step]]\naction = "produce"\nproducer = "p"\ncount = 2\nrate = 1e-300\n', 3, "rate", "86400"),
    (PRODUCER_P + '[[step]]\naction = "produce"\nproducer = "p"\ncount = 1000\nrate = 0.01\n', 3, "rate",
     "more than 86400"),
    ('[[step]]\naction = "pause"\nseconds = 1e9\n', 1, "seconds", "at most 86400"),
    (OPEN_A + '[[step]]\naction = "wait"\nuntil = "lost"\nclient = "a"\nwithin = 1e300\n', 2, "within", "86400"),
    ('[[step]]\naction = "open"\nclient = "a"\nreconnect = true\nreconnect_within = 1e12\n', 1,
     "reconnect_within", "86400"),
    (CHURN + 'duration = 1e7\nrate = 1\n', 1, "duration", "86400"),
    (CHURN + 'duration = 10\nrate = 1e300\n', 1, "rate", "100"),
    (CHURN + 'duration = 10\nrate = 1\nproduce_rate = 1e-300\n', 1, "produce_rate", "86400"),
    (CHURN + 'duration = 10\nrate = 1\nmax_consumers = 100000\n', 1, "max_consumers", "100"),
    (CHURN + 'duration = 10\nrate = 1\nkeys = 1000000000000\n', 1, "keys", "100000"),
    ('[[step]]\naction = "open"\nclient = "a"\nheartbeat_ms = 99999999999999999999999\n', 1, "heartbeat_ms",
     "18446744073709551615"),
])
def test_non_finite_and_out_of_range_numbers_are_refused_before_anything_starts(tmp_path, text, step, field, says):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\ndescription = "d"\n' + text)
    with pytest.raises(ScenarioError) as info:
        load(path)
    assert (info.value.step, info.value.field) == (step, field)
    assert says in str(info.value).split(f"field '{field}': ", 1)[1]   # not in the path


def test_a_flagged_redelivery_seen_before_the_original_delivery_is_no_duplicate(tmp_path):
    """Deliveries reach the runner through one pipe per client process, so a flagged redelivery to
    the new active consumer can be read before the original, unflagged delivery to the old one
    (found in a failover churn: "duplicate: id 2098 delivered again ... without the redelivery
    flag", the old active consumer's events read 6 ms after the new one's). The check took any
    id seen before, flagged or not, for a first delivery. Here the runner reads the old
    consumer's messages only once the first redelivery was read: the same order, every time."""

    class LateReader(Runner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.held = []

        def on_event(self, agent, ev):
            if ev.get("event") == "message" and ev.get("consumer") == "ca" and agent is not None:
                self.held.append((agent, ev))          # read later (under self.cond, as always)
                return
            super().on_event(agent, ev)
            if ev.get("event") == "message" and ev.get("consumer") == "cb" and ev["redeliveries"]:
                for a, late in self.held:
                    super().on_event(a, late)
                self.held.clear()

        def step_kill(self, s):   # once the client of ca wrote its 3 messages
            self.wait_until(lambda: len(self.held) == 3, 10, "ca's 3 messages")
            return super().step_kill(s)

    path = tmp_path / "late.toml"
    path.write_text('''name = "late"
description = "the old active consumer's deliveries are read after the new one's redeliveries"
''' + opens("a", "b") + '''[[step]]
action = "subscribe"
client = "a"
consumer = "ca"
topic = "/scn/late"
subscription = "s"
type = "failover"
dispatch = "reliable"
ack = "manual"
[[step]]
action = "subscribe"
client = "b"
consumer = "cb"
topic = "/scn/late"
subscription = "s"
type = "failover"
dispatch = "reliable"
[[step]]
action = "expect_active"
consumer = "ca"
active = true
[[step]]
action = "producer"
client = "b"
producer = "p"
topic = "/scn/late"
[[step]]
action = "produce"
producer = "p"
count = 3
as = "m"
[[step]]
action = "kill"
client = "a"
[[step]]
action = "expect"
consumer = "cb"
messages = "m"
redelivered = true
within = 10
[[step]]
action = "expect"
consumer = "ca"
messages = "m"
redelivered = false
''')
    out = io.StringIO()
    ok = LateReader(load(path), out=out, workdir=tmp_path / "work").run()
    assert ok, out.getvalue()
