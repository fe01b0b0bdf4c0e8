"""Who is there: guests (Xen: clients), their pools, shared pools and who may join them.

Shape (Xen's nouns)::

    Registry
    ├── guests: guest_id -> Guest           (Xen: client)
    │     └── pools: pool_id -> Pool        a guest's own pool ids, 0..max_pools-1
    ├── shared: uuid -> Pool                shared ephemeral pools, joined by authorised guests
    ├── auth: uuid -> {guest_id}            who may create or join each shared pool
    └── domains: name -> domain id          dedup domains (content keys carry the id)

    Pool.objects: oid -> {index: content key}   (Xen: pool -> object -> page descriptor)

Per page the core keeps only ints in dicts: the index, and a content key shared by every
handle with the same content (see :mod:`broker.core.content`). So a page costs no Python
container of its own and the cyclic garbage collector has nothing per page to scan.

Shared pools are ephemeral, named by a UUID, joined only by guests authorised for it; gets are
never exclusive. A guest that destroys its shared pool id (or is removed) leaves it; the pool
and its pages go with its last member. Pages are deduplicated in the dedup domain of the guest
that created the pool. Each shared pool is an eviction account of its own whose weight is the
largest weight of its members (:meth:`Registry.reweigh`).

Quota
    ``cap_pages`` caps a guest's persistent logical pages (zero pages included). A put that
    replaces a page at the cap is allowed (its old copy is removed first); a guest above its
    cap (after a lowered cap) gets new puts declined with ``quota`` until it is back under.
    The pressure policy adds a *dynamic* quota (``Tmem.set_quota``); the effective quota
    is ``min(cap_pages, quota)``. While a shed is open the put path enforces
    ``max(effective, hold)`` instead (``hold``: the pages held when the quota was lowered, so
    the guest cannot grow but is not declined before its deadline). The put path compares
    one precomputed limit (:meth:`Guest.relimit`): O(1).

The registry keeps the records; removing pages is the page table's
(:mod:`broker.core.pages`) and choosing what to evict the eviction module's.
"""

from __future__ import annotations

import uuid as uuid_module

from broker.core.accounting import Ops
from broker.core.admission import AdmissionGate
from broker.core.content import DOMAIN_SHIFT, MAX_DOMAINS
from broker.core.errors import (
    BadRequest,
    Conflict,
    NotAuthorised,
    TooManyPools,
    UnknownGuest,
    UnknownPool,
)
from broker.core.eviction import Account, Eviction
from broker.core.keys import lru_tag
from broker.core.model import EPHEMERAL, KINDS, PERSISTENT, DomainView, Unset

# compression modes: a guest's or a domain's setting, and the broker's default
NEVER = "never"
ALWAYS = "always"
PRESSURE = "pressure"
COMPRESS_MODES = (NEVER, ALWAYS, PRESSURE)
# Guest.pack: what the put path checks (an int compare)
PACK_NEVER, PACK_ALWAYS, PACK_PRESSURE = 0, 1, 2
_PACK = {NEVER: PACK_NEVER, ALWAYS: PACK_ALWAYS, PRESSURE: PACK_PRESSURE}


def check_compress_mode(mode: str | None) -> None:
    if mode is not None and mode not in COMPRESS_MODES:
        raise BadRequest(
            f"compress must be one of {', '.join(COMPRESS_MODES)} or null, not {mode!r}"
        )


class Domain:
    """A dedup domain: identical contents of its guests are stored once.

    ``trusted``: its guests trust each other, so a put sharing a content already stored in
    the domain takes no more storage in the capacity decision (and a guest can learn that
    another guest of the domain holds a content: docs/security.md). ``compress``: the
    domain's compression mode, None to take the broker's default. ``charged_bytes`` and
    ``used_bytes`` are the domain's share of the broker's figures of those names."""

    __slots__ = ("bits", "charged_bytes", "compress", "domain_id", "name", "trusted", "used_bytes")

    def __init__(self, name: str, domain_id: int) -> None:
        self.name = name
        self.domain_id = domain_id
        self.bits = domain_id << DOMAIN_SHIFT
        self.trusted = False
        self.compress: str | None = None
        self.charged_bytes = 0
        self.used_bytes = 0


