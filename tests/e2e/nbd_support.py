"""Real processes for the NBD end-to-end tests: a broker, a guest, and ``tmem-agent nbd``.

::

    with BrokerProcess(tmp / "broker") as broker:
        guest_id, token = new_guest(broker, "vm", cap_pages=None)
        with NbdAgent.for_broker(broker, token, tmp, size="64MiB") as agent:
            subprocess.run(["qemu-io", "-f", "raw", agent.uri, "-c", "read 0 4k"])

``NbdAgent.in_memory(...)`` serves from the agent's memory (no broker). A broker that also
listens on a Unix socket, and an agent that reaches it there (the co-located setup)::

    with UdsBrokerProcess(tmp / "broker", uds=tmp / "broker.sock") as broker:
        with NbdAgent.for_broker(broker, token, tmp, url=broker.unix_url) as agent:
            ...
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.e2e.brokerproc import BrokerProcess, dies_with_us, free_port

AGENT = [str(Path(sys.executable).parent / "tmem-agent"), "nbd"]


def new_guest(broker: BrokerProcess, name: str, *, cap_pages: int | None = None) -> tuple[int, str]:
    """Create a guest through the admin API; returns (guest_id, token)."""
    created = broker.json("POST", "/v1/guests", {"name": name, "cap_pages": cap_pages}, expect=201)
    return int(created["guest_id"]), str(created["token"])


def persistent_pages(broker: BrokerProcess, guest_id: int) -> int:
    """The persistent pages the broker holds for a guest (its pools' page counts)."""
    guest = broker.json("GET", f"/v1/guests/{guest_id}")
    return sum(
        int(pool.get("pages", 0))
        for pool in guest.get("pools", [])
        if pool.get("kind") == "persistent"
    )


def wait_for_an_acked_shed(broker: BrokerProcess, timeout: float = 60) -> dict[str, Any]:
    """The broker's pressure stats once a guest acked a shed (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    pressure: dict[str, Any] = broker.json("GET", "/v1/stats")["pressure"]
    while pressure["sheds_acked"] < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        pressure = broker.json("GET", "/v1/stats")["pressure"]
    return pressure


class UdsBrokerProcess(BrokerProcess):
    """A :class:`BrokerProcess` that also listens on the Unix socket ``uds``
    (``tmem-broker serve --uds``, given here as ``TMEM_UDS``); agents reach it at
    :attr:`unix_url`."""

    def __init__(
        self, data_dir: Path, *, uds: Path, nbd_dir: Path | None = None, **kwargs: Any
    ) -> None:
        super().__init__(data_dir, **kwargs)
        self.uds = uds
        self.nbd_dir = nbd_dir  # --nbd-dir: the broker serves exports itself (TMEM_NBD_DIR)

    @property
    def unix_url(self) -> str:
        return f"unix:{self.uds}"

    def start(self, timeout: float = 60.0) -> None:
        env = {"TMEM_UDS": str(self.uds)}
        if self.nbd_dir is not None:
            env["TMEM_NBD_DIR"] = str(self.nbd_dir)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the child inherits them at Popen
        try:
            super().start(timeout)
        finally:
            for k, v in saved.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v
        deadline = time.monotonic() + timeout
        while True:  # both listeners start together; make sure of the second one too
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                if probe.connect_ex(str(self.uds)) == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {self.uds}:\n{self.log_tail()}")
            time.sleep(0.05)


class NbdAgent:
    """One ``tmem-agent nbd`` process listening on a free 127.0.0.1 port."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.args = [*AGENT, *args, "--listen", f"127.0.0.1:{self.port}"]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def in_memory(cls, tmp: Path, *, size: str = "64MiB") -> NbdAgent:
        return cls(["--memory", "--size", size], tmp / "agent.log")

    @classmethod
    def for_broker(
        cls,
        broker: BrokerProcess,
        token: str,
        tmp: Path,
        *,
        size: str = "64MiB",
        extra: tuple[str, ...] = (),
        url: str | None = None,
    ) -> NbdAgent:
        """An agent on ``broker`` (at ``url``, e.g. a ``unix:PATH``; by default its TCP URL)."""
        args = ["--broker", url or broker.url, "--token", token, "--size", size]
        args += ["--fallback", str(tmp / "fallback.img"), "--log-level", "INFO", *extra]
        return cls(args, tmp / "agent.log")

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        with self.log.open("ab") as logf:
            self.proc = subprocess.Popen(
                dies_with_us(self.args), stdout=subprocess.PIPE, stderr=logf, cwd=os.getcwd()
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline and b"\n" not in line:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log_tail()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line += os.read(self.proc.stdout.fileno(), 4096)
        if b"nbd: serving" not in line:
            self.stop()
            raise RuntimeError(f"agent not ready: {line!r}\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None
        return code

    def log_tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-n:]
        return ""

    def __enter__(self) -> NbdAgent:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        code = self.stop()
        if et is None:
            assert code == 0, f"agent exited {code}:\n{self.log_tail()}"


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a client tool; fails the test with its output when it exits non-zero."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{cmd[0]} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def fio_json(uri: str, *extra: str, timeout: float = 170) -> dict[str, Any]:
    """Run fio's nbd engine against ``uri``; returns its JSON report."""
    done = run(
        [
            "fio",
            "--name=nbd",
            "--ioengine=nbd",
            f"--uri={uri}",
            "--output-format=json",
            "--verify_state_save=0",  # no local-*-verify.state files in the working directory
            *extra,
        ],
        timeout=timeout,
    )
    report: dict[str, Any] = json.loads(done.stdout[done.stdout.index("{") :])
    return report
