"""NoticeStream's handshake follows a 307 to the guest's home under the clients' rules
(guest_agent.redirects): real WebSocket servers on loopback that redirect as a non-home broker
does (an ``http://`` Location with the same path and query)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from http import HTTPStatus

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request as WsRequest
from websockets.http11 import Response as WsResponse

from guest_agent.errors import BrokerUnavailable
from guest_agent.notices import NoticeStream
from schemas.wire import Notice

pytestmark = pytest.mark.timeout(30)

Redirect = Callable[[], "str | None"]


def _url(server: Server) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return f"http://{host}:{port}"


@asynccontextmanager
async def _broker(redirect_to: Redirect, seen: list[dict[str, str]]) -> AsyncIterator[Server]:
    """A broker that redirects the handshake to ``redirect_to()`` (when not None), else
    accepts it and pushes one notice."""

    def process_request(conn: ServerConnection, request: WsRequest) -> WsResponse | None:
        seen.append(
            {":path": request.path, **{k.lower(): v for k, v in request.headers.raw_items()}}
        )
        target = redirect_to()
        if target is None:
            return None
        response = conn.respond(HTTPStatus.TEMPORARY_REDIRECT, "not home\n")
        response.headers["Location"] = target + request.path
        return response

    async def handler(ws: ServerConnection) -> None:
        notice = Notice(seq=7, type="freeze", issued_at=datetime.now(UTC))
        await ws.send(notice.model_dump_json())
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, process_request=process_request) as server:
        yield server


async def test_the_handshake_follows_the_redirect_to_the_home() -> None:
    seen_home: list[dict[str, str]] = []
    seen_other: list[dict[str, str]] = []
    async with AsyncExitStack() as stack:
        home = await stack.enter_async_context(_broker(lambda: None, seen_home))
        other = await stack.enter_async_context(_broker(lambda: _url(home), seen_other))
        home_url, other_url = _url(home), _url(other)
        stream = NoticeStream(other_url, "tok", after=3)
        it = stream.__aiter__()
        notice = await asyncio.wait_for(it.__anext__(), 10)
        await it.aclose()  # type: ignore[attr-defined]
        await stream.aclose()
    assert notice.seq == 7 and stream.transport_in_use == "websocket"
    assert stream.base_url == home_url and stream.first_url == other_url
    # same token at the home, marked as resent after a redirect; the path kept its ``after``
    assert seen_other[0]["authorization"] == seen_home[0]["authorization"] == "Bearer tok"
    assert "x-tmem-redirected" not in seen_other[0]
    assert seen_home[0]["x-tmem-redirected"] == "1"
    assert seen_other[0][":path"] == seen_home[0][":path"] == "/v1/notices/ws?after=3"


async def test_a_redirect_loop_is_broker_unavailable() -> None:
    urls: dict[str, str] = {}
    seen: list[dict[str, str]] = []
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(_broker(lambda: urls["b"], seen))
        b = await stack.enter_async_context(_broker(lambda: urls["a"], seen))
        urls.update(a=_url(a), b=_url(b))
        stream = NoticeStream(urls["a"], "tok")
        with pytest.raises(BrokerUnavailable, match="redirect loop"):
            await stream._handshake()
        await stream.aclose()
    assert len(seen) == 2  # a -> b -> a: refused before asking a again
