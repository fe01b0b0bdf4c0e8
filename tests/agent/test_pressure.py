"""guest_agent.pressure: reading PSI and meminfo, and reporting them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from guest_agent.client import TmemClient
from guest_agent.pressure import PressureReporter, read_linux_pressure

from .fake_broker import FakeBroker

PSI = """some avg10=12.50 avg60=3.00 avg300=1.00 total=123456
full avg10=2.25 avg60=0.50 avg300=0.10 total=4567
"""
MEMINFO = """MemTotal:        4014560 kB
MemFree:          112344 kB
MemAvailable:    1048576 kB
SwapTotal:       2097148 kB
SwapFree:        1048572 kB
"""


def fake_proc(root: Path, psi: str | None = PSI, meminfo: str | None = MEMINFO) -> Path:
    (root / "pressure").mkdir(parents=True)
    if psi is not None:
        (root / "pressure" / "memory").write_text(psi)
    if meminfo is not None:
        (root / "meminfo").write_text(meminfo)
    return root


def test_reads_psi_and_meminfo(tmp_path: Path) -> None:
    assert read_linux_pressure(fake_proc(tmp_path)) == {
        "psi_some_avg10": 12.5,
        "psi_full_avg10": 2.25,
        "mem_available_bytes": 1048576 * 1024,
        "swap_used_bytes": (2097148 - 1048572) * 1024,
    }


def test_a_kernel_without_psi_reports_meminfo_only(tmp_path: Path) -> None:
    figures = read_linux_pressure(fake_proc(tmp_path, psi=None))
    assert set(figures) == {"mem_available_bytes", "swap_used_bytes"}
    assert read_linux_pressure(tmp_path / "nowhere") == {}
    garbled = read_linux_pressure(fake_proc(tmp_path / "g", psi="some avg10=x\n", meminfo="?"))
    assert garbled == {}


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="not Linux")
def test_reads_this_machine() -> None:
    figures = read_linux_pressure()
    assert figures["mem_available_bytes"] > 0
    assert 0.0 <= figures.get("psi_some_avg10", 0.0) <= 100.0


def test_the_reporter_sends_what_it_reads(tmp_path: Path) -> None:
    broker = FakeBroker()
    client = TmemClient("http://broker", broker.token, transport=broker.transport())
    proc = fake_proc(tmp_path)
    reporter = PressureReporter(client, 0.01, read=lambda: read_linux_pressure(proc))
    reporter.report_once()
    assert broker.pressure[0] == {
        "psi_some_avg10": 12.5,
        "psi_full_avg10": 2.25,
        "mem_available_bytes": 1048576 * 1024,
        "swap_used_bytes": (2097148 - 1048572) * 1024,
    }


@pytest.mark.timeout(30)
def test_the_reporter_thread_reports_periodically_and_survives_a_down_broker() -> None:
    broker = FakeBroker()
    client = TmemClient("http://broker", broker.token, transport=broker.transport())
    sent = threading.Semaphore(0)

    def read() -> dict[str, float | int]:
        sent.release()
        return {"psi_some_avg10": 1.0}

    reporter = PressureReporter(client, 0.01, read=read)
    broker.down = True
    reporter.start()
    for _ in range(3):
        assert sent.acquire(timeout=10)
    broker.down = False
    for _ in range(3):
        assert sent.acquire(timeout=10)
    reporter.stop()
    assert reporter.failures >= 1 and broker.pressure
    assert broker.pressure[-1] == {"psi_some_avg10": 1.0}
