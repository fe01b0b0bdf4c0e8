"""The test helpers' own promise: what a test run starts does not outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.brokerproc import dies_with_us

pytestmark = pytest.mark.timeout(60)

_PARENT = """
import subprocess, sys
from tests.e2e.brokerproc import dies_with_us
child = subprocess.Popen(dies_with_us(["sleep", "600"]))
print(child.pid, flush=True)
sys.stdin.read()  # until the test kills us
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, only not yet reaped
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


@pytest.mark.skipif(dies_with_us(["x"]) == ["x"], reason="util-linux setpriv is not installed")
def test_a_child_started_through_dies_with_us_is_killed_with_its_parent() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _PARENT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    ) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        try:
            assert _alive(child)
            # setpriv sets the death signal and then execs: wait until it has (on a loaded
            # machine the parent could otherwise die first, before anything was set)
            deadline = time.monotonic() + 10
            while _comm(child) != "sleep" and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _comm(child) == "sleep"
            parent.send_signal(signal.SIGKILL)  # as a test run stopped hard: no teardown runs
            parent.wait()
            deadline = time.monotonic() + 10
            while _alive(child) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(child)
        finally:
            if _alive(child):
                os.kill(child, signal.SIGKILL)
