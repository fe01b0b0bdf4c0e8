"""``tmem-broker``: run the broker, upgrade its schema, and administer a running one.

::

    tmem-broker serve [--host 127.0.0.1] [--port 8470] [--uds PATH] [--nbd-dir DIR] [--data-dir ./var]
                      [--capacity 1GiB|auto] [--compress never|always|pressure]
                      [--host-watch] [--database-url URL] [--durability sync|none]
                      [--admin-token T]
    tmem-broker db upgrade [--database-url URL] [--data-dir ./var]
    tmem-broker admin {create-guest,list,show,set-guest,freeze,thaw,flush,delete,stats,
                       shared-auth,domains,set-domain,set-compress,shed} ...
    tmem-broker migrate --from URL --to URL --guest NAME [--from-token T] [--to-token T]

Every ``serve`` flag is also read from ``TMEM_<FLAG>`` (``TMEM_CAPACITY=4GiB``). The admin
commands talk HTTP to a running broker (``--url``, default ``$TMEM_URL`` or
``http://127.0.0.1:8470``) with ``--admin-token``, ``$TMEM_ADMIN_TOKEN`` or the token file in
``--data-dir``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from broker.settings import Settings
from guest_agent.admin import AdminClient
from guest_agent.errors import BrokerError, BrokerUnavailable, ProtocolError

app = typer.Typer(
    help="tmem broker: a host-side transcendent-memory service.", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
admin_app = typer.Typer(help="Administer a running broker over HTTP.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(admin_app, name="admin")

console = Console()
err = Console(stderr=True)


def _settings(**flags: Any) -> Settings:
    """Settings from the given flags, the environment (``TMEM_*``) filling the rest."""
    try:
        return Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"]) or "settings"
            err.print(f"[red]invalid {where}[/red]: {e['msg']}")
        raise typer.Exit(2) from exc


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="address to listen on [127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port [8470]")] = None,
    uds: Annotated[
        Path | None,
        typer.Option(help="also listen on this Unix socket (agents: --broker unix:PATH)"),
    ] = None,
    nbd_dir: Annotated[
        Path | None,
        typer.Option(help="serve guests' NBD exports on Unix sockets in this dir (mode 0700)"),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="SQLite, journal, admin token [./var]")
    ] = None,
    capacity: Annotated[
        str | None,
        typer.Option(help="page storage, e.g. 1GiB, or auto (sized from the host) [1GiB]"),
    ] = None,
    compress: Annotated[
        str | None,
        typer.Option(help="compression of guests that set none: never, always, pressure [never]"),
    ] = None,
    host_watch: Annotated[
        bool | None,
        typer.Option(
            "--host-watch/--no-host-watch",
            help="shrink the capacity while the host runs short [on with --capacity auto]",
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(help="sqlite:///... or postgresql+psycopg://... [SQLite in data dir]"),
    ] = None,
    durability: Annotated[str | None, typer.Option(help="sync (journal) or none [sync]")] = None,
    admin_token: Annotated[
        str | None, typer.Option(help="admin token [$TMEM_ADMIN_TOKEN or generated]")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error")] = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            help="join a cluster of brokers: the Redis Cluster's nodes, "
            "redis://HOST:PORT[,HOST:PORT...] (needs a PostgreSQL --database-url) [off]"
        ),
    ] = None,
    broker_id: Annotated[
        str | None, typer.Option(help="this broker's id in the cluster [hostname:port]")
    ] = None,
    advertise_url: Annotated[
        str | None,
        typer.Option(
            help="the URL other brokers redirect this broker's guests to [http://host:port]"
        ),
    ] = None,
    lease: Annotated[
        float | None,
        typer.Option(help="seconds without a heartbeat before a broker's guests move [10]"),
    ] = None,
) -> None:
    """Run the broker (upgrades the database schema first)."""
    settings = _settings(
        host=host,
        port=port,
        uds=uds,
        nbd_dir=nbd_dir,
        data_dir=data_dir,
        capacity=capacity,
        compress=compress,
        host_watch=host_watch,
        database_url=database_url,
        durability=durability,
        admin_token=admin_token,
        log_level=log_level,
        cluster=cluster,
        broker_id=broker_id,
        advertise_url=advertise_url,
        lease_s=lease,
    )
    import uvicorn

    from broker.api.front import HotRoutes
    from broker.api.page_protocol import page_protocol
    from broker.app import create_app

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    _buffer_whole_batches(settings.max_batch_bytes)
    _keep_freed_buffers(settings.max_batch_bytes)
    app = HotRoutes(create_app(settings))  # page routes skip FastAPI's middleware stack
    options: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Keep-alive matters for guests that send page after page on one connection.
        timeout_keep_alive=60,
        # single pages and batches answered inside the protocol, head and body in one send on
        # every path
        # (broker/api/page_protocol.py)
        http=page_protocol(app),
        # One access-log line per page would cost more than the page itself at tens of
        # thousands of requests a second: only at debug level (/metrics counts operations).
        access_log=settings.log_level == "debug",
    )
    if settings.uds is None:
        uvicorn.run(app, **options)
        return
    # TCP and the Unix socket: one server, the same front door and protocol on both
    uds_path = settings.uds

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # here, not after run(): uvicorn re-raises SIGTERM once serving ends
            with contextlib.suppress(OSError):
                uds_path.unlink()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, **options)
    server = Server(config)
    sockets = [config.bind_socket(), _bind_unix(uds_path)]
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        pass
    finally:
        for sock in sockets:
            sock.close()
    if not server.started:
        with contextlib.suppress(OSError):
            uds_path.unlink()
        raise typer.Exit(3)  # uvicorn's startup-failure status


def _bind_unix(path: Path) -> socket.socket:
    """A Unix stream socket bound at ``path`` (a stale socket file there is replaced).

    Its mode follows the umask: who may connect is decided by the file's permissions, and
    every request still needs its bearer token. uvicorn starts listening on it after the
    app's startup, like on the TCP socket.
    """
    if path.is_socket():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            in_use = probe.connect_ex(str(path)) == 0
        if in_use:
            err.print(f"[red]cannot listen on {path}[/red]: another process listens there")
            raise typer.Exit(2)
        path.unlink()  # left by a broker that did not stop cleanly
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        err.print(f"[red]cannot listen on {path}[/red]: {exc}")
        raise typer.Exit(2) from exc
    logging.getLogger("uvicorn.error").info("Uvicorn running on unix socket %s", path)
    return sock


def _buffer_whole_batches(limit: int) -> None:
    """Let uvicorn buffer a whole batch body before it pauses reading the socket.

    uvicorn pauses reading each time 64 KiB of request body wait for the app, so a 1 MiB
    batch took 16 pause/resume rounds (two epoll_ctl calls and an event-loop pass each). The
    batch route reads the whole body anyway, bounded by ``max_batch_bytes``, so buffering up to
    that bound costs no more memory per connection than the route already allows. (uvicorn
    has no option for it: this sets its module constant, if the protocol module has one.)
    """
    from uvicorn.protocols.http import h11_impl, httptools_impl

    for module in (httptools_impl, h11_impl):
        current = getattr(module, "HIGH_WATER_LIMIT", None)
        if isinstance(current, int) and current < limit + (64 << 10):
            setattr(module, "HIGH_WATER_LIMIT", limit + (64 << 10))  # noqa: B010


def _keep_freed_buffers(batch_bytes: int) -> bool:
    """Serve batch bodies and answers from reused heap memory, not fresh mappings.

    glibc hands out blocks above its mmap threshold as fresh mappings and unmaps them when
    freed, so every 1 MiB batch body, its copy and its answer page-faulted 256 fresh pages in
    again: on this (virtualised) machine that cost ~1.4 ms per MiB allocated and copied, against
    ~40 µs from reused memory. Raising the threshold above two batches keeps those buffers in
    the heap; the trim threshold bounds how much freed memory the heap keeps (glibc only;
    elsewhere nothing changes). Returns whether the thresholds were set.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    mmap_threshold = min(max(2 * batch_bytes + (1 << 20), 8 << 20), 32 << 20)  # glibc max 32M
    ok: bool = mallopt(m_mmap_threshold, mmap_threshold) == 1
    return bool(mallopt(m_trim_threshold, 4 * mmap_threshold) == 1) and ok


