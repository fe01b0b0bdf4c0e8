"""JSON wire models of api-v1.md. Request models forbid unknown fields (a typo is a 422,
never silently ignored); response models are what the broker sends and the agent parses."""

from __future__ import annotations

import uuid as uuidlib
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

PoolKind = Literal["persistent", "ephemeral"]
CompressMode = Literal["never", "always", "pressure"]
NoticeType = Literal["quota", "shed", "freeze", "thaw", "evicted"]

_Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@-]+$")]
_Domain = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
_Weight = Annotated[int, Field(ge=1, le=10_000)]
_Cap = Annotated[int, Field(ge=0, le=1 << 40)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    code: str
    message: str
    reason: str | None = None


class ErrorBody(BaseModel):
    """Every error answer: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorDetail


class PoolCreate(_Request):
    kind: PoolKind
    shared: bool = False
    uuid: uuidlib.UUID | None = None
    page_size: Annotated[int, Field(ge=1, le=1 << 20)] = 4096
    exclusive_gets: bool = False

    @model_validator(mode="after")
    def _shared_rules(self) -> PoolCreate:
        if self.shared and self.uuid is None:
            raise ValueError("a shared pool needs a uuid")
        if not self.shared and self.uuid is not None:
            raise ValueError("only shared pools take a uuid")
        if self.shared and self.kind != "ephemeral":
            raise ValueError("shared pools are ephemeral")
        return self


class PoolInfo(BaseModel):
    pool_id: int
    kind: PoolKind
    shared: bool
    uuid: uuidlib.UUID | None = None
    page_size: int = 4096
    exclusive_gets: bool = False
    pages: int = 0


class GuestCreate(_Request):
    name: _Name
    weight: _Weight = 100
    cap_pages: _Cap | None = None
    dedup_domain: _Domain = "default"
    # null or left out: the dedup domain's compression mode, else the broker's
    compress: bool | None = None


class GuestPatch(_Request):
    weight: _Weight | None = None
    cap_pages: _Cap | None = None
    # an explicit null: inherit the domain's (else the broker's) mode from now on
    compress: bool | None = None
    dedup_domain: _Domain | None = None


class GuestInfo(BaseModel):
    guest_id: int
    name: str
    weight: int
    cap_pages: int | None
    quota_pages: int | None = None
    dedup_domain: str
    compress: bool | None
    # what applies: the guest's own setting, else its domain's, else the broker's default
    compress_mode: CompressMode | None = None
    frozen: bool
    pools: list[PoolInfo] = []
    stats: dict[str, Any] = {}


class GuestCreated(GuestInfo):
    token: str


class SelfInfo(GuestInfo):
    """``GET /v1/self``: the guest, its quota, its pools and its own stats."""


class SharedAuth(_Request):
    uuid: uuidlib.UUID
    guest_id: Annotated[int, Field(ge=1)]
    allow: bool = True


class Notice(BaseModel):
    seq: int
    type: NoticeType
    issued_at: datetime
    cap_pages: int | None = None
    pages: int | None = None
    deadline: datetime | None = None
    pool_id: int | None = None


class Ack(_Request):
    pages_returned: Annotated[int, Field(ge=0, le=1 << 40)] = 0


class ShedRequest(_Request):
    """``POST /v1/guests/{id}/shed``: return ``pages`` persistent pages within
    ``deadline_s`` seconds (left out: the broker's ``shed_deadline_s``)."""

    pages: Annotated[int, Field(ge=1, le=1 << 40)]
    deadline_s: Annotated[float, Field(gt=0, le=86400)] | None = None


class ShedIssued(BaseModel):
    """The answer to an admin shed: the pages asked (at most what the guest holds; 0: it
    holds none and nothing was sent), the shed notice's ``seq`` and ``deadline``, and the
    guest's quota now."""

    guest_id: int
    pages: int
    seq: int | None = None
    deadline: datetime | None = None
    cap_pages: int | None = None


class ShedCandidate(BaseModel):
    """A persistent page a shed asks back first: ``oid`` in decimal, as in a path (it is up
    to 192 bits, more than many JSON readers keep exact)."""

    pool_id: int
    oid: str
    index: int


class Pressure(_Request):
    psi_some_avg10: Annotated[float, Field(ge=0, le=100)] | None = None
    psi_full_avg10: Annotated[float, Field(ge=0, le=100)] | None = None
    mem_available_bytes: Annotated[int, Field(ge=0)] | None = None
    swap_used_bytes: Annotated[int, Field(ge=0)] | None = None


class Imported(BaseModel):
    guest_id: int
    token: str


class DomainPut(_Request):
    """``PUT /v1/domains/{name}``: fields left out keep their value; an explicit null
    ``compress`` takes the broker's default."""

    trusted: StrictBool | None = None
    compress: CompressMode | None = None


class DomainInfo(BaseModel):
    name: str
    trusted: bool
    compress: CompressMode | None
    # the mode the domain's guests without a setting of their own get
    compress_mode: CompressMode
    guests: int
    charged_bytes: int
    used_bytes: int
    # guests of the domain whose own explicit compress setting differs from the domain's
    overridden_by: list[int] = []
