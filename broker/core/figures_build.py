"""Building the typed figures (:mod:`broker.core.figures`) from the core's objects.

The builders read the core's objects through the small protocols below, so the core's
classes need not know the figure models, and figures.py stays the declarations alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from broker.core.figures import (
    BrokerFigures,
    Declines,
    GuestFigures,
    HostFigures,
    OpFigures,
    PolicyDeclines,
    PoolFigures,
    SharedPoolFigures,
)
from schemas.batch import PAGE_SIZE


class OpCounts(Protocol):
    """Operation counters as the core keeps them (a pool, a guest, their sums)."""

    puts: int
    declined_quota: int
    declined_capacity: int
    declined_frozen: int
    declined_policy: int
    gets: int
    get_hits: int
    flushes: int
    flushes_found: int
    object_flushes: int
    evictions: int
    compress_poor: int
    dedup_hits: int


class _Weighted(Protocol):
    @property
    def weight(self) -> int: ...


class PoolState(OpCounts, Protocol):
    """What the figures read of a core pool."""

    persistent: bool
    shared: bool
    uuid: str | None
    pages: int
    zero_pages: int
    charged_bytes: int
    members: dict[int, int]

    @property
    def kind(self) -> str: ...

    @property
    def account(self) -> _Weighted | None: ...


class GuestState(OpCounts, Protocol):
    """What the figures read of a core guest."""

    guest_id: int
    name: str
    cap_pages: int | None
    frozen: bool
    compress: bool | None
    persistent_pages: int
    policy_low_hit_rate: int
    policy_predicted_useless: int
    policy_poor_compression: int

    @property
    def weight(self) -> int: ...

    @property
    def dedup_domain(self) -> str: ...

    @property
    def pools(self) -> Mapping[int, PoolState]: ...

    def effective_quota(self) -> int | None: ...


def op_figures(ops: OpCounts, *, admin: bool) -> OpFigures:
    """The counters of ``ops``; ``admin`` adds dedup hits, which a guest must not see."""
    declined = ops.declined_quota + ops.declined_capacity + ops.declined_frozen
    declined += ops.declined_policy
    return OpFigures(
        puts=ops.puts,
        puts_stored=ops.puts - declined,
        puts_declined=Declines(
            quota=ops.declined_quota,
            capacity=ops.declined_capacity,
            frozen=ops.declined_frozen,
            policy=ops.declined_policy,
        ),
        gets=ops.gets,
        get_hits=ops.get_hits,
        flushes=ops.flushes,
        flushes_found=ops.flushes_found,
        object_flushes=ops.object_flushes,
        evictions=ops.evictions,
        compress_poor=ops.compress_poor,
        dedup_hits=ops.dedup_hits if admin else None,
    )


def _ratio(nonzero_pages: int, charged_bytes: int) -> float:
    return (nonzero_pages * PAGE_SIZE / charged_bytes) if charged_bytes else 1.0


def pool_figures(pool_id: int, pool: PoolState, *, admin: bool) -> PoolFigures:
    """One pool's figures (``pool_id`` as its guest names it)."""
    return PoolFigures(
        pool_id=pool_id,
        kind=pool.kind,
        shared=pool.shared,
        uuid=pool.uuid,
        logical_pages=pool.pages,
        zero_pages=pool.zero_pages,
        charged_bytes=pool.charged_bytes,
        compression_ratio=_ratio(pool.pages - pool.zero_pages, pool.charged_bytes),
        ops=op_figures(pool, admin=admin),
    )


def guest_figures(g: GuestState, compress_mode: str, *, admin: bool) -> GuestFigures:
    """One guest's figures: sums over its private pools (shared pools count on their own)
    and its counters; ``admin=False`` is what the guest itself may see."""
    pages = zero = charged = eph = 0
    for pool in g.pools.values():
        if pool.shared:
            continue
        pages += pool.pages
        zero += pool.zero_pages
        charged += pool.charged_bytes
        if not pool.persistent:
            eph += pool.pages
    return GuestFigures(
        guest_id=g.guest_id,
        name=g.name,
        weight=g.weight,
        cap_pages=g.cap_pages,
        quota_pages=g.effective_quota(),
        frozen=g.frozen,
        compress=g.compress,
        compress_mode=compress_mode,
        dedup_domain=g.dedup_domain,
        pools=len(g.pools),
        logical_pages=pages,
        zero_pages=zero,
        persistent_pages=g.persistent_pages,
        ephemeral_pages=eph,
        charged_bytes=charged,
        compression_ratio=_ratio(pages - zero, charged),
        ops=op_figures(g, admin=admin),
        policy_declines=PolicyDeclines(
            low_hit_rate=g.policy_low_hit_rate,
            predicted_useless=g.policy_predicted_useless,
            poor_compression=g.policy_poor_compression,
        ),
    )


