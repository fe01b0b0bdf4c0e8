"""Move a guest between brokers: ``tmem-broker migrate --from URL --to URL --guest NAME``.

Xen's save/restore, done by an operator with both admin tokens::

    result = migrate("http://a:8470", "http://b:8470", "vm-1", from_token=A, to_token=B,
                     progress=lambda pages, total: ...)
    print(result.guest_id)   # the guest's new id at the destination; it kept its token

Steps: find the guest by name at the source; freeze it there (so no put lands after the
export: the export then leaves it frozen); stream ``GET /v1/guests/{id}/export`` into
``POST /v1/guests/import`` at the destination, decoding it on the way to count pages and check
every checksum; verify that the destination holds as many persistent pages as the stream
carried; only then delete the guest at the source. On any failure before the delete the source
guest is thawed (unless it was frozen before) and keeps all its pages.

The guest keeps its token (the stream carries its hash; ``keep_token=False`` gives it a new
one), and the source is told where it went (``POST /v1/guests/{id}/moved``): from then on it
answers that token's calls with ``307`` to the destination, so the guest's agent (shim or NBD
export) follows by itself, its pool ids and pages unchanged. Puts made while the guest was
frozen were declined (``frozen``) and went to the agent's fallback: no page is lost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from guest_agent.admin import AdminClient
from guest_agent.errors import BrokerError, TmemClientError
from schemas.export import ExportDecoder, ExportError, ExportTrailer
from schemas.wire import Imported


class MigrationError(RuntimeError):
    """The move did not complete; the message says what happened and where the guest is."""


@dataclass(frozen=True)
class MigrationResult:
    """Where the guest is now: its new id and token at the destination, and what moved."""

    guest_id: int
    token: str
    pages: int
    zero_pages: int
    source_guest_id: int


@contextlib.contextmanager
def _step(broker: AdminClient, what: str) -> Iterator[None]:
    """One admin call of the move: its failure becomes a :class:`MigrationError` naming it."""
    try:
        yield
    except BrokerError as exc:
        raise MigrationError(
            f"{broker.base_url}: {what} answered {exc.status}: {exc.code}: {exc.message}"
        ) from exc
    except TmemClientError as exc:
        raise MigrationError(f"{broker.base_url}: {what} failed: {exc}") from exc


def persistent_pages(guest: dict[str, Any]) -> int:
    """Logical persistent pages of a guest as ``GET /v1/guests/{id}`` shows them: its stats'
    ``persistent_pages``, else the sum over its persistent pools."""
    stats = guest.get("stats") or {}
    if isinstance(stats.get("persistent_pages"), int):
        return int(stats["persistent_pages"])
    return sum(
        int(p.get("pages") or 0) for p in guest.get("pools", []) if p.get("kind") == "persistent"
    )


def _client(url: str, token: str, timeout: float) -> AdminClient:
    try:
        return AdminClient(url, token, timeout=timeout)
    except ValueError as exc:
        raise MigrationError(f"not a broker URL: {url!r}") from exc


def migrate(
    from_url: str,
    to_url: str,
    guest_name: str,
    *,
    from_token: str,
    to_token: str,
    progress: Callable[[int, int], None] | None = None,
    timeout: float = 600.0,
    keep_token: bool = True,
) -> MigrationResult:
    """Move ``guest_name`` from one broker to another; see the module docstring.

    ``progress(pages_sent, pages_total)`` is called as the stream passes through.
    """
    with _client(from_url, from_token, timeout) as src, _client(to_url, to_token, timeout) as dst:
        return _migrate(src, dst, guest_name, progress, keep_token)


def _migrate(
    src: AdminClient,
    dst: AdminClient,
    guest_name: str,
    progress: Callable[[int, int], None] | None,
    keep_token: bool = True,
) -> MigrationResult:
    with _step(src, "GET /v1/guests"):
        guest = src.find_guest(guest_name)
    if guest is None:
        raise MigrationError(f"{src.base_url} has no guest named {guest_name!r}")
    source_id = guest.guest_id
    total = persistent_pages(guest.model_dump(mode="json"))
    was_frozen = guest.frozen
    if not was_frozen:
        with _step(src, f"POST /v1/guests/{source_id}/freeze"):
            src.freeze(source_id)
    try:
        imported, trailer = _stream(src, dst, source_id, total, progress, keep_token)
        new_id = imported.guest_id
        with _step(dst, f"GET /v1/guests/{new_id}"):
            there = dst.guest(new_id)
        held = persistent_pages(there.model_dump(mode="json"))
        if held != trailer.pages:
            raise MigrationError(
                f"verification failed: the stream carried {trailer.pages} pages, {dst.base_url} "
                f"guest {new_id} holds {held}; the source guest was kept"
            )
    except BaseException:
        if not was_frozen:
            # Report the original failure; if the thaw fails too the guest stays frozen there.
            with contextlib.suppress(MigrationError), _step(src, "thaw"):
                src.thaw(source_id)
        raise
    if keep_token:
        with _step(src, f"POST /v1/guests/{source_id}/moved"):
            src.moved(source_id, dst.base_url)  # deletes it there; its token is redirected
    else:
        with _step(src, f"DELETE /v1/guests/{source_id}"):
            src.delete_guest(source_id)
    return MigrationResult(new_id, imported.token, trailer.pages, trailer.zero_pages, source_id)


def _stream(
    src: AdminClient,
    dst: AdminClient,
    source_id: int,
    total: int,
    progress: Callable[[int, int], None] | None,
    keep_token: bool = True,
) -> tuple[Imported, ExportTrailer]:
    decoder = ExportDecoder()
    try:
        with _step(src, "export"):
            export = src.export_guest(source_id)
        with export:

            def body() -> Iterator[bytes]:
                for chunk in export:
                    decoder.feed(chunk)  # raises on a corrupted stream: the import never completes
                    if progress is not None:
                        progress(decoder.pages, max(total, decoder.pages))
                    yield chunk
                decoder.finish()

            try:
                imported = dst.import_guest(body(), keep_token=keep_token)
            except BrokerError as exc:
                raise MigrationError(
                    f"import at {dst.base_url} answered {exc.status}: {exc.code}: {exc.message}"
                ) from exc
        return imported, decoder.finish()
    except TmemClientError as exc:
        raise MigrationError(f"the stream broke: {exc}") from exc
    except ExportError as exc:
        # The destination saw a stream without its trailer: it refuses it whole.
        raise MigrationError(f"the export stream is damaged: {exc}") from exc


def run(
    from_url: str,
    to_url: str,
    guest_name: str,
    from_token: str,
    to_token: str,
    *,
    keep_token: bool = True,
) -> MigrationResult:
    """``tmem-broker migrate``: :func:`migrate` with a rich progress bar; prints the result."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("pages"),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(f"moving {guest_name}", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        result = migrate(
            from_url,
            to_url,
            guest_name,
            from_token=from_token,
            to_token=to_token,
            progress=progress,
            keep_token=keep_token,
        )
        bar.update(task, completed=result.pages, total=result.pages)
    console.print(
        f"moved guest {guest_name!r}: {result.pages} persistent pages ({result.zero_pages} zero) "
        f"verified at {to_url}; source guest {result.source_guest_id} deleted"
        + (" (its token now redirects there)" if keep_token else "")
    )
    return result
