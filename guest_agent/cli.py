"""``tmem-agent``: the guest agent's command line.

::

    tmem-agent create-pool persistent --broker http://127.0.0.1:8470 --token T
    tmem-agent put POOL OID INDEX --file page.bin     # or the page on stdin
    tmem-agent get POOL OID INDEX > page.bin          # exit status 1 on a miss
    tmem-agent stats                                  # GET /v1/self as JSON
    tmem-agent watch                                  # notices as JSON lines, as they arrive

``--broker`` and ``--token`` default to ``TMEM_BROKER_URL`` and ``TMEM_TOKEN``.

Adding subcommands (simulate, nbd, ...): ``app`` is a module-level ``typer.Typer``. A module
``guest_agent/<name>/cli.py`` defines ``register(app: typer.Typer) -> None`` that calls
``app.command("<name>")(fn)`` or ``app.add_typer(sub_app, name="<name>")``; list the module in
:data:`SUBCOMMAND_MODULES` and :func:`main` imports and registers it lazily (so a broken or
heavy optional module never slows down or breaks ``put``/``get``). The shared options are
:data:`BrokerOpt` and :data:`TokenOpt` (``Annotated`` aliases) for reuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from guest_agent.client import TmemClient
from guest_agent.errors import TmemClientError
from guest_agent.notices import NoticeStream

__all__ = ["SUBCOMMAND_MODULES", "BrokerOpt", "TokenOpt", "app", "main"]

app = typer.Typer(
    name="tmem-agent",
    help="Guest agent of the tmem broker: single page ops, stats, notices.",
    no_args_is_help=True,
    add_completion=False,
)

SUBCOMMAND_MODULES = ("guest_agent.sim.cli", "guest_agent.nbd.cli", "guest_agent.pressure")
"""Modules whose ``register(app)`` :func:`main` calls before running the app."""

BrokerOpt = Annotated[
    str,
    typer.Option("--broker", envvar="TMEM_BROKER_URL", help="broker base URL"),
]
TokenOpt = Annotated[
    str,
    typer.Option("--token", envvar="TMEM_TOKEN", help="the guest's token"),
]


def _client(broker: str, token: str) -> TmemClient:
    return TmemClient(broker, token, timeout=30.0)


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


@app.command("create-pool")
def create_pool(
    kind: Annotated[str, typer.Argument(help="persistent or ephemeral")],
    broker: BrokerOpt,
    token: TokenOpt,
    shared_uuid: Annotated[
        str | None, typer.Option("--shared", help="join the shared pool of this UUID")
    ] = None,
    exclusive_gets: Annotated[
        bool, typer.Option(help="persistent pool with exclusive gets")
    ] = False,
) -> None:
    """Create a pool and print its id."""
    if kind not in ("persistent", "ephemeral"):
        raise typer.BadParameter("kind is persistent or ephemeral")
    try:
        with _client(broker, token) as client:
            pool = client.create_pool(
                "persistent" if kind == "persistent" else "ephemeral",
                shared=shared_uuid is not None,
                uuid=shared_uuid,
                exclusive_gets=exclusive_gets,
            )
    except TmemClientError as exc:
        raise _fail(exc) from exc
    typer.echo(pool)


@app.command()
def put(
    pool: int,
    oid: int,
    index: int,
    broker: BrokerOpt,
    token: TokenOpt,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="4096-byte page file (default: stdin)")
    ] = None,
) -> None:
    """Put one 4096-byte page; prints ``stored`` or ``declined: REASON`` (exit 1)."""
    page = file.read_bytes() if file is not None else sys.stdin.buffer.read()
    if len(page) != 4096:
        raise typer.BadParameter(f"a page is exactly 4096 bytes, got {len(page)}")
    try:
        with _client(broker, token) as client:
            result = client.put(pool, oid, index, page)
    except TmemClientError as exc:
        raise _fail(exc) from exc
    if result:
        typer.echo("stored")
    else:
        typer.echo(f"declined: {result.reason}")
        raise typer.Exit(1)


@app.command()
def get(
    pool: int,
    oid: int,
    index: int,
    broker: BrokerOpt,
    token: TokenOpt,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="write the page here (default: stdout)")
    ] = None,
) -> None:
    """Get one page; writes its bytes, or exits 1 on a miss."""
    try:
        with _client(broker, token) as client:
            page = client.get(pool, oid, index)
    except TmemClientError as exc:
        raise _fail(exc) from exc
    if page is None:
        typer.echo("miss", err=True)
        raise typer.Exit(1)
    if out is not None:
        out.write_bytes(page)
    else:
        sys.stdout.buffer.write(page)
        sys.stdout.buffer.flush()


@app.command()
def stats(broker: BrokerOpt, token: TokenOpt) -> None:
    """Print the guest's own view (GET /v1/self): quota, pools, stats, as JSON."""
    try:
        with _client(broker, token) as client:
            info = client.self_info()
    except TmemClientError as exc:
        raise _fail(exc) from exc
    typer.echo(info.model_dump_json(indent=2))


@app.command()
def watch(
    broker: BrokerOpt,
    token: TokenOpt,
    after: Annotated[int, typer.Option(help="start after this sequence number")] = 0,
    poll: Annotated[bool, typer.Option("--poll", help="long-poll instead of WebSocket")] = False,
    count: Annotated[int, typer.Option(help="exit after this many notices (0: never)")] = 0,
) -> None:
    """Print notices as JSON lines as they arrive (resumes across reconnects)."""

    async def _watch() -> None:
        stream = NoticeStream(broker, token, after=after, use_websocket=not poll)
        seen = 0
        try:
            async for notice in stream:
                typer.echo(notice.model_dump_json())
                sys.stdout.flush()
                seen += 1
                if count and seen >= count:
                    return
        finally:
            await stream.aclose()

    try:
        asyncio.run(_watch())
    except KeyboardInterrupt:
        pass
    except TmemClientError as exc:
        raise _fail(exc) from exc


def _register_subcommands() -> None:
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but something it imports does not
                raise
            continue
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_registered = False


def main() -> None:
    """Entry point of ``tmem-agent``."""
    global _registered
    if not _registered:
        _registered = True
        _register_subcommands()
    with contextlib.suppress(BrokenPipeError):
        app()


if __name__ == "__main__":
    main()
