"""The export rides out a broker crash: writes go to the fallback file while the broker is down,
reads of broker blocks wait for it to come back, and every byte reads back as written."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.brokerproc import BrokerProcess
from tests.e2e.nbd_support import NbdAgent, new_guest, persistent_pages, run

pytestmark = [
    pytest.mark.timeout(170),
    pytest.mark.skipif(not shutil.which("qemu-io"), reason="needs qemu-utils"),
]


def qemu_io(uri: str, *commands: str) -> list[str]:
    args = ["qemu-io", "-f", "raw", uri]
    for command in commands:
        args += ["-c", command]
    return args


def test_broker_crash_and_restart_under_the_export(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "broker")
    broker.start()
    try:
        guest_id, token = new_guest(broker, "restart")
        with NbdAgent.for_broker(broker, token, tmp_path) as agent:
            run(qemu_io(agent.uri, "write -P 0x5a 0 4M", "flush"))
            assert persistent_pages(broker, guest_id) == 1024
            broker.kill()  # SIGKILL: acknowledged persistent pages must survive it
            # while the broker is down, writes land in the fallback file
            run(qemu_io(agent.uri, "write -P 0x77 8M 1M", "flush"))
            # a read of broker blocks waits for the broker...
            reader = subprocess.Popen(
                qemu_io(agent.uri, "read -P 0x5a 0 4M", "read -P 0x77 8M 1M"),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            time.sleep(1.0)
            assert reader.poll() is None
            broker.start()  # same port, same data dir
            out, _ = reader.communicate(timeout=60)
            assert reader.returncode == 0, out
            assert "fail" not in out.lower(), out
            assert out.count("read ") == 2, out
            # ...and a new write goes to the broker again
            run(qemu_io(agent.uri, "write -P 0x33 12M 64k", "flush"))
            out = run(qemu_io(agent.uri, "read -P 0x33 12M 64k")).stdout
            assert "fail" not in out.lower(), out
            assert persistent_pages(broker, guest_id) == 1024 + 16
    finally:
        broker.stop()
