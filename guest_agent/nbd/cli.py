"""``tmem-agent nbd``: serve a block device backed by the broker.

::

    tmem-agent nbd --broker http://127.0.0.1:8470 --token T --size 1GiB \\
        --listen 127.0.0.1:10809 --fallback /var/lib/tmem/nbd.fallback

then e.g. ``qemu-system-x86_64 -drive file=nbd://127.0.0.1:10809,format=raw,if=virtio ...`` and
``mkswap``/``swapon`` inside the guest. ``--memory`` serves from process memory instead of the
broker (the protocol tests' and the benchmark's baseline). Once listening, the command prints
one line ``nbd: serving ... on nbd://HOST:PORT`` (or ``nbd+unix:///?socket=PATH``) and flushes
stdout, so scripts can wait for it.

A copy-on-write export over a read-only base image (``docs/nbd.md``, "Base-image exports")::

    tmem-agent nbd --broker URL --token T --listen 127.0.0.1:10809 \\
        --base golden.raw --cache-pool 6f1c...-uuid --overlay /var/lib/tmem/vm1.overlay

(``--size`` defaults to the image's size; ``--overlay FILE`` takes the place of ``--fallback``
and keeps the overlay's state in ``FILE.state``, so the disk survives a restart.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated

import typer

from guest_agent.errors import TmemClientError
from guest_agent.nbd.backend import BLOCK_SIZE, BlockBackend, MemoryBackend
from guest_agent.nbd.cow_backend import (
    CowBackend,
    figures_for_broker,
    open_cow,
    report_figures,
    report_name,
)
from guest_agent.nbd.dispatcher import Dispatcher
from guest_agent.nbd.server import NbdServer

if TYPE_CHECKING:
    from guest_agent.nbd.base_image import BaseImage
    from guest_agent.notices import NoticeStream

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """``"64MiB"`` → 67108864; accepts B, KiB, MiB, GiB, TiB (also K, M, G, T)."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    number, unit = int(match.group(1)), match.group(2).lower()
    if unit in ("k", "m", "g", "t"):
        unit += "ib"
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit in {text!r}")
    return number * _UNITS[unit]


