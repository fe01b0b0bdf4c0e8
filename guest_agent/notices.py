"""Broker notices for a guest: a resuming async iterator and a runner that answers them.

::

    async for notice in NoticeStream(base_url, token):      # WebSocket, long-poll fallback
        print(notice.seq, notice.type)

    handler = NoticeHandler(frontswap)          # answers shed/quota/freeze/thaw for a Frontswap
    handler.start()                             # in a daemon thread with its own event loop
    ...
    handler.stop()
    # or, inside a running loop:  task = asyncio.create_task(run_notices(frontswap))

:class:`NoticeStream` connects to ``/v1/notices/ws?after=SEQ`` (``Authorization`` header) and
yields the JSON notices pushed there. When the handshake is refused with a status other than
401/403 (no WebSocket route, a proxy in between), it switches to long polling
(``GET /v1/notices?after=SEQ&wait=...``) for good. A dropped connection or an unreachable broker
is retried with backoff, resuming after the last sequence number yielded, so a notice is
yielded once even across reconnects (sequence numbers only grow, also across broker restarts).
A 401/403 raises :class:`~guest_agent.errors.AuthError`/``Forbidden``.

In a cluster of brokers (docs/scale.md) only the guest's home pushes its notices; any other
broker answers the handshake with ``307`` and ``Location`` on the home. The stream follows it
with the same token, under the same bounds as the clients (:mod:`guest_agent.redirects`: at
most ``MAX_HOPS``, a loop is :class:`~guest_agent.errors.BrokerUnavailable` and retried), and
keeps the home's address for its reconnects. When the home moves, the old home closes the
socket (or answers the next handshake with 307) and the stream reconnects to the new one; when
the remembered home does not answer at all, it goes back to the broker it was given
(:attr:`NoticeStream.first_url`), which knows the current home.

:class:`NoticeHandler` hands each notice to :meth:`Frontswap.handle_notice` in a worker thread
(the shim's calls block) and acks every ``shed`` with the number of pages it returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus, WebSocketException

from guest_agent.client import AsyncTmemClient
from guest_agent.errors import (
    AuthError,
    BrokerError,
    BrokerUnavailable,
    Forbidden,
    ProtocolError,
    RateLimited,
    ServerError,
    TmemClientError,
)
from guest_agent.redirects import REDIRECTED_HEADER, REDIRECTS, Chain, new_base
from guest_agent.shims import Frontswap
from guest_agent.transport import Response, unix_socket_path
from schemas.wire import Notice

__all__ = ["NoticeHandler", "NoticeStream", "run_notices"]


def _ws_url(base_url: str, after: int) -> str:
    if unix_socket_path(base_url) is not None:
        return f"ws://localhost{_ws_target(after)}"
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    path = parts.path.rstrip("/") + "/v1/notices/ws"
    return urlunsplit((scheme, parts.netloc, path, f"after={after}", ""))


def _ws_target(after: int) -> str:
    return f"/v1/notices/ws?after={after}"


class _Connect(ws_connect):
    """``websockets``' connect without its own redirect following: a broker's 307 names an
    ``http://`` Location, which it refuses, and the stream applies the clients' bounds."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


