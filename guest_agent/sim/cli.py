"""``tmem-agent simulate``: simulated guests with real page contents against a real broker.

::

    tmem-agent simulate --broker http://127.0.0.1:8470 --admin-token ADMIN --guests 4 \\
        --ram 8MiB --anon 16MiB --cache 16MiB --workload mix --steps 300 --seed 1 \\
        --json sim.json --plot sim.png
    tmem-agent simulate --broker URL --tokens T1,T2          # guests that already exist
    tmem-agent simulate --broker URL --admin-token ADMIN --compress pressure \
        --trusted-domain tenant-a                            # compression and trusted dedup

With ``--admin-token`` the guests are created (``POST /v1/guests``), the broker's global
figures come from ``GET /v1/stats``, and the guests are deleted at the end unless
``--keep-guests``. With ``--tokens`` one guest is simulated per token and the figures come
from each guest's own ``GET /v1/self``.

``--compress never|always`` creates the guests with that setting of their own, ``inherit``
(the default) leaves it unset, and ``pressure`` (a mode a guest cannot hold itself) sets it on
their dedup domain (``--domain``, else ``sim-pressure``); ``--trusted-domain NAME`` puts them
in domain NAME made trusted first (``PUT /v1/domains/NAME``). The report shows the broker's
compression ratio and the bytes used, charged and counted against its capacity.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from guest_agent.client import TmemClient
from guest_agent.errors import TmemClientError
from schemas.batch import PAGE_SIZE

from .agent import (
    close_links,
    connect_links,
    create_guests,
    delete_guests,
    fetch_domain,
    fetch_stats,
    set_domain,
    share_images,
)
from .errors import SimError
from .images import DEFAULT_IMAGE
from .report import broker_table, figures_table, what_happened
from .runner import COMPRESS_CHOICES, SimConfig, SimGuest, SimResult, run_simulation
from .workloads import WORKLOADS

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes of ``"8MiB"``, ``"512KiB"``, ``"4096"`` (B, KiB, MiB, GiB suffixes)."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise typer.BadParameter(f"not a size: {text!r} (use B, KiB, MiB or GiB)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def pages_of(text: str) -> int:
    """A size rounded up to whole 4 KiB pages."""
    return -(-parse_size(text) // PAGE_SIZE)


def run_against_broker(
    config: SimConfig,
    url: str,
    *,
    admin_token: str | None = None,
    tokens: list[str] | None = None,
    cap_pages: int | None = None,
    keep_guests: bool = False,
    live_notices: bool = False,
    console: Console | None = None,
    progress: bool = True,
) -> SimResult:
    """Create (or connect) the guests, run the simulation, clean up; the figures.

    The guests are created in ``config.dedup_domain`` with ``config.compress`` (see the
    module doc); the domain is set first when it is to be trusted or carry the ``pressure``
    mode, and its figures at the end are in ``result.domain``."""
    created: list[tuple[int, str]] = []
    if config.shared_cache and not admin_token:
        raise SimError("--shared-cache needs --admin-token (shared pools are authorised by it)")
    if config.compress == "pressure" and config.dedup_domain == "default":
        # the pressure mode is a domain's: a domain of the simulation's own, so the other
        # guests of the default domain keep theirs
        config.dedup_domain = "sim-pressure"
    custom = config.compress != "inherit" or config.dedup_domain != "default"
    if tokens and custom:
        raise SimError(
            "--compress, --domain and --trusted-domain apply to guests the simulation "
            "creates: give --admin-token instead of --tokens"
        )
    if tokens:
        config.guests = len(tokens)
        guest_tokens = list(tokens)
        ids: list[int | None] = [None] * len(tokens)
    elif admin_token:
        if config.trusted_domain or config.compress == "pressure":
            set_domain(
                url,
                admin_token,
                config.dedup_domain,
                trusted=True if config.trusted_domain else None,
                compress="pressure" if config.compress == "pressure" else None,
            )
        created = create_guests(
            url,
            admin_token,
            config.guests,
            cap_pages=cap_pages,
            dedup_domain=config.dedup_domain,
            compress={"never": False, "always": True}.get(config.compress),
        )
        guest_tokens = [t for _, t in created]
        ids = [gid for gid, _ in created]
    else:
        raise SimError("give --admin-token (to create guests) or --tokens")
    try:
        uuids: list[str | None] | None = None
        if config.shared_cache and admin_token:
            if any(gid is None for gid in ids):
                ids = [_guest_id(url, t) for t in guest_tokens]
            roots = [config.images[i % len(config.images)] for i in range(config.guests)]
            uuids = list(share_images(url, admin_token, [int(g or 0) for g in ids], roots))
        links = connect_links(
            url, guest_tokens, guest_ids=ids, live_notices=live_notices, shared_uuids=uuids
        )
        try:
            stats = (lambda: fetch_stats(url, admin_token)) if admin_token else None
            if progress:
                result = _with_progress(config, links, stats, console or Console(stderr=True))
            else:
                result = run_simulation(config, links, broker_stats=stats)
            if admin_token:
                result.domain = fetch_domain(url, admin_token, config.dedup_domain)
            return result
        finally:
            close_links(links)
    finally:
        if created and admin_token and not keep_guests:
            delete_guests(url, admin_token, [gid for gid, _ in created])


def _guest_id(url: str, token: str) -> int:
    with TmemClient(url, token) as client:
        return client.self_info().guest_id


def _with_progress(
    config: SimConfig,
    links: list[Any],
    stats: Callable[[], dict[str, Any] | None] | None,
    console: Console,
) -> SimResult:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    latest: dict[str, Any] = {}

    def sampled() -> dict[str, Any] | None:
        st = stats() if stats is not None else None
        latest.clear()
        latest.update(st or {})
        return st

    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"{config.guests} guests", total=config.steps)

        def on_step(step: int, guests: Sequence[SimGuest]) -> None:
            hits = sum(g.model.counters.tmem_hits for g in guests)
            misses = sum(g.model.counters.tmem_misses for g in guests)
            text = f"{config.guests} guests, hits {100.0 * hits / max(1, hits + misses):.0f}%"
            if isinstance(latest.get("used_bytes"), int):
                text += f", {latest['used_bytes'] / (1 << 20):.0f} MiB"
            if isinstance(latest.get("dedup_ratio"), int | float):
                text += f", dedup {latest['dedup_ratio']:.2f}"
            bar.update(task, completed=step, description=text)

        return run_simulation(
            config, links, broker_stats=sampled if stats is not None else None, on_step=on_step
        )


def print_result(result: SimResult, console: Console) -> None:
    """The per-guest table, the broker table and the summary paragraph."""
    console.print(figures_table(result))
    console.print(broker_table(result))
    console.print("[bold]What happened[/bold]")
    console.print(what_happened(result))


def simulate(
    broker: Annotated[str, typer.Option("--broker", envvar="TMEM_BROKER_URL", help="broker URL")],
    guests: Annotated[int, typer.Option(help="number of simulated guests")] = 4,
    admin_token: Annotated[
        str | None,
        typer.Option(envvar="TMEM_ADMIN_TOKEN", help="create the guests with this admin token"),
    ] = None,
    tokens: Annotated[
        str | None, typer.Option(help="comma-separated tokens of existing guests")
    ] = None,
    ram: Annotated[str, typer.Option(help="RAM of each guest")] = "8MiB",
    anon: Annotated[str, typer.Option(help="anonymous memory each guest touches")] = "16MiB",
    cache: Annotated[str, typer.Option(help="how much of its image a guest reads")] = "16MiB",
    image: Annotated[
        list[str] | None,
        typer.Option(
            help=f"OS image tree; repeat to give guests different trees (default {DEFAULT_IMAGE})"
        ),
    ] = None,
    max_files: Annotated[int, typer.Option(help="files of an image considered")] = 2000,
    max_image: Annotated[str, typer.Option(help="bytes of an image considered")] = "64MiB",
    workload: Annotated[str, typer.Option(help=f"one of {', '.join(WORKLOADS)}")] = "mix",
    steps: Annotated[int, typer.Option(help="steps to run")] = 300,
    accesses: Annotated[int, typer.Option(help="page accesses per guest per step")] = 256,
    write_fraction: Annotated[float, typer.Option(help="share of anon accesses that write")] = 0.3,
    skew: Annotated[float, typer.Option(help="zipf exponent of hot/cold")] = 1.0,
    phase_steps: Annotated[int, typer.Option(help="steps per phase (phases, mix)")] = 50,
    seed: Annotated[int, typer.Option(help="seed: the same seed gives the same run")] = 1,
    cap_pages: Annotated[
        int | None, typer.Option(help="persistent cap of created guests, in pages")
    ] = None,
    pressure_every: Annotated[int, typer.Option(help="steps between pressure reports")] = 10,
    notices_every: Annotated[int, typer.Option(help="steps between notice polls")] = 5,
    sample_every: Annotated[int, typer.Option(help="steps between timeline samples")] = 10,
    disk_latency_us: Annotated[
        float, typer.Option(help="modelled disk latency per 4 KiB read or write")
    ] = 100.0,
    live_notices: Annotated[
        bool, typer.Option(help="answer notices in a background thread (not reproducible)")
    ] = False,
    shared_cache: Annotated[
        bool, typer.Option(help="guests of one image share a cleancache pool (needs admin)")
    ] = False,
    compress: Annotated[
        str,
        typer.Option(
            help=f"how created guests compress: {'|'.join(COMPRESS_CHOICES)} (pressure is "
            "set on their dedup domain; inherit leaves it to the domain, else the broker)"
        ),
    ] = "inherit",
    domain: Annotated[
        str | None, typer.Option(help="dedup domain of created guests [default]")
    ] = None,
    trusted_domain: Annotated[
        str | None,
        typer.Option(
            help="put created guests in this dedup domain, made trusted first: contents they "
            "share take room once (see docs/security.md for what that gives away)"
        ),
    ] = None,
    keep_guests: Annotated[bool, typer.Option(help="do not delete created guests")] = False,
    verify: Annotated[bool, typer.Option(help="check every page the broker returns")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="write all figures")] = None,
    plot: Annotated[Path | None, typer.Option(help="draw the timeline to a PNG")] = None,
) -> None:
    """Simulated guests with real page contents and workloads against a broker."""
    config = SimConfig(
        guests=guests,
        ram_pages=pages_of(ram),
        anon_pages=pages_of(anon),
        file_pages=pages_of(cache),
        steps=steps,
        accesses_per_step=accesses,
        workload=workload,
        write_fraction=write_fraction,
        skew=skew,
        phase_steps=phase_steps,
        seed=seed,
        images=image or [DEFAULT_IMAGE],
        max_files=max_files,
        max_image_bytes=parse_size(max_image),
        pressure_every=pressure_every,
        notices_every=notices_every,
        sample_every=sample_every,
        disk_latency_us=disk_latency_us,
        verify=verify,
        shared_cache=shared_cache,
        compress=compress,
        dedup_domain=trusted_domain or domain or "default",
        trusted_domain=trusted_domain is not None,
    )
    console = Console()
    token_list = [t.strip() for t in tokens.split(",") if t.strip()] if tokens else None
    try:
        if trusted_domain is not None and domain is not None and domain != trusted_domain:
            raise SimError("--domain and --trusted-domain name two domains: give one")
        config.validate()
        result = run_against_broker(
            config,
            broker,
            admin_token=admin_token,
            tokens=token_list,
            cap_pages=cap_pages,
            keep_guests=keep_guests,
            live_notices=live_notices,
            console=Console(stderr=True),
        )
    except (SimError, TmemClientError) as exc:
        Console(stderr=True).print(f"[red]simulate:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from exc
    print_result(result, console)
    if json_out is not None:
        json_out.write_text(json.dumps(result.as_dict(), indent=2, default=str))
    if plot is not None:
        from .plot import write_plot

        write_plot(result, plot)
    bad = [result.totals.get("corrupt_pages"), result.totals.get("swap_lost")]
    if any(isinstance(n, int) and n > 0 for n in bad):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``simulate`` to the agent's ``tmem-agent`` app."""
    app.command("simulate")(simulate)