@db_app.command("upgrade")
def db_upgrade(
    database_url: Annotated[
        str | None, typer.Option(help="database URL [SQLite in data dir]")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="data dir of the SQLite default")] = None,
) -> None:
    """Bring the database schema to the newest revision, without starting the broker."""
    from broker.db.engine import upgrade

    settings = _settings(database_url=database_url, data_dir=data_dir)
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.sqlalchemy_url, settings.migrations_dir)
    console.print("schema is at the newest revision")


# admin ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _reporting(url: str) -> Iterator[None]:
    """Turn the admin client's failures into a red line and exit status 1."""
    try:
        yield
    except BrokerError as exc:
        err.print(f"[red]error[/red] {exc.status} {exc.code}: {exc.message}")
        raise typer.Exit(1) from exc
    except (BrokerUnavailable, ProtocolError) as exc:
        err.print(f"[red]cannot reach the broker at {url}[/red]: {exc}")
        raise typer.Exit(1) from exc
    except ValueError as exc:  # the address is not http(s):// or unix:PATH
        err.print(f"[red]bad broker address[/red]: {exc}")
        raise typer.Exit(2) from exc


UrlOpt = Annotated[
    str | None, typer.Option("--url", help="broker URL [$TMEM_URL or http://127.0.0.1:8470]")
]
TokenOpt = Annotated[
    str | None, typer.Option("--admin-token", help="[$TMEM_ADMIN_TOKEN or the token file]")
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="where the token file is [./var]")
]