class NoticeStream:
    """An endless async iterator of the guest's notices (see the module doc).

    ``after`` is the last sequence number already handled. ``use_websocket=False`` long-polls
    only. ``poll_wait`` is the long-poll wait (seconds, <= 60). ``backoff``/``max_backoff``
    bound the reconnect delays. ``client`` (an :class:`AsyncTmemClient`) is used for long
    polling; by default the stream makes its own.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        after: int = 0,
        use_websocket: bool = True,
        poll_wait: float = 30.0,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
        client: AsyncTmemClient | None = None,
    ) -> None:
        self.base_url = base_url  # the broker connected to: the home, once redirected there
        self.first_url = base_url  # the broker given: asked again when the home is unreachable
        self.last_seq = after
        self.use_websocket = use_websocket
        self.poll_wait = poll_wait
        self._token = token
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._own_client = client is None
        self._client = client or AsyncTmemClient(base_url, token, timeout=poll_wait + 15.0)
        self.transport_in_use: str | None = None  # "websocket" or "poll", for tools and tests

    def __aiter__(self) -> AsyncIterator[Notice]:
        return self._run()

    async def aclose(self) -> None:
        """Close the long-poll client when the stream made it."""
        if self._own_client:
            await self._client.aclose()

    def _fresh(self, notice: Notice) -> bool:
        if notice.seq <= self.last_seq:
            return False
        self.last_seq = notice.seq
        return True

    async def _run(self) -> AsyncIterator[Notice]:
        delay = self._backoff
        while True:
            try:
                if self.use_websocket:
                    async for notice in self._websocket():
                        delay = self._backoff
                        yield notice
                else:
                    fresh = await self._poll()
                    for notice in fresh:
                        yield notice
                    delay = self._backoff
                    if not fresh:
                        # An empty answer before ``wait`` ran out (a broker that does not
                        # hold polls, or wait=0): pause rather than spin.
                        await asyncio.sleep(self._backoff)
                    continue
            except (AuthError, Forbidden):
                raise
            except OSError:
                # the remembered home does not answer (it died, or the guest moved off a
                # broker that stopped): ask the broker we were given where the home is now
                self.base_url = self.first_url
            except (BrokerUnavailable, ServerError, RateLimited, ProtocolError):
                pass
            except WebSocketException:
                pass
            except TimeoutError:
                pass
            # Reconnect after a drop or an unreachable broker, backing off.
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_backoff)

    async def _poll(self) -> list[Notice]:
        self.transport_in_use = "poll"
        notices = await self._client.notices(after=self.last_seq, wait=self.poll_wait)
        return [n for n in notices if self._fresh(n)]

    async def _websocket(self) -> AsyncIterator[Notice]:
        ws = await self._handshake()
        if ws is None:
            return
        self.transport_in_use = "websocket"
        try:
            async for message in ws:
                try:
                    notice = Notice.model_validate_json(message)
                except ValueError as exc:
                    raise ProtocolError(f"bad notice frame: {exc}") from exc
                if self._fresh(notice):
                    yield notice
        finally:
            await ws.close()
        raise BrokerUnavailable("notice WebSocket closed")

    async def _handshake(self) -> ClientConnection | None:
        """Open the WebSocket at the guest's home, following redirects there (``None``: no
        WebSocket route, long-poll from now on)."""
        chain = Chain(self.base_url)
        headers = {"Authorization": f"Bearer {self._token}"}
        while True:
            try:
                return await self._open(self.base_url, headers)
            except InvalidStatus as exc:
                status = exc.response.status_code
                location = exc.response.headers.get("Location")
                if status in REDIRECTS and location:
                    target = _ws_target(self.last_seq)
                    base = new_base(target, Response(status, headers={"location": location}))
                    self.base_url = chain.next(base)
                    # resent after a redirect: the home is asked of PostgreSQL, not a view
                    headers = {**headers, REDIRECTED_HEADER[0]: REDIRECTED_HEADER[1]}
                    continue
                if status == 401:
                    raise AuthError(
                        401, "unauthorised", "notice WebSocket refused the token"
                    ) from exc
                if status == 403:
                    raise Forbidden(403, "forbidden", "notice WebSocket refused") from exc
                if status >= 500:
                    raise ServerError(status, "http_error", "notice WebSocket handshake") from exc
                # No WebSocket route here (404, 405, 426 behind a proxy...): long-poll from now on.
                self.use_websocket = False
                return None

    async def _open(self, base_url: str, headers: dict[str, str]) -> ClientConnection:
        url = _ws_url(base_url, self.last_seq)
        unix = unix_socket_path(base_url)
        if unix is not None:
            return await _Connect(
                url, unix=True, path=unix, additional_headers=headers, proxy=None, open_timeout=10
            )
        return await _Connect(url, additional_headers=headers, proxy=None, open_timeout=10)


OnNotice = Callable[[Notice, "int | None"], "Awaitable[None] | None"]


class NoticeHandler:
    """Answers a :class:`~guest_agent.shims.Frontswap`'s notices until stopped.

    ``base_url``/``token`` default to those of the frontswap's client. ``on_notice(notice,
    pages_returned)`` is called after each notice is handled (sync or async), e.g. to log.
    Use :meth:`run` in a task, or :meth:`start`/:meth:`stop` for a thread.
    """

    def __init__(
        self,
        frontswap: Frontswap,
        base_url: str | None = None,
        token: str | None = None,
        *,
        after: int = 0,
        use_websocket: bool = True,
        poll_wait: float = 30.0,
        on_notice: OnNotice | None = None,
        client: AsyncTmemClient | None = None,
    ) -> None:
        self.frontswap = frontswap
        self.base_url = base_url or frontswap.client.base_url
        token = token if token is not None else frontswap.client.token
        self._client = client or AsyncTmemClient(self.base_url, token, timeout=poll_wait + 15.0)
        self._own_client = client is None
        self.stream = NoticeStream(
            self.base_url,
            token,
            after=after,
            use_websocket=use_websocket,
            poll_wait=poll_wait,
            client=self._client,
        )
        self.on_notice = on_notice
        self.handled = 0
        self.errors: list[BaseException] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = threading.Event()

    async def handle(self, notice: Notice) -> int | None:
        """Handle one notice: the frontswap reacts, a shed is acked with the pages returned."""
        returned = await asyncio.to_thread(self.frontswap.handle_notice, notice)
        if notice.type == "shed":
            await self._ack(notice.seq, returned or 0)
        self.handled += 1
        if self.on_notice is not None:
            result = self.on_notice(notice, returned)
            if asyncio.iscoroutine(result):
                await result
        return returned

    async def _ack(self, seq: int, pages: int) -> None:
        delay = 0.1
        for _ in range(5):
            try:
                await self._client.ack(seq, pages)
                return
            except (BrokerUnavailable, ServerError, RateLimited):
                await asyncio.sleep(delay)
                delay *= 2
            except BrokerError as exc:  # e.g. the shed expired: nothing more to do
                self.errors.append(exc)
                return

    async def run(self) -> None:
        """Handle notices until cancelled (or a 401/403 ends the stream)."""
        try:
            async for notice in self.stream:
                try:
                    await self.handle(notice)
                except TmemClientError as exc:
                    self.errors.append(exc)
        finally:
            if self._own_client:
                with contextlib.suppress(Exception):
                    await self._client.aclose()

    # --- thread mode
    def start(self) -> None:
        """Run :meth:`run` in a daemon thread with its own event loop."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._thread_main, name="tmem-notices", daemon=True)
        self._thread.start()
        self._started.wait()

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._task = loop.create_task(self.run())
            self._started.set()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self._task)
        except BaseException as exc:  # pragma: no cover - reported through .errors
            self.errors.append(exc)
        finally:
            self._started.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread started by :meth:`start` and wait for it."""
        thread, loop, task = self._thread, self._loop, self._task
        if thread is None:
            return
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)
        thread.join(timeout)
        self._thread = None


async def run_notices(frontswap: Frontswap, **kwargs: Any) -> None:
    """Handle ``frontswap``'s notices until cancelled; kwargs as for :class:`NoticeHandler`."""
    await NoticeHandler(frontswap, **kwargs).run()
