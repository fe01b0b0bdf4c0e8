"""A real ``tmem-broker serve`` process for end-to-end tests, and a plain http.client caller.

::

    with BrokerProcess(tmp_path / "data") as broker:      # free port, waits for /readyz 200
        status, body = broker.call("POST", "/v1/guests", {"name": "g"})
        broker.kill()                                       # SIGKILL, as a crash
        broker.start()                                      # same data dir, waits for /readyz
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

ADMIN = "admin-token-for-tests-0123456789"
TMEM_BROKER = str(Path(sys.executable).parent / "tmem-broker")


_SETPRIV = shutil.which("setpriv")


def dies_with_us(command: list[str]) -> list[str]:
    """``command`` run so that it is SIGKILLed when this process dies (util-linux ``setpriv
    --pdeathsig``, which sets ``PR_SET_PDEATHSIG`` and execs: same pid, kept across exec).

    A test run stopped by a signal never reaches its fixtures' teardown; without this a broker
    or an agent it started kept running (and serving) for as long as nobody noticed. The signal
    comes when the *thread* that started the process ends: start them from the main thread (an
    ``asyncio.to_thread`` worker lives until its event loop closes). Without ``setpriv`` the
    command runs as given.
    """
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *command] if _SETPRIV else command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BrokerProcess:
    """One broker on 127.0.0.1 with its own data dir (SQLite + journal inside it)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        durability: str = "sync",
        capacity: str = "2GiB",
        port: int | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.extra_args = list(extra_args or [])
        self.extra_env = dict(env or {})
        self.data_dir = data_dir
        self.durability = durability
        self.capacity = capacity
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"broker-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TMEM_ADMIN_TOKEN": ADMIN, **self.extra_env}
        logf = self.log.open("ab")
        self.proc = subprocess.Popen(
            dies_with_us(
                [
                    TMEM_BROKER,
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.data_dir),
                    "--capacity",
                    self.capacity,
                    "--durability",
                    self.durability,
                    *self.extra_args,
                ]
            ),
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, _ = self.call("GET", "/readyz", token=None, timeout=2)
                if status == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"broker not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill(self, *, children: bool = False) -> None:
        """SIGKILL: no shutdown code runs, as in a crash. ``children``: its child processes
        (the journal's writer) die first, as when a whole container is killed."""
        if self.proc is not None and self.proc.poll() is None:
            if children:
                for pid in self.child_pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def child_pids(self) -> list[int]:
        assert self.proc is not None
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> BrokerProcess:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = ADMIN,
        content_type: str | None = None,
        timeout: float = 60,
    ) -> tuple[int, bytes]:
        """One request on a fresh connection; JSON-encodes dict/list bodies."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers: dict[str, str] = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if isinstance(body, dict | list):
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif content_type is not None:
            headers["Content-Type"] = content_type
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def json(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = ADMIN,
        expect: int = 200,
    ) -> Any:
        status, data = self.call(method, path, body, token=token)
        assert status == expect, (method, path, status, data[:500])
        return json.loads(data) if data else None

    def new_guest(self, name: str) -> tuple[int, str]:
        created = self.json("POST", "/v1/guests", {"name": name}, expect=201)
        return int(created["guest_id"]), str(created["token"])

    def new_pool(self, token: str, kind: str = "persistent", **extra: Any) -> int:
        return int(
            self.json("POST", "/v1/pools", {"kind": kind, **extra}, token=token, expect=201)[
                "pool_id"
            ]
        )