class Pool(Ops):
    """A pool: objects of pages, page gauges and (ephemeral) its eviction account."""

    __slots__ = (
        "account",
        "charged_bytes",
        "charges",
        "domain",
        "domain_bits",
        "exclusive_gets",
        "lru_tag",
        "members",
        "objects",
        "owner",
        "pages",
        "persistent",
        "ref",
        "shared",
        "uuid",
        "zero_pages",
    )

    def __init__(
        self,
        *,
        persistent: bool,
        shared: bool,
        uuid: str | None,
        exclusive_gets: bool,
        owner: Guest | None,
        account: Account | None,
        ref: int,
        domain: Domain,
    ) -> None:
        super().__init__()
        self.persistent = persistent
        self.shared = shared
        self.uuid = uuid
        self.exclusive_gets = exclusive_gets
        self.owner = owner  # None for a shared pool
        self.account = account  # None for a persistent pool
        self.ref = ref  # LRU keys (and persistent pages' recency keys) name the pool by this
        self.lru_tag = lru_tag(ref)
        self.domain = domain
        self.domain_bits = domain.bits  # read on every put
        self.objects: dict[int, dict[int, int]] = {}
        # members of a shared pool: guest_id -> that guest's pool id
        self.members: dict[int, int] = {}
        self.pages = 0
        self.zero_pages = 0
        self.charged_bytes = 0
        # charge of each page whose charge is neither 4096 (non-zero) nor 0 (zero page):
        # compressed pages only, keyed by keys.slot_key
        self.charges: dict[int, int] = {}

    @property
    def kind(self) -> str:
        return PERSISTENT if self.persistent else EPHEMERAL


class Guest(Ops):
    """A guest (Xen: client): settings, pools, its eviction account, its persistent pages.

    ``limit`` is what the put path compares a persistent put with (:meth:`relimit`)."""

    __slots__ = (
        "account",
        "cap_pages",
        "compress",
        "domain",
        "evicted_unreported",
        "frozen",
        "gate",
        "guest_id",
        "hold",
        "limit",
        "name",
        "pack",
        "persistent_pages",
        "policy_low_hit_rate",
        "policy_poor_compression",
        "policy_predicted_useless",
        "pools",
        "quota_pages",
        "recency",
    )

    def __init__(
        self,
        guest_id: int,
        name: str,
        *,
        cap_pages: int | None,
        domain: Domain,
        compress: bool | None,
        frozen: bool,
        account: Account,
    ) -> None:
        super().__init__()
        self.guest_id = guest_id
        self.name = name
        self.cap_pages = cap_pages
        self.domain = domain
        # the guest's own setting (None: the domain's, else the broker's) and the mode
        # that results (Registry.repack)
        self.compress = compress
        self.pack = PACK_NEVER
        self.frozen = frozen
        self.account = account
        self.pools: dict[int, Pool] = {}
        self.persistent_pages = 0
        # the guest's persistent pages by last access (put or get), oldest first, named by
        # keys.lru_key: the shed candidates (broker.core.shed). A plain dict re-inserted on
        # each access: 72 B/page less than an OrderedDict (tests/core/test_shed.py measures)
        self.recency: dict[int, None] = {}
        self.evicted_unreported = 0
        # dynamic quota (pressure policy), the shed grace floor, and what the put path checks
        self.quota_pages: int | None = None
        self.hold: int | None = None
        self.limit: int | None = cap_pages
        self.gate = AdmissionGate()
        self.policy_low_hit_rate = 0
        self.policy_predicted_useless = 0
        self.policy_poor_compression = 0

    def effective_quota(self) -> int | None:
        """``min(cap_pages, quota_pages)`` (None: unbounded)."""
        cap, quota = self.cap_pages, self.quota_pages
        if cap is None:
            return quota
        return cap if quota is None else min(cap, quota)

    def relimit(self) -> None:
        """Recompute ``limit``: the effective quota, or while a shed is open
        ``max(effective, hold)`` (the guest may keep, not grow past, what it held)."""
        limit = self.effective_quota()
        if limit is not None and self.hold is not None:
            hold = self.hold if self.cap_pages is None else min(self.cap_pages, self.hold)
            limit = max(limit, hold)
        self.limit = limit

    @property
    def weight(self) -> int:
        return self.account.weight

    @property
    def dedup_domain(self) -> str:
        return self.domain.name


