"""Base-image exports for the end-to-end tests: guests authorised for one shared cache, and
``tmem-agent nbd --base`` processes over one image.

::

    with BrokerProcess(tmp / "broker") as broker:
        guests = cache_guests(broker, 2, uuid=UUID)
        with base_agent(broker, guests[0], image, tmp / "vm0", uuid=UUID) as agent:
            ...
        figures = export_figures(broker)          # GET /v1/exports, by guest id
"""

from __future__ import annotations

import uuid as uuid_module
from pathlib import Path
from typing import Any

from tests.e2e.brokerproc import BrokerProcess
from tests.e2e.nbd_support import NbdAgent, new_guest


def new_cache_uuid() -> str:
    return str(uuid_module.uuid4())


def cache_guests(
    broker: BrokerProcess, count: int, *, uuid: str, prefix: str = "vm"
) -> list[tuple[int, str]]:
    """``count`` new guests, each authorised for the shared pool ``uuid``; (id, token) each."""
    guests = []
    for i in range(count):
        guest_id, token = new_guest(broker, f"{prefix}-{i}-{uuid[:8]}")
        broker.json(
            "POST",
            "/v1/shared-auth",
            {"uuid": uuid, "guest_id": guest_id, "allow": True},
            expect=204,
        )
        guests.append((guest_id, token))
    return guests


def base_agent(
    broker: BrokerProcess,
    guest: tuple[int, str],
    image: Path,
    workdir: Path,
    *,
    uuid: str | None,
    extra: tuple[str, ...] = (),
    url: str | None = None,
) -> NbdAgent:
    """``tmem-agent nbd --base IMAGE [--cache-pool UUID] --overlay WORKDIR/overlay.img``,
    named after the guest id (the name its figures are reported under); on the broker's
    ``url`` (e.g. ``unix:PATH``), by default its TCP URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["--broker", url or broker.url, "--token", guest[1], "--base", str(image)]
    args += ["--overlay", str(workdir / "overlay.img"), "--name", f"vm{guest[0]}"]
    if uuid is not None:
        args += ["--cache-pool", uuid]
    args += ["--log-level", "INFO", *extra]
    return NbdAgent(args, workdir / "agent.log")


def export_figures(broker: BrokerProcess) -> dict[int, dict[str, int]]:
    """The figures every base-image export last reported, by guest id."""
    exports: list[dict[str, Any]] = broker.json("GET", "/v1/exports")
    return {int(e["guest_id"]): dict(e["figures"]) for e in exports}
