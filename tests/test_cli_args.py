"""The numeric flags of the client commands (produce, consume, events, top) are checked by argparse:
a value out of range is exit 2 with one line naming the flag, not a traceback at run time."""
import subprocess
import sys

import pytest

from actorbroker.scripts.cli import build_parser
from tests.util import ROOT

URL = ["--url", "127.0.0.1:1"]   # never reached: the arguments are refused first


@pytest.mark.parametrize("argv, flag", [
    (["top", "--interval", "-1", "--once"], "--interval"),        # was: ValueError in time.sleep
    (["top", "--interval", "nan", "--once"], "--interval"),       # was: ValueError in time.sleep
    (["top", "--interval", "inf", "--once"], "--interval"),
    (["top", "--interval", "1e300", "--once"], "--interval"),     # was: OverflowError
    (["top", "--interval", "0"], "--interval"),
    (["consume", "/a/b", "-s", "s", "--timeout", "inf"], "--timeout"),    # was: OverflowError
    (["consume", "/a/b", "-s", "s", "--timeout", "1e300"], "--timeout"),  # was: OverflowError
    (["consume", "/a/b", "-s", "s", "--timeout", "nan"], "--timeout"),
    (["consume", "/a/b", "-s", "s", "--ack-timeout-ms", "100000000000000000000000"], "--ack-timeout-ms"),
    (["consume", "/a/b", "-s", "s", "--ack-timeout-ms", "604800001"], "--ack-timeout-ms"),
    (["consume", "/a/b", "-s", "s", "--max-unacked", "100000000000000000000000"], "--max-unacked"),
    (["consume", "/a/b", "-s", "s", "--max-redeliveries", "18446744073709551616"], "--max-redeliveries"),
    (["consume", "/a/b", "-s", "s", "--nack-every", "0"], "--nack-every"),
    (["consume", "/a/b", "-s", "s", "-n", "x"], "-n/--count"),
    (["produce", "/a/b", "-m", "x", "--rate", "1e-300"], "--rate"),   # was: OverflowError in time.sleep
    (["produce", "/a/b", "-m", "x", "--rate", "inf"], "--rate"),
    (["produce", "/a/b", "-m", "x", "--rate", "nan"], "--rate"),
    (["produce", "/a/b", "-m", "x", "-n", "-3"], "-n/--count"),
    (["events", "-n", "0"], "-n/--count"),
])
def test_numeric_flags_out_of_range_are_refused_by_argparse(capsys, argv, flag):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv + URL)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: " in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, field, value", [
    (["top", "--interval", "0.2", "--once"], "interval", 0.2),
    (["consume", "/a/b", "-s", "s", "--timeout", "86400"], "timeout", 86400.0),
    (["consume", "/a/b", "-s", "s", "--ack-timeout-ms", "604800000"], "ack_timeout_ms", 604800000),
    (["consume", "/a/b", "-s", "s", "--max-unacked", "4294967295"], "max_unacked", 4294967295),
    (["produce", "/a/b", "-m", "x", "--rate", "0.5"], "rate", 0.5),
])
def test_numeric_flags_in_range_are_taken(argv, field, value):
    assert getattr(build_parser().parse_args(argv + URL), field) == value


def test_the_reported_invocations_end_with_exit_2_and_one_line():
    """The three command lines of the report, as a user runs them."""
    for argv in (["top", "--interval", "-1", "--once"], ["top", "--interval", "nan", "--once"],
                 ["consume", "/a/b", "-s", "s", "--timeout", "inf", "-n", "1"]):
        out = subprocess.run([sys.executable, "-m", "actorbroker.scripts.cli", *argv, *URL], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
        assert [line for line in out.stderr.splitlines() if "error:" in line] == \
            [out.stderr.splitlines()[-1]], out.stderr