@contextlib.contextmanager
def _client(url: str | None, token: str | None, data_dir: Path | None) -> Iterator[AdminClient]:
    url = url or os.environ.get("TMEM_URL") or "http://127.0.0.1:8470"
    token = token or os.environ.get("TMEM_ADMIN_TOKEN")
    if not token:
        path = (data_dir or Path(os.environ.get("TMEM_DATA_DIR", "./var"))) / "admin-token"
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            err.print(
                f"[red]no admin token[/red]: pass --admin-token, set TMEM_ADMIN_TOKEN or keep {path}"
            )
            raise typer.Exit(2) from exc
    with _reporting(url), AdminClient(url, token) as client:
        yield client


def _guest_table(guests: list[dict[str, Any]]) -> Table:
    table = Table("id", "name", "weight", "cap", "frozen", "pools", "pages", "domain")
    for g in guests:
        stats = g.get("stats") or {}
        pages = stats.get("logical_pages", stats.get("pages", ""))
        table.add_row(
            str(g["guest_id"]),
            g["name"],
            str(g["weight"]),
            "-" if g["cap_pages"] is None else str(g["cap_pages"]),
            "yes" if g["frozen"] else "no",
            str(len(g.get("pools") or [])),
            str(pages),
            g["dedup_domain"],
        )
    return table


def _kv_table(title: str, items: dict[str, Any]) -> Table:
    table = Table("field", "value", title=title)
    for key, value in items.items():
        shown = json.dumps(value) if isinstance(value, dict | list) else str(value)
        table.add_row(key, shown)
    return table


