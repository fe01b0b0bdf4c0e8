"""The figures :class:`broker.core.tmem.Tmem` reports: a mixin of its stats methods, which
build :mod:`broker.core.figures` from the core's objects (through
:mod:`broker.core.figures_build`), so the facade's module keeps to its hot paths."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.core import figures_build
from broker.core.accounting import Ops
from broker.core.figures import BrokerFigures, GuestFigures, PoolFigures

if TYPE_CHECKING:
    from broker.core.admission import Admission
    from broker.core.compression import ColdCompressor, IdleRecompressor
    from broker.core.content import Contents
    from broker.core.eviction import Eviction
    from broker.core.pages import PageTable
    from broker.core.registry import Registry


class Stats:
    """Part of :class:`broker.core.tmem.Tmem` (a mixin: its methods are the facade's)."""

    _reg: Registry
    _table: PageTable
    _contents: Contents
    _ev: Eviction
    _adm: Admission
    _cold: ColdCompressor
    _idle: IdleRecompressor | None
    _retired: Ops

    def pool_stats(self, guest_id: int, pool_id: int, *, admin: bool = False) -> PoolFigures:
        """Figures of one pool (its operation counters count every member's operations).
        ``admin`` adds dedup hits, which a guest must not see."""
        _, pool = self._reg.pool(guest_id, pool_id)
        return figures_build.pool_figures(pool_id, pool, admin=admin)

    def guest_stats(self, guest_id: int) -> GuestFigures:
        """The guest's own figures, safe to show it: its private pools' pages, its charges
        (``charged_bytes``: what its pages take on their own, whether or not shared) and
        its operations. Nothing here depends on other guests' contents."""
        g = self._reg.guest(guest_id)
        return figures_build.guest_figures(g, self._reg.compress_mode(g), admin=False)

    @property
    def used_bytes(self) -> int:
        """Bytes of page storage actually held (compressed length, shared contents once)."""
        return self._contents.used_bytes

    @property
    def unique_pages(self) -> int:
        """Distinct non-zero contents stored (the cluster engine adds those it references
        in Redis)."""
        return self._contents.unique_pages

    def stats(self) -> BrokerFigures:
        """Global figures (the admin's ``GET /v1/stats``), with one admin entry per guest
        (``guests``) and per shared pool (``shared_pools``)."""
        reg = self._reg
        ops = Ops()
        ops.add(self._retired)
        for g in reg.guests.values():
            ops.add(g)
        ops.evictions = self._ev.evictions
        return figures_build.broker_figures(
            ops=ops,
            guests=[(g, reg.compress_mode(g)) for g in reg.guests.values()],
            shared=reg.shared.values(),
            capacity_bytes=self._ev.capacity,
            used_bytes=self.used_bytes,
            charged_bytes=self._table.charged_bytes,
            counted_bytes=self._table.counted_bytes,
            unique_pages=self.unique_pages,
            low_hit_rate=self._adm.low_hit_rate,
            predicted_useless=self._adm.predicted_useless,
            poor_compression=self._adm.poor_compression,
            reclaimed_on_put=self._ev.reclaimed_on_put,
            compress_default=reg.compress_default,
            compressed_cold=self._cold.compressed,
            recompressed_pages=self._idle.recompressed if self._idle else 0,
            recompressed_saved_bytes=self._idle.saved_bytes if self._idle else 0,
        )
