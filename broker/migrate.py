"""Move a guest between brokers: ``tmem-broker migrate --from URL --to URL --guest NAME``.

Xen's save/restore, done by an operator with both admin tokens::

    result = migrate("http://a:8470", "http://b:8470", "vm-1", from_token=A, to_token=B,
                     progress=lambda pages, total: ...)
    print(result.guest_id, result.token)   # the guest's new id and token at the destination

Steps: find the guest by name at the source; freeze it there (so no put lands after the
export: the export then leaves it frozen); stream ``GET /v1/guests/{id}/export`` into
``POST /v1/guests/import`` at the destination, decoding it on the way to count pages and check
every checksum; verify that the destination holds as many persistent pages as the stream
carried; only then delete the guest at the source. On any failure before the delete the source
guest is thawed (unless it was frozen before) and keeps all its pages.
"""

from __future__ import annotations

import contextlib
import http.client
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from schemas.export import EXPORT_CONTENT_TYPE, ExportDecoder, ExportError, ExportTrailer

_CHUNK = 1 << 20


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


class _Broker:
    """A tiny admin client on http.client: it streams bodies both ways without buffering."""

    def __init__(self, url: str, token: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MigrationError(f"not a broker URL: {url!r}")
        self.url = url.rstrip("/")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._https = parts.scheme == "https"
        self._token = token
        self._timeout = timeout

    def connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self._timeout)

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}", **extra}

    def json(self, method: str, path: str, expect: int = 200) -> Any:
        conn = self.connect()
        try:
            conn.request(method, path, headers=self.headers())
            resp = conn.getresponse()
            body = resp.read()
        except OSError as exc:
            raise MigrationError(f"{self.url}: {method} {path} failed: {exc}") from exc
        finally:
            conn.close()
        if resp.status != expect:
            raise MigrationError(
                f"{self.url}: {method} {path} answered {resp.status}: {_error(body)}"
            )
        return json.loads(body) if body else None


def _error(body: bytes) -> str:
    try:
        err = json.loads(body)["error"]
        return f"{err['code']}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")


def persistent_pages(guest: dict[str, Any]) -> int:
    """Logical persistent pages of a guest as ``GET /v1/guests/{id}`` shows them: its stats'
    ``persistent_pages``, else the sum over its persistent pools."""
    stats = guest.get("stats") or {}
    if isinstance(stats.get("persistent_pages"), int):
        return int(stats["persistent_pages"])
    return sum(
        int(p.get("pages") or 0) for p in guest.get("pools", []) if p.get("kind") == "persistent"
    )


def migrate(
    from_url: str,
    to_url: str,
    guest_name: str,
    *,
    from_token: str,
    to_token: str,
    progress: Callable[[int, int], None] | None = None,
    timeout: float = 600.0,
) -> MigrationResult:
    """Move ``guest_name`` from one broker to another; see the module docstring.

    ``progress(pages_sent, pages_total)`` is called as the stream passes through.
    """
    src = _Broker(from_url, from_token, timeout)
    dst = _Broker(to_url, to_token, timeout)
    guests = src.json("GET", "/v1/guests")
    if isinstance(guests, dict):
        guests = guests.get("guests", [])
    match = [g for g in guests if g.get("name") == guest_name]
    if not match:
        raise MigrationError(f"{from_url} has no guest named {guest_name!r}")
    guest = match[0]
    source_id = int(guest["guest_id"])
    total = persistent_pages(guest)
    was_frozen = bool(guest.get("frozen"))
    if not was_frozen:
        src.json("POST", f"/v1/guests/{source_id}/freeze", expect=204)
    try:
        imported, trailer = _stream(src, dst, source_id, total, progress)
        new_id = int(imported["guest_id"])
        there = dst.json("GET", f"/v1/guests/{new_id}")
        held = persistent_pages(there)
        if held != trailer.pages:
            raise MigrationError(
                f"verification failed: the stream carried {trailer.pages} pages, {to_url} guest "
                f"{new_id} holds {held}; the source guest was kept"
            )
    except BaseException:
        if not was_frozen:
            # Report the original failure; if the thaw fails too the guest stays frozen there.
            with contextlib.suppress(MigrationError):
                src.json("POST", f"/v1/guests/{source_id}/thaw", expect=204)
        raise
    src.json("DELETE", f"/v1/guests/{source_id}", expect=204)
    return MigrationResult(
        new_id, str(imported["token"]), trailer.pages, trailer.zero_pages, source_id
    )


def _stream(
    src: _Broker,
    dst: _Broker,
    source_id: int,
    total: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[dict[str, Any], ExportTrailer]:
    out = src.connect()
    into = dst.connect()
    try:
        out.request("GET", f"/v1/guests/{source_id}/export", headers=src.headers())
        resp = out.getresponse()
        if resp.status != 200:
            raise MigrationError(f"export answered {resp.status}: {_error(resp.read())}")
        decoder = ExportDecoder()

        def body() -> Iterator[bytes]:
            while chunk := resp.read1(_CHUNK):
                decoder.feed(chunk)  # raises on a corrupted stream: the import is never completed
                if progress is not None:
                    progress(decoder.pages, max(total, decoder.pages))
                yield chunk
            decoder.finish()

        into.request(
            "POST",
            "/v1/guests/import",
            body=body(),
            headers=dst.headers(**{"Content-Type": EXPORT_CONTENT_TYPE}),
            encode_chunked=True,
        )
        answer = into.getresponse()
        data = answer.read()
        if answer.status != 201:
            raise MigrationError(f"import at {dst.url} answered {answer.status}: {_error(data)}")
        return json.loads(data), decoder.finish()
    except OSError as exc:
        raise MigrationError(f"the stream broke: {exc}") from exc
    except ExportError as exc:
        # The destination saw a stream without its trailer: it refuses it whole.
        raise MigrationError(f"the export stream is damaged: {exc}") from exc
    finally:
        out.close()
        into.close()


def run(
    from_url: str, to_url: str, guest_name: str, from_token: str, to_token: str
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
        )
        bar.update(task, completed=result.pages, total=result.pages)
    console.print(
        f"moved guest {guest_name!r}: {result.pages} persistent pages ({result.zero_pages} zero) "
        f"verified at {to_url}; source guest {result.source_guest_id} deleted"
    )
    return result