@admin_app.command("create-guest")
def create_guest(
    name: str,
    weight: Annotated[int, typer.Option(help="share of memory under contention")] = 100,
    cap_pages: Annotated[int | None, typer.Option(help="persistent page cap")] = None,
    dedup_domain: Annotated[str, typer.Option(help="guests that may share pages")] = "default",
    compress: Annotated[
        str, typer.Option(help="on, off, or inherit (its domain's mode, else the broker's)")
    ] = "inherit",
    url: UrlOpt = None,
    admin_token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Create a guest and print its token (shown only this once)."""
    setting = _compress_setting(compress)
    with _client(url, admin_token, data_dir) as client:
        created = client.create_guest(
            name, weight=weight, cap_pages=cap_pages, dedup_domain=dedup_domain, compress=setting
        ).model_dump(mode="json")
    console.print(_guest_table([created]))
    console.print(f"token (shown once): [bold]{created['token']}[/bold]")


def _compress_setting(value: str) -> bool | None:
    """A guest's ``--compress``: on/off, or inherit (None)."""
    settings = {"on": True, "off": False, "inherit": None}
    if value not in settings:
        err.print(f"[red]invalid --compress[/red]: {value!r} (use on, off or inherit)")
        raise typer.Exit(2)
    return settings[value]


@admin_app.command("set-guest")
def set_guest(
    guest_id: int,
    weight: Annotated[int | None, typer.Option(help="share of memory under contention")] = None,
    cap_pages: Annotated[int | None, typer.Option(help="persistent page cap (-1: none)")] = None,
    compress: Annotated[
        str | None, typer.Option(help="on, off, or inherit (its domain's mode)")
    ] = None,
    dedup_domain: Annotated[str | None, typer.Option(help="move to this dedup domain")] = None,
    url: UrlOpt = None,
    admin_token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Change a guest's weight, cap, compression or dedup domain (options left out stay)."""
    changes: dict[str, Any] = {}
    if weight is not None:
        changes["weight"] = weight
    if cap_pages is not None:
        changes["cap_pages"] = None if cap_pages < 0 else cap_pages
    if compress is not None:
        changes["compress"] = _compress_setting(compress)
    if dedup_domain is not None:
        changes["dedup_domain"] = dedup_domain
    with _client(url, admin_token, data_dir) as client:
        guest = client.patch_guest(guest_id, **changes).model_dump(mode="json")
    guest.pop("pools", None)
    guest.pop("stats", None)
    console.print(_kv_table(f"guest {guest_id}", guest))


def _domain_table(domains: list[dict[str, Any]]) -> Table:
    keys = ["name", "trusted", "compress", "compress_mode", "guests", "charged_bytes",
            "used_bytes", "overridden_by"]  # fmt: skip
    table = Table(*keys, title="dedup domains")
    for d in domains:
        table.add_row(*(str(d.get(k)) for k in keys))
    return table


@admin_app.command("domains")
def domains(url: UrlOpt = None, admin_token: TokenOpt = None, data_dir: DataDirOpt = None) -> None:
    """List the dedup domains: trust, compression mode, guests and storage."""
    with _client(url, admin_token, data_dir) as client:
        shown = [d.model_dump(mode="json") for d in client.domains()]
    console.print(_domain_table(shown))


@admin_app.command("set-domain")
def set_domain(
    name: str,
    trusted: Annotated[
        bool | None,
        typer.Option(
            "--trusted/--untrusted",
            help="its guests trust each other: shared contents count once (docs/security.md)",
        ),
    ] = None,
    compress: Annotated[
        str | None, typer.Option(help="never, always, pressure, or default (the broker's)")
    ] = None,
    url: UrlOpt = None,
    admin_token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Set a dedup domain's trust and compression mode (options left out stay)."""
    changes: dict[str, Any] = {}
    if compress is not None:
        if compress not in ("never", "always", "pressure", "default"):
            err.print(f"[red]invalid --compress[/red]: {compress!r}")
            raise typer.Exit(2)
        changes["compress"] = None if compress == "default" else compress
    with _client(url, admin_token, data_dir) as client:
        shown = client.put_domain(name, trusted=trusted, **changes).model_dump(mode="json")
    console.print(_domain_table([shown]))
    if shown["overridden_by"]:
        console.print(
            f"guests {shown['overridden_by']} keep their own compress setting "
            "(set-guest --compress inherit to follow the domain)"
        )


@admin_app.command("set-compress")
def set_compress(
    mode: str, url: UrlOpt = None, admin_token: TokenOpt = None, data_dir: DataDirOpt = None
) -> None:
    """The broker's compression mode for guests and domains that set none."""
    if mode not in ("never", "always", "pressure"):
        err.print(f"[red]invalid mode[/red]: {mode!r} (never, always or pressure)")
        raise typer.Exit(2)
    with _client(url, admin_token, data_dir) as client:
        settings = client.patch_settings(compress=mode)
    console.print(f"compress default: {settings.compress}")


@admin_app.command("list")
def list_guests(
    url: UrlOpt = None, admin_token: TokenOpt = None, data_dir: DataDirOpt = None
) -> None:
    """List the guests."""
    with _client(url, admin_token, data_dir) as client:
        guests = [g.model_dump(mode="json") for g in client.list_guests()]
    console.print(_guest_table(guests))


@admin_app.command("show")
def show(
    guest_id: int, url: UrlOpt = None, admin_token: TokenOpt = None, data_dir: DataDirOpt = None
) -> None:
    """Show one guest with its pools, stats and pressure."""
    with _client(url, admin_token, data_dir) as client:
        guest = client.guest(guest_id).model_dump(mode="json")
    pools = guest.pop("pools", [])
    stats = guest.pop("stats", {})
    console.print(_kv_table(f"guest {guest_id}", guest))
    table = Table("pool", "kind", "shared", "uuid", "exclusive gets", "pages", title="pools")
    for p in pools:
        table.add_row(
            str(p["pool_id"]),
            p["kind"],
            str(p["shared"]),
            str(p["uuid"] or "-"),
            str(p["exclusive_gets"]),
            str(p["pages"]),
        )
    console.print(table)
    console.print(_kv_table("stats", stats))


def _guest_action(action: str) -> Any:
    def command(
        guest_id: int, url: UrlOpt = None, admin_token: TokenOpt = None, data_dir: DataDirOpt = None
    ) -> None:
        with _client(url, admin_token, data_dir) as client:
            {
                "freeze": client.freeze,
                "thaw": client.thaw,
                "flush": client.flush_guest,
                "delete": client.delete_guest,
            }[action](guest_id)
        console.print(f"guest {guest_id}: {action} done")

    command.__doc__ = {
        "freeze": "Freeze a guest: its puts are declined until thawed.",
        "thaw": "Thaw a frozen guest.",
        "flush": "Flush every page of a guest (its pools stay).",
        "delete": "Delete a guest and every page it has.",
    }[action]
    return command


admin_app.command("freeze")(_guest_action("freeze"))
admin_app.command("thaw")(_guest_action("thaw"))
admin_app.command("flush")(_guest_action("flush"))
admin_app.command("delete")(_guest_action("delete"))


@admin_app.command("shed")
def shed(
    guest_id: int,
    pages: Annotated[int, typer.Option(help="persistent pages the guest must return", min=1)],
    deadline: Annotated[
        float | None,
        typer.Option(help="seconds it has (default: the broker's shed_deadline_s)", min=0.001),
    ] = None,
    url: UrlOpt = None,
    admin_token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Ask a guest to return N persistent pages by a deadline (its coldest first); past the
    deadline its quota binds (docs/pressure.md, "Sheds"). No page is ever dropped."""
    with _client(url, admin_token, data_dir) as client:
        issued = client.shed(guest_id, pages, deadline)
    if issued.pages == 0:
        console.print(f"guest {guest_id} holds no persistent page: nothing to shed")
        return
    console.print(
        f"guest {guest_id}: shed {issued.pages} pages by {issued.deadline} "
        f"(notice {issued.seq}); quota now {issued.cap_pages}"
    )


@admin_app.command("stats")
def stats(url: UrlOpt = None, admin_token: TokenOpt = None, data_dir: DataDirOpt = None) -> None:
    """Global figures and one row per guest."""
    with _client(url, admin_token, data_dir) as client:
        figures = client.stats()
    guests = figures.pop("guests", [])
    console.print(_kv_table("broker", figures))
    if guests:
        keys = [k for k in guests[0] if not isinstance(guests[0][k], dict | list)]
        table = Table(*keys, title="guests")
        for g in guests:
            table.add_row(*(str(g.get(k, "")) for k in keys))
        console.print(table)


@admin_app.command("shared-auth")
def shared_auth(
    uuid: str,
    guest_id: int,
    deny: Annotated[bool, typer.Option("--deny", help="withdraw the authorisation")] = False,
    url: UrlOpt = None,
    admin_token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Allow a guest to create or join the shared pool UUID (or withdraw it with --deny)."""
    with _client(url, admin_token, data_dir) as client:
        client.shared_auth(uuid, guest_id, allow=not deny)
    console.print(f"guest {guest_id} {'may not' if deny else 'may'} use shared pool {uuid}")


@app.command()
def migrate(
    from_url: Annotated[str, typer.Option("--from", help="source broker URL")],
    to_url: Annotated[str, typer.Option("--to", help="destination broker URL")],
    guest: Annotated[str, typer.Option("--guest", help="name of the guest to move")],
    from_token: Annotated[
        str | None,
        typer.Option(envvar="TMEM_FROM_TOKEN", help="source admin token [$TMEM_ADMIN_TOKEN]"),
    ] = None,
    to_token: Annotated[
        str | None,
        typer.Option(envvar="TMEM_TO_TOKEN", help="destination admin token [$TMEM_ADMIN_TOKEN]"),
    ] = None,
    keep_token: Annotated[
        bool,
        typer.Option(
            "--keep-token/--new-token",
            help="the guest keeps its token and the source redirects it to the destination",
        ),
    ] = True,
) -> None:
    """Move a guest to another broker: export, import, verify the counts, then delete it at
    the source (which redirects the guest's calls to the destination). Prints the guest's new
    id, and its token when --new-token gave it one."""
    from broker.migrate import MigrationError, run

    fallback = os.environ.get("TMEM_ADMIN_TOKEN")
    src, dst = from_token or fallback, to_token or fallback
    if not src or not dst:
        err.print("[red]no admin tokens[/red]: pass --from-token/--to-token or set the env vars")
        raise typer.Exit(2)
    try:
        result = run(from_url, to_url, guest, src, dst, keep_token=keep_token)
    except MigrationError as exc:
        err.print(f"[red]migration failed[/red]: {exc}")
        raise typer.Exit(1) from exc
    out: dict[str, object] = {"guest_id": result.guest_id, "kept_token": keep_token}
    if not keep_token:
        out["token"] = result.token
    console.print(json.dumps(out))


def main() -> None:
    """Entry point of the ``tmem-broker`` script."""
    app(prog_name="tmem-broker")


if __name__ == "__main__":
    main()