def shared_pool_figures(pool: PoolState) -> SharedPoolFigures:
    """A shared pool's entry in the admin's figures."""
    assert pool.uuid is not None  # a shared pool is named by its UUID
    return SharedPoolFigures(
        uuid=pool.uuid,
        members=sorted(pool.members),
        weight=pool.account.weight if pool.account else 0,
        evictions=pool.evictions,
        logical_pages=pool.pages,
        zero_pages=pool.zero_pages,
        charged_bytes=pool.charged_bytes,
        compression_ratio=_ratio(pool.pages - pool.zero_pages, pool.charged_bytes),
    )


def broker_figures(
    *,
    ops: OpCounts,
    guests: Iterable[tuple[GuestState, str]],
    shared: Iterable[PoolState],
    capacity_bytes: int,
    used_bytes: int,
    charged_bytes: int,
    counted_bytes: int,
    unique_pages: int,
    low_hit_rate: int,
    predicted_useless: int,
    poor_compression: int,
    reclaimed_on_put: int,
    compress_default: str,
    compressed_cold: int,
    recompressed_pages: int = 0,
    recompressed_saved_bytes: int = 0,
) -> BrokerFigures:
    """The broker's figures: ``ops`` are the counters summed over every guest (removed ones
    included); pages are summed over the guests' private pools and the ``shared`` pools.
    ``guests``: each guest with its compression mode."""
    guests = list(guests)
    logical = zero = persistent = ephemeral = 0
    for g, _mode in guests:
        for pool in g.pools.values():
            if pool.shared:
                continue
            logical += pool.pages
            zero += pool.zero_pages
            if pool.persistent:
                persistent += pool.pages
            else:
                ephemeral += pool.pages
    shared_pools = []
    for pool in shared:
        logical += pool.pages
        zero += pool.zero_pages
        ephemeral += pool.pages
        shared_pools.append(shared_pool_figures(pool))
    return BrokerFigures(
        capacity_bytes=capacity_bytes,
        used_bytes=used_bytes,
        charged_bytes=charged_bytes,
        counted_bytes=counted_bytes,
        logical_pages=logical,
        unique_pages=unique_pages,
        zero_pages=zero,
        persistent_pages=persistent,
        ephemeral_pages=ephemeral,
        dedup_ratio=((logical - zero) / unique_pages) if unique_pages else 1.0,
        compression_ratio=(unique_pages * PAGE_SIZE / used_bytes) if used_bytes else 1.0,
        ops=op_figures(ops, admin=True),
        policy_declines=PolicyDeclines(
            low_hit_rate=low_hit_rate,
            predicted_useless=predicted_useless,
            poor_compression=poor_compression,
        ),
        reclaimed_on_put=reclaimed_on_put,
        compress_default=compress_default,
        compressed_cold=compressed_cold,
        recompressed_pages=recompressed_pages,
        recompressed_saved_bytes=recompressed_saved_bytes,
        guests=[guest_figures(g, mode, admin=True) for g, mode in guests],
        shared_pools=shared_pools,
    )


def host_figures(governor: Mapping[str, Any], read_errors: int) -> HostFigures:
    """The figures of :meth:`broker.core.host.HostGovernor.figures` (and the loop's failed
    readings), typed."""
    host = governor.get("host") or {}
    return HostFigures(
        state=governor["state"],
        base_capacity_bytes=governor["base_capacity_bytes"],
        effective_capacity_bytes=governor["effective_capacity_bytes"],
        shrunk_by_bytes=governor["shrunk_by_bytes"],
        floor_bytes=governor["floor_bytes"],
        last_reason=governor["last_reason"],
        shrinks=governor["shrinks"],
        grows=governor["grows"],
        readings=governor["readings"],
        read_errors=read_errors,
        mem_total_bytes=host.get("mem_total_bytes"),
        mem_available_bytes=host.get("mem_available_bytes"),
        limit_bytes=host.get("limit_bytes"),
        available_bytes=host.get("available_bytes"),
        used_percent=host.get("used_percent"),
        swap_free_bytes=host.get("swap_free_bytes"),
        psi_some_avg10=host.get("psi_some_avg10"),
        psi_full_avg10=host.get("psi_full_avg10"),
        cgroup_limit_bytes=host.get("cgroup_limit_bytes"),
        limited_by=host.get("limited_by"),
    )