def check_weight(weight: int) -> None:
    if type(weight) is not int or weight < 1:
        raise BadRequest(f"weight must be an integer >= 1, not {weight!r}")


def check_cap(cap_pages: int | None) -> None:
    if cap_pages is not None and (type(cap_pages) is not int or cap_pages < 0):
        raise BadRequest(f"cap_pages must be null or an integer >= 0, not {cap_pages!r}")


def normalise_uuid(value: str) -> str:
    try:
        return str(uuid_module.UUID(value))
    except (ValueError, TypeError, AttributeError) as exc:
        raise BadRequest(f"not a UUID: {value!r}") from exc


class Registry:
    """Guests, pools, shared pools, authorisations and dedup domains (records only)."""

    __slots__ = ("auth", "compress_default", "domains", "guests", "max_pools", "shared")

    def __init__(self, max_pools: int, compress_default: str = NEVER) -> None:
        check_compress_mode(compress_default)
        self.max_pools = max_pools
        self.compress_default = compress_default
        self.guests: dict[int, Guest] = {}
        self.shared: dict[str, Pool] = {}
        self.auth: dict[str, set[int]] = {}
        self.domains: dict[str, Domain] = {}

    def guest(self, guest_id: int) -> Guest:
        """The guest, or :class:`UnknownGuest`."""
        g = self.guests.get(guest_id)
        if g is None:
            raise UnknownGuest(f"no guest {guest_id}")
        return g

    def pool(self, guest_id: int, pool_id: int) -> tuple[Guest, Pool]:
        """The guest and its pool, or :class:`UnknownGuest` / :class:`UnknownPool`."""
        g = self.guests.get(guest_id)
        if g is None:
            raise UnknownGuest(f"no guest {guest_id}")
        pool = g.pools.get(pool_id)
        if pool is None:
            raise UnknownPool(f"guest {guest_id} has no pool {pool_id}")
        return g, pool

    def domain(self, name: str) -> Domain:
        """The dedup domain ``name`` (made known on first use)."""
        if not isinstance(name, str) or not name:
            raise BadRequest("dedup_domain must be a non-empty string")
        domain = self.domains.get(name)
        if domain is None:
            if len(self.domains) >= MAX_DOMAINS:
                raise Conflict("too many dedup domains")
            domain = self.domains[name] = Domain(name, len(self.domains))
        return domain

    def compress_mode(self, g: Guest) -> str:
        """The guest's compression mode: its own setting, else its domain's, else the
        broker's default."""
        if g.compress is not None:
            return ALWAYS if g.compress else NEVER
        return g.domain.compress or self.compress_default

    def set_compress(self, domain: Domain, compress: str | Unset | None) -> list[int]:
        """Set the domain's compression mode (None: the broker's default; UNSET: leave it).
        Returns the domain's guests whose own explicit setting overrides the domain's mode."""
        if not isinstance(compress, Unset):
            domain.compress = compress
        overriding = []
        for g in self.guests.values():
            if g.domain is domain:
                self.repack(g)
                explicit = g.compress is not None and domain.compress is not None
                if explicit and self.compress_mode(g) != domain.compress:
                    overriding.append(g.guest_id)
        return overriding

    def set_compress_default(self, mode: str) -> None:
        """The broker's default compression mode (never, always or pressure)."""
        if mode not in COMPRESS_MODES:
            raise BadRequest(f"the broker's compress default must be one of {COMPRESS_MODES}")
        self.compress_default = mode
        for g in self.guests.values():
            self.repack(g)

    def domain_views(self) -> list[DomainView]:
        """Every dedup domain known, with how many guests it has."""
        members: dict[str, int] = {}
        for g in self.guests.values():
            members[g.domain.name] = members.get(g.domain.name, 0) + 1
        return [
            DomainView(
                d.name, d.trusted, d.compress, members.get(d.name, 0), d.charged_bytes, d.used_bytes
            )
            for d in self.domains.values()
        ]

    def repack(self, g: Guest) -> None:
        """Recompute what the put path checks after a compression setting changed."""
        g.pack = _PACK[self.compress_mode(g)]

    def pick_pool_id(self, g: Guest, pool_id: int | None) -> int:
        """``pool_id`` if it is valid and free, or the lowest free one when None."""
        if pool_id is None:
            for candidate in range(self.max_pools):
                if candidate not in g.pools:
                    return candidate
            raise TooManyPools(f"guest {g.guest_id} uses all {self.max_pools} pool ids")
        if type(pool_id) is not int or not 0 <= pool_id < self.max_pools:
            raise BadRequest(f"pool_id must be in 0..{self.max_pools - 1}")
        if pool_id in g.pools:
            raise Conflict(f"guest {g.guest_id} has a pool {pool_id} already")
        return pool_id

    def authorise(self, uuid: str, guest_id: int, allow: bool) -> None:
        """Allow (or stop allowing) the guest to create or join the shared pool ``uuid``."""
        key = normalise_uuid(uuid)
        self.guest(guest_id)
        if allow:
            self.auth.setdefault(key, set()).add(guest_id)
        else:
            allowed = self.auth.get(key)
            if allowed is not None:
                allowed.discard(guest_id)
                if not allowed:
                    del self.auth[key]

    def is_authorised(self, key: str, guest_id: int) -> bool:
        """Whether the guest may create or join the shared pool ``key`` (a normalised UUID)."""
        return guest_id in self.auth.get(key, ())

    def forget_authorisations(self, guest_id: int) -> None:
        for allowed in self.auth.values():
            allowed.discard(guest_id)

    def create_pool(
        self,
        g: Guest,
        kind: str,
        ev: Eviction,
        *,
        shared: bool,
        uuid: str | None,
        exclusive_gets: bool,
        pool_id: int | None,
    ) -> int:
        """Create a pool of ``g`` (or join the shared pool ``uuid``); the guest's id for it
        (see :meth:`broker.core.Tmem.create_pool`). ``ev`` gives ephemeral pools their LRU
        reference and a new shared pool its eviction account."""
        if kind not in KINDS:
            raise BadRequest(f"kind must be 'persistent' or 'ephemeral', not {kind!r}")
        if not shared:
            if uuid is not None:
                raise BadRequest("uuid is for shared pools only")
            pid = self.pick_pool_id(g, pool_id)
            persistent = kind == PERSISTENT
            pool = Pool(
                persistent=persistent,
                shared=False,
                uuid=None,
                exclusive_gets=bool(exclusive_gets),
                owner=g,
                account=None if persistent else g.account,
                # persistent pools take a ref too: the guest's last-access order (shed
                # candidates) names their pages by the same key layout as the LRUs
                ref=ev.take_ref(),
                domain=g.domain,
            )
            if not persistent:
                ev.add_pool(pool)
            g.pools[pid] = pool
            return pid
        if kind != EPHEMERAL:
            raise BadRequest("shared pools are ephemeral")
        if exclusive_gets:
            raise BadRequest("gets from shared pools are never exclusive")
        if uuid is None:
            raise BadRequest("a shared pool needs a uuid")
        key = normalise_uuid(uuid)
        if not self.is_authorised(key, g.guest_id):
            raise NotAuthorised(f"guest {g.guest_id} is not authorised for shared pool {key}")
        pool_or_none = self.shared.get(key)
        if pool_or_none is not None and g.guest_id in pool_or_none.members:
            have = pool_or_none.members[g.guest_id]
            if pool_id is not None and pool_id != have:
                raise Conflict(f"guest {g.guest_id} has joined {key} as pool {have}")
            return have
        pid = self.pick_pool_id(g, pool_id)
        if pool_or_none is None:
            pool = Pool(
                persistent=False,
                shared=True,
                uuid=key,
                exclusive_gets=False,
                owner=None,
                account=ev.new_account(g.weight),
                ref=ev.take_ref(),
                domain=g.domain,
            )
            ev.add_pool(pool)
            self.shared[key] = pool
        else:
            pool = pool_or_none
        pool.members[g.guest_id] = pid
        g.pools[pid] = pool
        self.reweigh(pool)
        return pid

    def reweigh(self, pool: Pool) -> None:
        """A shared pool's account weighs as its best-weighted member."""
        assert pool.account is not None
        if pool.members:
            pool.account.weight = max(self.guests[m].weight for m in pool.members)
