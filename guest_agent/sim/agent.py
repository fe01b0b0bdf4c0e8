"""Simulated guests on a real broker, through the real agent: :class:`TmemClient`,
:class:`Frontswap` (with its fallback file) and :class:`Cleancache`.

    links = connect_links(url, tokens)            # or create_guests(url, admin_token, n)
    try:
        result = run_simulation(config, links, broker_stats=lambda: fetch_stats(url, admin))
    finally:
        close_links(links)

What the simulator adds on top of the agent, and why:

* :class:`TimedTransport` wraps the client's HTTP transport and measures the wall time of page
  requests (``/v1/pools/...``): the broker latency the modelled time saved is set against.
* :class:`RecordingClient` remembers why the broker declined each put of a batch, so
  declines are reported by reason (``Frontswap.store_many`` answers only True/False). A page
  the shim kept out of the broker on its own (it knows it is at its cap, or pauses after a
  decline) is reported as ``quota (agent)`` (or ``frozen (agent)``, after the reason of the
  broker's last frontswap decline).
* Pages move in batches through the shims' batch calls (``Frontswap.store_many``,
  ``load_many``, ``invalidate_many``; ``Cleancache.put_many``, ``get_many``).
* The shim's timers (the pause after a decline, the backoff when the broker is down) run
  on a :class:`StepClock`, simulated time advanced by the runner, not on the wall clock.
* Notices are polled between steps (``GET /v1/notices?after=SEQ``) and handed to
  :meth:`Frontswap.handle_notice`, the agent's own shed/quota/freeze handling; sheds are acked
  with the pages returned. Polling at step boundaries keeps a run reproducible; with
  ``live_notices`` a :class:`~guest_agent.notices.NoticeHandler` thread answers them instead,
  as a long-running agent does.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from typing import Any

from guest_agent.admin import AdminClient
from guest_agent.client import PutResult, TmemClient
from guest_agent.errors import BrokerUnavailable, TmemClientError
from guest_agent.notices import NoticeHandler
from guest_agent.shims import Cleancache, Frontswap, frontswap_handle
from guest_agent.transport import HTTPTransport, Request, Response, Transport
from schemas.wire import CompressMode, DomainInfo, Notice

from .errors import BrokerSetupError
from .model import GuestBackend, SwapSource
from .runner import Timing

SWAP_TYPE = 0


class StepClock:
    """Simulated time for the shim's timers (pause after a decline, broker-down backoff):
    ``seconds_per_step`` per step, so a run does not depend on how fast the machine is."""

    def __init__(self, seconds_per_step: float = 0.1) -> None:
        self.seconds_per_step = seconds_per_step
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def set_step(self, step: int) -> None:
        self.now = step * self.seconds_per_step


class TimedTransport:
    """A transport that measures the wall time of page requests (``/v1/pools/``)."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.timing = Timing()

    def handle_request(self, request: Request) -> Response:
        if "/pools/" not in request.target:
            return self.inner.handle_request(request)
        t0 = time.perf_counter()
        try:
            return self.inner.handle_request(request)
        finally:
            self.timing.seconds += time.perf_counter() - t0
            self.timing.calls += 1

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


class RecordingClient(TmemClient):
    """A :class:`TmemClient` that remembers the reason of each declined batched put."""

    def __init__(self, base_url: str, token: str, **kwargs: Any) -> None:
        super().__init__(base_url, token, **kwargs)
        self.declined: dict[tuple[int, int, int], str] = {}

    def put_many(
        self, pool_id: int, pages: Sequence[tuple[int, int, bytes | memoryview]]
    ) -> list[PutResult]:
        results = super().put_many(pool_id, pages)
        for (oid, index, _), result in zip(pages, results, strict=True):
            if not result:
                self.declined[(pool_id, oid, index)] = result.reason or "declined"
        return results


