"""TmemClient and AsyncTmemClient follow a broker's 307 to the guest's home: the same request
(method, body, bearer token) goes to the new address, which is remembered; loops and long
chains fail as BrokerUnavailable (retried by the agents' policy), never as a wrong answer."""

from __future__ import annotations

import pytest

from guest_agent.client import AsyncTmemClient, TmemClient
from guest_agent.errors import BrokerUnavailable, ProtocolError
from guest_agent.transport import MockTransport, Request, Response

PAGE = b"\x07" * 4096


class Brokers:
    """Several mock brokers by base URL: ``home`` serves, the others redirect to ``home``."""

    def __init__(self, home: str, redirects: dict[str, str] | None = None) -> None:
        self.home = home
        self.redirects = redirects or {}
        self.seen: list[tuple[str, str, str, bytes, str | None]] = []
        self.pages: dict[str, bytes] = {}

    def transport(self, base: str) -> MockTransport:
        def handle(request: Request) -> Response:
            auth = dict(request.headers).get("Authorization")
            self.seen.append((base, request.method, request.target, bytes(request.body), auth))
            if base != self.home:
                to = self.redirects.get(base, self.home)
                return Response(307, b"", {"location": to + request.target})
            if request.method == "PUT":
                self.pages[request.target] = bytes(request.body)
                return Response(204)
            if request.method == "GET":
                return Response(200, self.pages[request.target])
            return Response(204)

        return MockTransport(handle)


def test_sync_client_follows_and_remembers_the_home() -> None:
    net = Brokers("http://b:2")
    with TmemClient("http://a:1", "tok", transport_factory=net.transport) as client:
        assert client.put(3, 7, 1, PAGE)
        assert client.base_url == "http://b:2"
        assert client.get(3, 7, 1) == PAGE
    # the put went to a, was redirected, and was resent whole with its token to b; the get
    # went straight to b
    assert [(s[0], s[1]) for s in net.seen] == [
        ("http://a:1", "PUT"),
        ("http://b:2", "PUT"),
        ("http://b:2", "GET"),
    ]
    assert net.seen[1][3] == PAGE and net.seen[1][4] == "Bearer tok"


def test_a_chain_of_moves_is_followed() -> None:
    net = Brokers("http://c:3", {"http://a:1": "http://b:2"})
    with TmemClient("http://a:1", "tok", transport_factory=net.transport) as client:
        assert client.put(0, 1, 2, PAGE)
        assert client.base_url == "http://c:3"


def test_a_loop_is_an_unavailable_broker() -> None:
    net = Brokers("http://nobody:9", {"http://a:1": "http://b:2", "http://b:2": "http://a:1"})
    with (
        TmemClient("http://a:1", "tok", transport_factory=net.transport) as client,
        pytest.raises(BrokerUnavailable, match="loop"),
    ):
        client.put(0, 1, 2, PAGE)


def test_too_many_hops() -> None:
    chain = {f"http://h{i}:1": f"http://h{i + 1}:1" for i in range(10)}
    net = Brokers("http://end:1", chain)
    with (
        TmemClient("http://h0:1", "tok", transport_factory=net.transport) as client,
        pytest.raises(BrokerUnavailable, match="redirects"),
    ):
        client.get(0, 1, 2)


def test_a_redirect_to_another_scheme_is_refused() -> None:
    def handle(request: Request) -> Response:
        return Response(307, b"", {"location": "file:///etc/passwd"})

    with (
        TmemClient("http://a:1", "tok", transport=MockTransport(handle)) as client,
        pytest.raises(ProtocolError),
    ):
        client.flush_page(0, 1, 2)


async def test_async_client_follows() -> None:
    net = Brokers("http://b:2")
    async with AsyncTmemClient("http://a:1", "tok", transport_factory=net.transport) as client:
        assert await client.put(1, 5, 0, PAGE)
        assert client.base_url == "http://b:2"
        assert await client.get(1, 5, 0) == PAGE
    assert [s[0] for s in net.seen] == ["http://a:1", "http://b:2", "http://b:2"]
    assert net.seen[1][4] == "Bearer tok" and net.seen[1][3] == PAGE


def test_an_unreachable_home_sends_the_next_call_back_to_the_first_broker() -> None:
    net = Brokers("http://b:2")
    dead = {"http://b:2": False}

    def factory(base: str) -> MockTransport:
        inner = net.transport(base)

        def handle(request: Request) -> Response:
            if dead.get(base):
                raise BrokerUnavailable("connection refused")
            return inner.handler(request)  # type: ignore[return-value]

        return MockTransport(handle)

    with TmemClient("http://a:1", "tok", transport_factory=factory) as client:
        assert client.put(0, 1, 2, PAGE)
        assert client.base_url == "http://b:2"
        dead["http://b:2"] = True
        with pytest.raises(BrokerUnavailable):
            client.get(0, 1, 2)
        assert client.base_url == "http://a:1"  # a knows where the guest went next
        net.home = "http://c:3"
        client.put(0, 1, 3, PAGE)
        assert client.base_url == "http://c:3"