def parse_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:10809"`` → (host, port); ``"[::1]:10809"`` for IPv6."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen wants HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(
    *,
    broker: str | None,
    token: str | None,
    size: int,
    listen: tuple[str, int] | None,
    unix: str | None,
    fallback: str | None,
    name: str,
    memory: bool,
    base: BaseImage | None = None,
    cache_pool: str | None = None,
    overlay: str | None = None,
) -> None:
    """Build the backend, serve until SIGINT/SIGTERM, then tear down in order."""
    log = logging.getLogger("guest_agent.nbd")
    backend: BlockBackend
    clients: list[object] = []
    follower: asyncio.Task[None] | None = None
    stream: NoticeStream | None = None
    reporter: asyncio.Task[None] | None = None
    if memory:
        backend = MemoryBackend()
        if base is not None:
            backend = CowBackend(backend, base, size=size)
    else:
        from guest_agent.client import AsyncTmemClient
        from guest_agent.nbd.broker_backend import BrokerBackend
        from guest_agent.nbd.notices import follow_notices, latest_seq
        from guest_agent.notices import NoticeStream

        assert broker and token and (fallback or overlay)
        client = AsyncTmemClient(broker, token, max_connections=8)
        clients.append(client)
        if base is None:
            assert fallback
            broker_backend = await BrokerBackend.open(client, size=size, fallback_path=fallback)
            backend = broker_backend
        else:
            assert overlay
            cow = await open_cow(client, base, size=size, overlay=overlay, cache_uuid=cache_pool)
            assert isinstance(cow.overlay, BrokerBackend)
            broker_backend = cow.overlay
            backend = cow
            reporter = asyncio.create_task(report_figures(client, name, cow), name="nbd-report")
        local = fallback or overlay
        log.info("nbd: pool %d at %s, fallback %s", broker_backend.pool_id, broker, local)

    dispatcher = Dispatcher(backend)
    dispatcher.start()
    if not memory:
        # a base-image export sheds through its COW layer, which saves the overlay's map after
        shedder: Callable[[int], Awaitable[int]] = (
            backend.shed if isinstance(backend, CowBackend) else broker_backend.shed
        )

        async def shed(pages: int) -> int:
            return await dispatcher.exclusive(lambda: shedder(pages))

        assert broker and token
        stream = NoticeStream(broker, token, after=await latest_seq(client))
        follower = asyncio.create_task(follow_notices(stream, shed, client), name="nbd-notices")
    server = NbdServer(dispatcher, size=size, name=name)
    where: list[str] = []
    if listen is not None:
        port = await server.listen_tcp(*listen)
        where.append(f"nbd://{listen[0]}:{port}")
    if unix is not None:
        await server.listen_unix(unix)
        where.append(f"nbd+unix:///?socket={unix}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # the ready line comes last: whoever waits for it may stop the agent right away
    print(f"nbd: serving {name!r} ({size} bytes) on {' '.join(where)}", flush=True)
    serving = asyncio.create_task(server.serve_forever())
    await stop.wait()
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    await server.close()
    await dispatcher.stop()
    if follower is not None:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    if stream is not None:
        await stream.aclose()
    if reporter is not None:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
    try:
        await backend.flush()
        if reporter is not None:
            assert isinstance(backend, CowBackend)
            with contextlib.suppress(TmemClientError):
                await client.report_export(report_name(name), figures_for_broker(backend))
        await backend.close()
    finally:
        for c in clients:
            await c.aclose()  # type: ignore[attr-defined]
    counts = dict(getattr(backend, "stats", {}))
    counts.update(
        rounds=dispatcher.rounds,
        requests=dispatcher.requests,
        largest_round=dispatcher.largest_round,
    )
    print("nbd: stopped; " + " ".join(f"{k}={v}" for k, v in sorted(counts.items())), flush=True)


def nbd(
    size: Annotated[
        str | None,
        typer.Option(help="export size, e.g. 1GiB (rounded up to 4 KiB); --base: the image's"),
    ] = None,
    broker: Annotated[
        str | None, typer.Option(envvar="TMEM_BROKER_URL", help="broker base URL")
    ] = None,
    token: Annotated[
        str | None, typer.Option(envvar="TMEM_TOKEN", help="the guest's token")
    ] = None,
    listen: Annotated[str | None, typer.Option(help="HOST:PORT to listen on")] = None,
    unix: Annotated[str | None, typer.Option(help="Unix socket path to listen on")] = None,
    fallback: Annotated[
        str | None, typer.Option(help="local file for blocks the broker declines")
    ] = None,
    name: Annotated[str, typer.Option(help="export name (the empty name also works)")] = "tmem",
    memory: Annotated[
        bool, typer.Option("--memory", help="serve from process memory (tests, baseline)")
    ] = False,
    log_level: Annotated[str, typer.Option(help="logging level")] = "WARNING",
    base: Annotated[
        str | None,
        typer.Option(help="serve copy-on-write over this read-only raw image (unwritten blocks)"),
    ] = None,
    cache_pool: Annotated[
        str | None,
        typer.Option(help="with --base: UUID of the shared ephemeral pool caching its blocks"),
    ] = None,
    overlay: Annotated[
        str | None,
        typer.Option(help="with --base: the guest's writes' local file (state in FILE.state)"),
    ] = None,
    base_identity: Annotated[
        str,
        typer.Option(help="with --base: cache key from 'stat' (size, mtime...) or 'content'"),
    ] = "stat",
) -> None:
    """Serve an NBD block device whose 4 KiB blocks are persistent puts at the broker."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    image: BaseImage | None = None
    try:
        address = parse_listen(listen) if listen else None
        if base is None:
            for flag, value in (("--cache-pool", cache_pool), ("--overlay", overlay)):
                if value is not None:
                    raise ValueError(f"{flag} goes with --base")
        else:
            _check_base_flags(memory=memory, fallback=fallback, overlay=overlay, uuid=cache_pool)
        if base_identity not in ("stat", "content"):
            raise ValueError("--base-identity is 'stat' or 'content'")
        if size is None and base is None:
            raise ValueError("--size is required (without --base)")
        nbytes = parse_size(size) if size is not None else 0
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if address is None and unix is None:
        raise typer.BadParameter("give --listen HOST:PORT or --unix PATH")
    if base is not None:
        from guest_agent.nbd.base_image import BaseImage

        try:
            image = BaseImage.open(
                base, identity="content" if base_identity == "content" else "stat"
            )
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"--base: {exc}") from exc
        if size is None:
            nbytes = max(image.size, BLOCK_SIZE)
        elif nbytes < image.size:
            image.close()
            raise typer.BadParameter(f"--size is smaller than the base image ({image.size} bytes)")
    if nbytes <= 0:
        raise typer.BadParameter("--size must be positive")
    nbytes = (nbytes + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
    if not memory and not (broker and token and (fallback or overlay)):
        raise typer.BadParameter("--broker, --token and --fallback are required (or --memory)")
    try:
        asyncio.run(
            serve(
                broker=broker,
                token=token,
                size=nbytes,
                listen=address,
                unix=unix,
                fallback=fallback,
                name=name,
                memory=memory,
                base=image,
                cache_pool=cache_pool,
                overlay=overlay,
            )
        )
    except (TmemClientError, OSError, ValueError) as exc:
        # the broker refused or is unreachable at start, or the socket/file cannot be opened
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _check_base_flags(
    *, memory: bool, fallback: str | None, overlay: str | None, uuid: str | None
) -> None:
    """``ValueError`` for flags that do not go together with ``--base``."""
    if fallback is not None:
        raise ValueError("with --base, give --overlay FILE instead of --fallback")
    if not memory and overlay is None:
        raise ValueError("--base needs --overlay FILE (or --memory for a throwaway overlay)")
    if memory and (overlay is not None or uuid is not None):
        raise ValueError("--memory keeps the overlay in memory: no --overlay or --cache-pool")
    if uuid is not None:
        import uuid as uuid_module

        try:
            uuid_module.UUID(uuid)
        except ValueError as exc:
            raise ValueError(f"--cache-pool wants a UUID, got {uuid!r}") from exc


def register(app: typer.Typer) -> None:
    """Add the ``nbd`` command to the agent's typer app."""
    app.command("nbd")(nbd)


def main() -> None:
    """``python -m guest_agent.nbd``: the same command without the rest of the agent's CLI."""
    typer.run(nbd)