class AgentBackend:
    """A simulated guest's :class:`~guest_agent.sim.model.GuestBackend` on the real agent."""

    def __init__(
        self,
        client: RecordingClient,
        frontswap: Frontswap,
        cache: Cleancache,
        *,
        shared_uuid: str | None = None,
    ) -> None:
        self.client = client
        self.frontswap = frontswap
        self.cache = cache
        # A shared pool (one per image, as a clustered filesystem's) is joined by every guest
        # of that image: its gets are not exclusive and one guest's put can serve another.
        self.cache_pool = cache.init_shared_fs(shared_uuid) if shared_uuid else cache.init_fs()
        self._last_swap_decline: str | None = None

    def swap_store(self, items: Sequence[tuple[int, bytes]]) -> list[str | None]:
        self.client.declined.clear()
        stored = self.frontswap.store_many(SWAP_TYPE, list(items))
        pool = self.frontswap.pool_id
        out: list[str | None] = []
        for (offset, _), ok in zip(items, stored, strict=True):
            if ok:
                out.append(None)
                continue
            reason = self.client.declined.get((pool or 0, *frontswap_handle(SWAP_TYPE, offset)))
            if reason is None:
                # Never offered: the shim knew it was at its cap, or is pausing after the
                # broker's last frontswap decline (whose reason is the reason here).
                reason = f"{self._last_swap_decline or 'quota'} (agent)"
            else:
                self._last_swap_decline = reason
            out.append(reason)
        return out

    def swap_load(self, offsets: Sequence[int]) -> list[tuple[SwapSource, bytes | None]]:
        where = [self.frontswap.where(SWAP_TYPE, o) for o in offsets]
        pages = self.frontswap.load_many(SWAP_TYPE, list(offsets))
        out: list[tuple[SwapSource, bytes | None]] = []
        for w, page in zip(where, pages, strict=True):
            source = "tmem" if w == "broker" else "disk" if w == "fallback" else "miss"
            out.append((source, page))
        return out

    def swap_invalidate(self, offsets: Sequence[int]) -> None:
        self.frontswap.invalidate_many(SWAP_TYPE, offsets)

    def swap_at_broker(self, offsets: Sequence[int]) -> list[bool]:
        return [self.frontswap.where(SWAP_TYPE, o) == "broker" for o in offsets]

    def cache_put(self, items: Sequence[tuple[int, int, bytes]]) -> list[str | None]:
        return self.cache.put_many(self.cache_pool, items)

    def cache_get(self, keys: Sequence[tuple[int, int]]) -> list[bytes | None]:
        return self.cache.get_many(self.cache_pool, keys)


class AgentLink:
    """One simulated guest connected to a broker with its own token (see module doc)."""

    def __init__(
        self,
        name: str,
        base_url: str,
        token: str,
        *,
        fallback: str | os.PathLike[str] | None = None,
        live_notices: bool = False,
        guest_id: int | None = None,
        seconds_per_step: float = 0.1,
        shared_uuid: str | None = None,
    ) -> None:
        self.name = name
        self.guest_id = guest_id
        self.transport = TimedTransport(HTTPTransport(base_url, timeout=60.0))
        self.client = RecordingClient(base_url, token, transport=self.transport)
        self.clock = StepClock(seconds_per_step)
        self.frontswap = Frontswap(self.client, fallback=fallback, clock=self.clock)
        try:
            self.frontswap.init(SWAP_TYPE)
            self.backend: GuestBackend = AgentBackend(
                self.client,
                self.frontswap,
                Cleancache(self.client),
                shared_uuid=shared_uuid,
            )
        except BaseException:
            self.frontswap.close()
            self.client.close()
            raise
        self.last_seq = 0
        self._sheds = 0
        self._returned = 0
        self._lock = threading.Lock()
        self.handler: NoticeHandler | None = None
        if live_notices:
            self.handler = NoticeHandler(self.frontswap, on_notice=self._on_notice)
            self.handler.start()

    @property
    def timing(self) -> Timing:
        return self.transport.timing

    def _on_notice(self, notice: Notice, returned: int | None) -> None:
        if notice.type == "shed":
            with self._lock:
                self._sheds += 1
                self._returned += returned or 0

    def on_step(self, step: int) -> None:
        self.clock.set_step(step)

    def report_pressure(self, pressure: dict[str, float | int]) -> None:
        self.client.report_pressure(
            psi_some_avg10=float(pressure["psi_some_avg10"]),
            psi_full_avg10=float(pressure["psi_full_avg10"]),
            mem_available_bytes=int(pressure["mem_available_bytes"]),
            swap_used_bytes=int(pressure["swap_used_bytes"]),
        )

    def service_notices(self) -> tuple[int, int]:
        if self.handler is None:
            for notice in self.client.notices(after=self.last_seq, wait=0):
                self.last_seq = max(self.last_seq, notice.seq)
                returned = self.frontswap.handle_notice(notice)
                if notice.type == "shed":
                    self.client.ack(notice.seq, returned or 0)
                    self._on_notice(notice, returned)
        with self._lock:
            out = (self._sheds, self._returned)
            self._sheds = self._returned = 0
        return out

    def self_stats(self) -> dict[str, Any]:
        return self.client.self_info().model_dump(mode="json")

    def close(self) -> None:
        if self.handler is not None:
            self.handler.stop()
        self.frontswap.close()
        self.client.close()


# -- admin side (the one admin client: a handful of calls, not the hot path) -------------------


