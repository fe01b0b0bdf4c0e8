"""The one admin client of the broker (api-v1.md, "Admin endpoints").

``tmem-broker admin ...``, ``tmem-broker migrate`` and the simulator all talk to the broker's
admin API through it::

    with AdminClient("http://127.0.0.1:8470", admin_token) as admin:
        created = admin.create_guest("vm-1", cap_pages=1024)   # GuestCreated: .guest_id, .token
        for guest in admin.list_guests():                     # AdminGuest (GuestInfo + pressure)
            ...
        admin.freeze(created.guest_id); admin.thaw(created.guest_id)
        figures = admin.stats()                               # GET /v1/stats, a dict
        admin.patch_guest(created.guest_id, compress=None)    # inherit the domain's mode
        admin.put_domain("tenant-a", trusted=True, compress="pressure")   # DomainInfo
        admin.domains()                                       # [DomainInfo, ...]
        admin.patch_settings(compress="pressure")             # BrokerSettings
        with admin.export_guest(created.guest_id) as stream:  # a guest's export, piece by piece
            imported = other.import_guest(stream)             # Imported: .guest_id, .token

It lives in ``guest_agent`` (never ``broker``) so an operator's or a simulator's machine needs no
server stack, and it rides the agent's own transport: the address may be ``http(s)://`` or
``unix:PATH``, as for every agent command. Failures raise the agent's exception tree
(:mod:`guest_agent.errors`): :class:`~guest_agent.errors.BrokerUnavailable` when the broker
cannot be reached, a :class:`~guest_agent.errors.BrokerError` subclass carrying ``status``,
``code`` and ``message`` when it answers an error.

Request bodies are sent as given and validated by the broker (a bad name is its 422, reported
like any other error); answers are parsed into :mod:`schemas` models. Where the contract tells
a field left out from an explicit ``null`` (a guest's or a domain's ``compress``: left out
keeps the value, ``null`` inherits), a keyword left out is sent as left out (:data:`UNSET`)
and ``None`` is sent as ``null``.

Not thread-safe: one keep-alive connection, like :class:`~guest_agent.client.TmemClient`.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Iterator
from typing import Any, Final, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, ValidationError

from guest_agent.client import _json, _raise_for
from guest_agent.errors import BrokerUnavailable, ProtocolError
from guest_agent.redirects import Chain, is_redirect, new_base, resent
from guest_agent.transport import HTTPTransport, Request, Response, StreamedResponse, Transport
from schemas.export import EXPORT_CONTENT_TYPE
from schemas.wire import CompressMode, DomainInfo, GuestCreated, GuestInfo, Imported, ShedIssued

__all__ = ["UNSET", "AdminClient", "AdminGuest", "BrokerSettings", "ExportStream", "Unset"]


class Unset(enum.Enum):
    """The type of :data:`UNSET`."""

    UNSET = "UNSET"


UNSET: Final = Unset.UNSET
"""A keyword left out: the field is not sent (the broker keeps its value), unlike ``None``,
which is sent as ``null``."""


class AdminGuest(GuestInfo):
    """A guest as ``GET /v1/guests`` shows it: :class:`~schemas.wire.GuestInfo` and whatever
    the broker adds for admins (its latest ``pressure`` report), kept as extra fields."""

    model_config = ConfigDict(extra="allow")


class BrokerSettings(BaseModel):
    """``GET /v1/settings``: the capacity and compression default, and every other tunable
    the broker shows (the pressure policy's, docs/pressure.md), kept as extra fields."""

    model_config = ConfigDict(extra="allow")

    capacity_bytes: int
    compress: CompressMode


class ExportStream:
    """``GET /v1/guests/{id}/export`` as it arrives: iterate it for the stream's bytes (pieces
    of at most 1 MiB); close it (it is a context manager) if not read to the end."""

    def __init__(self, answer: StreamedResponse | Response) -> None:
        self._answer = answer

    def __iter__(self) -> Iterator[bytes]:
        if isinstance(self._answer, Response):  # a transport that does not stream
            if self._answer.body:
                yield self._answer.body
            return
        yield from self._answer.iter_bytes()

    def close(self) -> None:
        if isinstance(self._answer, StreamedResponse):
            self._answer.close()

    def __enter__(self) -> ExportStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AdminClient:
    """Synchronous client of the admin endpoints (see the module doc).

    Without a ``token`` only :meth:`ready` is of use (the health endpoints need none).
    ``transport`` replaces the network (e.g. :class:`~guest_agent.transport.MockTransport`;
    exports and imports then go through it whole instead of streamed); ``timeout`` bounds the
    connect and every read, so for a migration it is the longest pause the stream may take.
    """

    def __init__(
        self,
        base_url: str,
        token: str = "",
        *,
        transport: Transport | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url
        self._timeout = timeout
        self._transport: Transport = transport or HTTPTransport(base_url, timeout=timeout)
        self._auth = [("Authorization", f"Bearer {token}")]
        self._h_json = [*self._auth, ("Content-Type", "application/json")]

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the client reconnects if used again)."""
        close = getattr(self._transport, "close", None)
        if close is not None:
            close()

    def _call(self, method: str, path: str, body: Any = None) -> Response:
        if body is None:
            request = Request(method, path, b"", self._auth)
        else:
            request = Request(method, path, json.dumps(body).encode(), self._h_json)
        response = self._transport.handle_request(request)
        if is_redirect(response):
            response = self._follow(request, response)
        if not 200 <= response.status < 300:
            _raise_for(response)
        return response

    def _follow(self, request: Request, response: Response) -> Response:
        """A per-guest change sent to a broker of a cluster that is not the guest's home is
        redirected there (307): follow it for this call only (an admin keeps talking to the
        broker it chose)."""
        chain = Chain(self.base_url)
        while is_redirect(response):
            base = chain.next(new_base(request.target, response))
            hop = HTTPTransport(base, timeout=self._timeout)
            request = resent(request)
            try:
                response = hop.handle_request(request)
            finally:
                hop.close()
        return response

    # --- health
    def ready(self) -> bool:
        """True when ``GET /readyz`` answers 200; False while the broker starts, reloads or
        cannot be reached yet (for start-up loops)."""
        try:
            response = self._transport.handle_request(Request("GET", "/readyz", b"", []))
        except BrokerUnavailable:
            return False
        return response.status == 200

    # --- guests
    def list_guests(self) -> list[AdminGuest]:
        """``GET /v1/guests``: every guest with its pools, stats and pressure."""
        data = _json(self._call("GET", "/v1/guests"))
        if isinstance(data, dict):  # an envelope, should the answer ever grow one
            data = data.get("guests", [])
        return _parse_list(data)

    def guest(self, guest_id: int) -> AdminGuest:
        """``GET /v1/guests/{id}``."""
        return _parse(AdminGuest, _json(self._call("GET", f"/v1/guests/{int(guest_id)}")))

    def find_guest(self, name: str) -> AdminGuest | None:
        """The guest called ``name``, or ``None``."""
        return next((g for g in self.list_guests() if g.name == name), None)

    def create_guest(
        self,
        name: str,
        *,
        weight: int = 100,
        cap_pages: int | None = None,
        dedup_domain: str = "default",
        compress: bool | None = None,
    ) -> GuestCreated:
        """``POST /v1/guests``; the answer carries the guest's token (shown only this once).

        ``compress`` ``True``/``False`` is the guest's own setting; ``None`` (the default)
        leaves it out, so the guest inherits its dedup domain's mode, else the broker's."""
        body: dict[str, Any] = {
            "name": name,
            "weight": weight,
            "cap_pages": cap_pages,
            "dedup_domain": dedup_domain,
        }
        if compress is not None:
            body["compress"] = compress
        return _parse(GuestCreated, _json(self._call("POST", "/v1/guests", body)))

    def patch_guest(
        self,
        guest_id: int,
        *,
        weight: int | Unset = UNSET,
        cap_pages: int | Unset | None = UNSET,
        compress: bool | Unset | None = UNSET,
        dedup_domain: str | Unset = UNSET,
    ) -> AdminGuest:
        """``PATCH /v1/guests/{id}``: only the keywords given are sent. ``cap_pages=None``
        lifts the cap; ``compress=None`` makes the guest inherit its domain's (else the
        broker's) mode. A lowered cap sends the guest a ``quota`` notice."""
        body = _given(weight=weight, cap_pages=cap_pages, compress=compress,
                      dedup_domain=dedup_domain)  # fmt: skip
        return _parse(AdminGuest, _json(self._call("PATCH", f"/v1/guests/{int(guest_id)}", body)))

    def delete_guest(self, guest_id: int) -> None:
        """``DELETE /v1/guests/{id}``: the guest and every page it has."""
        self._call("DELETE", f"/v1/guests/{int(guest_id)}")

    def freeze(self, guest_id: int) -> None:
        """Freeze a guest: its puts are declined (``frozen``) until :meth:`thaw`."""
        self._call("POST", f"/v1/guests/{int(guest_id)}/freeze")

    def thaw(self, guest_id: int) -> None:
        """Thaw a frozen guest."""
        self._call("POST", f"/v1/guests/{int(guest_id)}/thaw")

    def flush_guest(self, guest_id: int) -> None:
        """Flush every page of a guest (its pools stay)."""
        self._call("POST", f"/v1/guests/{int(guest_id)}/flush")

    def shed(self, guest_id: int, pages: int, deadline_s: float | None = None) -> ShedIssued:
        """``POST /v1/guests/{id}/shed``: ask the guest to return ``pages`` persistent pages
        (its coldest first) within ``deadline_s`` seconds (None: the broker's default)."""
        body: dict[str, Any] = {"pages": pages}
        if deadline_s is not None:
            body["deadline_s"] = deadline_s
        return _parse(
            ShedIssued, _json(self._call("POST", f"/v1/guests/{int(guest_id)}/shed", body))
        )

    def shared_auth(self, uuid: str, guest_id: int, *, allow: bool = True) -> None:
        """Allow (or with ``allow=False`` withdraw) a guest's use of shared pool ``uuid``."""
        body = {"uuid": str(uuid), "guest_id": guest_id, "allow": allow}
        self._call("POST", "/v1/shared-auth", body)

    def stats(self) -> dict[str, Any]:
        """``GET /v1/stats``: the global figures and one entry per guest."""
        data = _json(self._call("GET", "/v1/stats"))
        if not isinstance(data, dict):
            raise ProtocolError("GET /v1/stats did not answer an object")
        return data

    # --- settings and dedup domains
    def settings(self) -> BrokerSettings:
        """``GET /v1/settings``: the settings an admin can change at run time."""
        return _parse(BrokerSettings, _json(self._call("GET", "/v1/settings")))

    def patch_settings(self, **changes: Any) -> BrokerSettings:
        """``PATCH /v1/settings`` with the keywords given (``capacity``, ``compress``, the
        pressure tunables); a contradiction is refused whole (400), an unknown name is 422.
        Answers the settings now in force."""
        return _parse(BrokerSettings, _json(self._call("PATCH", "/v1/settings", changes)))

    def domains(self) -> list[DomainInfo]:
        """``GET /v1/domains``: every dedup domain with its trust, compression mode, guests
        and the storage they take."""
        data = _json(self._call("GET", "/v1/domains"))
        if not isinstance(data, list):
            raise ProtocolError("GET /v1/domains did not answer a list")
        return [_parse(DomainInfo, item) for item in data]

    def put_domain(
        self,
        name: str,
        *,
        trusted: bool | None = None,
        compress: CompressMode | Unset | None = UNSET,
    ) -> DomainInfo:
        """``PUT /v1/domains/{name}``: ``trusted`` ``None`` and ``compress`` left out keep
        their value; ``compress=None`` makes the domain take the broker's default. The
        answer's ``overridden_by`` names the guests whose own explicit setting differs."""
        body = _given(compress=compress)
        if trusted is not None:
            body["trusted"] = trusted
        path = f"/v1/domains/{quote(name, safe='')}"
        return _parse(DomainInfo, _json(self._call("PUT", path, body)))

    # --- migration
    def export_guest(self, guest_id: int) -> ExportStream:
        """``GET /v1/guests/{id}/export``, streamed (see :class:`ExportStream`)."""
        request = Request("GET", f"/v1/guests/{int(guest_id)}/export", b"", self._auth)
        stream = getattr(self._transport, "stream", None)
        if stream is None:
            response = self._transport.handle_request(request)
            if response.status != 200:
                _raise_for(response)
            return ExportStream(response)
        answer: StreamedResponse = stream(request)
        if answer.status != 200:
            with answer:
                _raise_for(Response(answer.status, answer.read(), answer.headers))
        return ExportStream(answer)

    def moved(self, guest_id: int, url: str) -> None:
        """``POST /v1/guests/{id}/moved``: the guest lives at broker ``url`` now; deleted here,
        its token's calls are redirected there."""
        self._call("POST", f"/v1/guests/{int(guest_id)}/moved", {"url": url})

    def import_guest(self, stream: Iterable[bytes], *, keep_token: bool = False) -> Imported:
        """``POST /v1/guests/import`` of an export stream, sent as it is produced (chunked);
        ``keep_token``: the guest keeps its token (the answer's token is then empty).

        An exception raised while producing ``stream`` propagates after the connection was
        dropped mid-body: the broker refuses a truncated stream whole."""
        headers = [*self._auth, ("Content-Type", EXPORT_CONTENT_TYPE)]
        target = "/v1/guests/import?keep_token=true" if keep_token else "/v1/guests/import"
        send_chunked = getattr(self._transport, "send_chunked", None)
        if send_chunked is None:
            body = b"".join(stream)
            response = self._transport.handle_request(Request("POST", target, body, headers))
        else:
            response = send_chunked(Request("POST", target, b"", headers), stream)
        if response.status != 201:
            _raise_for(response)
        return _parse(Imported, _json(response))


def _given(**fields: object) -> dict[str, Any]:
    """The fields not :data:`UNSET`, ``None`` kept (it is sent as ``null``)."""
    return {k: v for k, v in fields.items() if v is not UNSET}


def _parse_list(data: Any) -> list[AdminGuest]:
    if not isinstance(data, list):
        raise ProtocolError("GET /v1/guests did not answer a list")
    return [_parse(AdminGuest, item) for item in data]


_M = TypeVar(
    "_M", GuestInfo, AdminGuest, GuestCreated, Imported, DomainInfo, BrokerSettings, ShedIssued
)


def _parse(model: type[_M], data: Any) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(f"bad {model.__name__} answer: {exc}") from exc
