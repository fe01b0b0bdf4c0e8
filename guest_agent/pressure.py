"""The guest's memory pressure, read from Linux and reported to the broker.

The broker weighs each guest's latest report when it shares persistent memory out under
pressure (a guest under real pressure keeps more than an idle one of the same weight); reports
older than the broker's ``pressure_ttl_s`` count for nothing, so an agent reports periodically::

    from guest_agent.pressure import PressureReporter, read_linux_pressure

    read_linux_pressure()        # {"psi_some_avg10": 0.4, "psi_full_avg10": 0.0,
                                 #  "mem_available_bytes": ..., "swap_used_bytes": ...}
    reporter = PressureReporter(client, interval=10.0)   # a TmemClient
    reporter.start()             # a daemon thread: report now, then every 10 s
    reporter.stop()

or from the command line: ``tmem-agent report-pressure --interval 10`` (``--once`` for one).

Where the data comes from: ``/proc/pressure/memory`` (PSI, Linux >= 4.20 with
``CONFIG_PSI``; the ``some``/``full`` lines' ``avg10``, percent of the last 10 s in which some
or all tasks stalled on memory) and ``/proc/meminfo`` (``MemAvailable``, ``SwapTotal -
SwapFree``, in kB). A figure the kernel does not offer is left out of the report.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guest_agent.errors import TmemClientError

if TYPE_CHECKING:
    import typer

    from guest_agent.client import TmemClient

log = logging.getLogger(__name__)

Figures = dict[str, float | int]


def _psi(text: str) -> Figures:
    out: Figures = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind not in ("some", "full"):
            continue
        for item in rest.split():
            name, _, value = item.partition("=")
            if name == "avg10":
                with contextlib.suppress(ValueError):
                    out[f"psi_{kind}_avg10"] = min(100.0, max(0.0, float(value)))
    return out


def _meminfo(text: str) -> Figures:
    kb: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if name in ("MemAvailable", "SwapTotal", "SwapFree") and fields and fields[0].isdigit():
            kb[name] = int(fields[0])
    out: Figures = {}
    if "MemAvailable" in kb:
        out["mem_available_bytes"] = kb["MemAvailable"] * 1024
    if "SwapTotal" in kb and "SwapFree" in kb:
        out["swap_used_bytes"] = max(0, kb["SwapTotal"] - kb["SwapFree"]) * 1024
    return out


def read_linux_pressure(proc: str | Path = "/proc") -> Figures:
    """The guest's pressure figures, named as ``POST /v1/self/pressure`` takes them.

    ``proc`` is where procfs is mounted (tests pass a directory of their own). Files that are
    missing or unreadable contribute nothing."""
    root = Path(proc)
    out: Figures = {}
    for name, parse in (("pressure/memory", _psi), ("meminfo", _meminfo)):
        try:
            text = (root / name).read_text()
        except OSError:
            continue
        out.update(parse(text))
    return out


class PressureReporter:
    """Reports ``read()`` to the broker every ``interval`` seconds from a daemon thread.

    A failed report (broker down, say) is logged and counted in ``failures``; the next one
    is tried on schedule."""

    def __init__(
        self,
        client: TmemClient,
        interval: float = 10.0,
        *,
        read: Callable[[], Figures] = read_linux_pressure,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.client = client
        self.interval = interval
        self.read = read
        self.reports = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def report_once(self) -> Figures:
        """Read and report once; returns what was sent."""
        figures = self.read()
        self.client.report_pressure(
            psi_some_avg10=_float(figures.get("psi_some_avg10")),
            psi_full_avg10=_float(figures.get("psi_full_avg10")),
            mem_available_bytes=_int(figures.get("mem_available_bytes")),
            swap_used_bytes=_int(figures.get("swap_used_bytes")),
        )
        self.reports += 1
        return figures

    def _main(self) -> None:
        while not self._stop.is_set():
            try:
                self.report_once()
            except TmemClientError as exc:
                self.failures += 1
                log.warning("pressure report failed: %s", exc)
            self._stop.wait(self.interval)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._main, name="tmem-pressure", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


def _float(value: float | int | None) -> float | None:
    return None if value is None else float(value)


def _int(value: float | int | None) -> int | None:
    return None if value is None else int(value)


def register(app: typer.Typer) -> None:
    """Add ``tmem-agent report-pressure`` (see :mod:`guest_agent.cli`)."""
    import json

    import typer

    from guest_agent.client import TmemClient

    # Options as defaults, not Annotated aliases: with postponed annotations typer resolves
    # names in this module's globals, where a local import is not visible.
    def report_pressure(
        broker: str = typer.Option(..., "--broker", envvar="TMEM_BROKER_URL", help="broker URL"),
        token: str = typer.Option(..., "--token", envvar="TMEM_TOKEN", help="the guest's token"),
        interval: float = typer.Option(10.0, help="seconds between reports"),
        once: bool = typer.Option(False, help="report once, print it and exit"),
        proc: str = typer.Option("/proc", help="where procfs is mounted"),
    ) -> None:
        """Report this guest's memory pressure (PSI, meminfo) to the broker periodically."""
        with TmemClient(broker, token, timeout=30.0) as client:
            reporter = PressureReporter(client, interval, read=lambda: read_linux_pressure(proc))
            if once:
                try:
                    figures: dict[str, Any] = reporter.report_once()
                except TmemClientError as exc:
                    typer.echo(f"error: {exc}", err=True)
                    raise typer.Exit(1) from exc
                typer.echo(json.dumps(figures))
                return
            reporter.start()
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass
            finally:
                reporter.stop()

    app.command("report-pressure")(report_pressure)