@contextlib.contextmanager
def _admin(url: str, token: str, what: str) -> Iterator[AdminClient]:
    """An :class:`AdminClient` whose failures become :class:`BrokerSetupError` naming ``what``."""
    try:
        with AdminClient(url, token, timeout=30) as admin:
            yield admin
    except BrokerUnavailable as exc:
        raise BrokerSetupError(f"{what}: broker unreachable at {url}: {exc}") from exc
    except TmemClientError as exc:
        raise BrokerSetupError(f"{what}: {exc}") from exc


def create_guests(
    url: str,
    admin_token: str,
    count: int,
    *,
    prefix: str | None = None,
    cap_pages: int | None = None,
    dedup_domain: str = "default",
    compress: bool | None = None,
) -> list[tuple[int, str]]:
    """Create ``count`` guests (``POST /v1/guests``) in ``dedup_domain``, each with the
    compress setting ``compress`` (``None``: left unset, so they inherit their domain's mode,
    else the broker's); ``(guest_id, token)`` of each."""
    prefix = prefix or f"sim-{os.urandom(4).hex()}-"
    out = []
    with _admin(url, admin_token, "POST /v1/guests") as admin:
        for i in range(count):
            created = admin.create_guest(
                f"{prefix}{i}", cap_pages=cap_pages, dedup_domain=dedup_domain, compress=compress
            )
            out.append((created.guest_id, created.token))
    return out


def set_domain(
    url: str,
    admin_token: str,
    name: str,
    *,
    trusted: bool | None = None,
    compress: CompressMode | None = None,
) -> DomainInfo:
    """``PUT /v1/domains/{name}``: make the guests' dedup domain trusted and/or give it a
    compression mode (``None`` leaves each as it is)."""
    with _admin(url, admin_token, f"PUT /v1/domains/{name}") as admin:
        if compress is None:
            return admin.put_domain(name, trusted=trusted)
        return admin.put_domain(name, trusted=trusted, compress=compress)


def delete_guests(url: str, admin_token: str, guest_ids: Sequence[int]) -> None:
    """Remove guests the simulation created (every page of theirs goes too)."""
    with _admin(url, admin_token, "DELETE /v1/guests/{id}") as admin:
        for gid in guest_ids:
            admin.delete_guest(gid)


def share_images(
    url: str, admin_token: str, guest_ids: Sequence[int], image_roots: Sequence[str]
) -> list[str]:
    """One fresh shared-pool UUID per distinct image; authorises guest ``i`` for the pool of
    ``image_roots[i]`` (``POST /v1/shared-auth``). Fresh UUIDs, so a run never sees the pages
    an earlier run left in a shared pool."""
    by_root: dict[str, str] = {}
    out = []
    with _admin(url, admin_token, "POST /v1/shared-auth") as admin:
        for gid, root in zip(guest_ids, image_roots, strict=True):
            pool_uuid = by_root.setdefault(root, str(uuidlib.uuid4()))
            admin.shared_auth(pool_uuid, gid)
            out.append(pool_uuid)
    return out


def fetch_stats(url: str, admin_token: str) -> dict[str, Any]:
    """``GET /v1/stats``."""
    with _admin(url, admin_token, "GET /v1/stats") as admin:
        return admin.stats()


def fetch_domain(url: str, admin_token: str, name: str) -> dict[str, Any] | None:
    """Dedup domain ``name`` as ``GET /v1/domains`` shows it (trust, mode, guests, bytes)."""
    with _admin(url, admin_token, "GET /v1/domains") as admin:
        for domain in admin.domains():
            if domain.name == name:
                return domain.model_dump(mode="json")
    return None


def connect_links(
    url: str,
    tokens: Sequence[str],
    *,
    guest_ids: Sequence[int | None] | None = None,
    live_notices: bool = False,
    shared_uuids: Sequence[str | None] | None = None,
) -> list[AgentLink]:
    """One :class:`AgentLink` per token, named ``guest-0``, ``guest-1``, ...; guest ``i``'s
    page cache is the shared pool ``shared_uuids[i]`` when given (see :func:`share_images`)."""
    ids = list(guest_ids) if guest_ids is not None else [None] * len(tokens)
    uuids = list(shared_uuids) if shared_uuids is not None else [None] * len(tokens)
    links: list[AgentLink] = []
    try:
        for i, token in enumerate(tokens):
            links.append(
                AgentLink(
                    f"guest-{i}",
                    url,
                    token,
                    live_notices=live_notices,
                    guest_id=ids[i],
                    shared_uuid=uuids[i],
                )
            )
    except BaseException:
        close_links(links)
        raise
    return links


def close_links(links: Sequence[AgentLink]) -> None:
    """Close every link (notice threads, fallback files, connections)."""
    for link in links:
        link.close()
