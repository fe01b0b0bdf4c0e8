"""Every field of the guests' pressure reports, on recorded reports (docs/pressure.md,
"Feedback from the guest"): the multiplier, the fair shares, the order of the sheds and whose
ephemeral pages go first."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core import CoreConfig, Tmem
from broker.core.pressure import (
    GuestPressure,
    PressurePolicy,
    PressureSettings,
    effective_weight,
    memory_free,
    memory_need,
    pressure_multiplier,
)
from schemas.wire import Pressure
from tests.core.conftest import PAGE, page

MiB = 1 << 20
S = PressureSettings(persistent_share=0.6, release_share=0.3, shed_deadline_s=10.0)

# ``POST /v1/self/pressure`` bodies as agents sent them (guest_agent reads /proc/pressure/
# memory and /proc/meminfo): a guest close to OOM, an idle one, a busy one with room, and
# an old agent that reports PSI some only
RECORDED = {
    "near_oom": '{"psi_some_avg10": 38.5, "psi_full_avg10": 14.2, '
    '"mem_available_bytes": 42991616, "swap_used_bytes": 2040109465}',
    "idle": '{"psi_some_avg10": 0.0, "psi_full_avg10": 0.0, '
    '"mem_available_bytes": 3328599654, "swap_used_bytes": 0}',
    "busy_with_room": '{"psi_some_avg10": 4.0, "psi_full_avg10": 0.5, '
    '"mem_available_bytes": 629145600, "swap_used_bytes": 104857600}',
    "psi_only": '{"psi_some_avg10": 50.0}',
}


def report(name: str, at: float = 100.0) -> GuestPressure:
    p = Pressure.model_validate_json(RECORDED[name])
    return GuestPressure(
        p.psi_some_avg10,
        at,
        psi_full=p.psi_full_avg10,
        mem_available=p.mem_available_bytes,
        swap_used=p.swap_used_bytes,
    )


@pytest.mark.parametrize(
    ("name", "need", "free", "multiplier"),
    [
        # swap 1945.6 MiB against 41 MiB available: 1945.6 / 1986.6
        ("near_oom", 0.9794, 0.0, 1.9794),
        # 3174.4 MiB available, far above F = 1024 MiB: the full discount
        ("idle", 0.0, 1.0, 0.5),
        # swap 100 / (100 + 600); free (600 - 256) / 768 * (1 - 1/7); (1 + 1/7) * (1 - free/2)
        ("busy_with_room", 0.1429, 0.3839, 0.9235),
        ("psi_only", 0.5, 0.0, 1.5),
    ],
)
def test_the_formula_on_recorded_reports(
    name: str, need: float, free: float, multiplier: float
) -> None:
    r = report(name)
    n = memory_need(r, S)
    assert n == pytest.approx(need, abs=1e-4)
    assert memory_free(r, S, n) == pytest.approx(free, abs=1e-4)
    assert pressure_multiplier(r, S) == pytest.approx(multiplier, abs=1e-4)


def test_psi_some_alone_keeps_the_earlier_rule() -> None:
    for psi in (0.0, 12.5, 50.0, 100.0, 250.0):
        assert effective_weight(100, psi, S) == pytest.approx(100 * (1 + min(psi, 100) / 100))
    assert pressure_multiplier(None, S) == 1.0


def test_each_signal_alone_raises_the_need() -> None:
    assert memory_need(GuestPressure(None, 0, psi_full=25.0), S) == 1.0  # 4 x 25 %
    assert memory_need(GuestPressure(None, 0, mem_available=0), S) == 1.0
    assert memory_need(GuestPressure(None, 0, mem_available=128 * MiB), S) == 0.5
    half = GuestPressure(None, 0, mem_available=2048 * MiB, swap_used=2048 * MiB)
    assert memory_need(half, S) == 0.5
    # swap used without MemAvailable has no scale: it counts nothing
    assert memory_need(GuestPressure(None, 0, swap_used=1 << 40), S) == 0.0


def test_settings_that_contradict_are_refused() -> None:
    with pytest.raises(ValueError, match="pressure_low_available_bytes"):
        PressureSettings(pressure_low_available_bytes=1 << 30, pressure_free_available_bytes=1)
    with pytest.raises(ValueError, match="pressure_free_discount"):
        PressureSettings(pressure_free_discount=1.0)
    with pytest.raises(ValueError, match="ephemeral_policy"):
        PressureSettings(ephemeral_policy="arc")


def _broker(n: int) -> Tmem:
    tmem = Tmem(CoreConfig(capacity_bytes=100 * PAGE))
    for gid in range(1, n + 1):
        tmem.add_guest(gid, name=f"g{gid}", weight=100)
        assert tmem.create_pool(gid, "persistent") == 0
        assert tmem.create_pool(gid, "ephemeral") == 1
    return tmem


def _fill(tmem: Tmem, gid: int, pool: int, n: int) -> None:
    for i in range(n):
        tmem.put(gid, pool, 0, i, page(gid * 10_000 + pool * 1000 + i))


def test_near_oom_keeps_the_most_and_is_shed_last_the_idle_guest_first() -> None:
    """Three guests of equal weight hold 30 persistent pages each against a budget of 60:
    the one near OOM (multiplier 1.98) keeps all it holds, the one without a report
    (1.0) and the idle one (0.5) are shed, the idle one first and the most."""
    tmem = _broker(3)
    for gid in (1, 2, 3):
        _fill(tmem, gid, 0, 30)
    policy = PressurePolicy(tmem, S, now=0)
    intents = policy.step(100.0, {1: report("near_oom"), 2: report("idle")})
    sheds = [i for i in intents if i.kind == "shed"]
    assert [i.guest_id for i in sheds] == [2, 3]
    # water filling at level 0.2 pages per unit of weight: 39, 10 and 20 pages
    assert tmem.quota_of(1) == 39 and tmem.quota_of(2) == 10 and tmem.quota_of(3) == 20
    assert sheds[0].pages == 20 and sheds[1].pages == 10


def test_the_ephemeral_pages_of_a_guest_with_free_memory_go_first() -> None:
    tmem = _broker(2)
    _fill(tmem, 1, 1, 20)
    _fill(tmem, 2, 1, 20)
    policy = PressurePolicy(tmem, S, now=0)
    policy.step(100.0, {1: report("idle"), 2: report("near_oom")})
    tmem.evict(10 * PAGE)
    # 20 / (100 x 0.5) against 20 / (100 x 1.98): guest 1 gives up pages first
    assert tmem.guest_stats(1).ephemeral_pages == 10
    assert tmem.guest_stats(2).ephemeral_pages == 20
    tmem.evict(6 * PAGE)
    # 5 / 50 = 0.100 < 20 / 197.9 = 0.101: from there on they take turns
    assert tmem.guest_stats(1).ephemeral_pages == 5
    assert tmem.guest_stats(2).ephemeral_pages == 19


def test_a_stale_report_weighs_nothing_again() -> None:
    tmem = _broker(2)
    _fill(tmem, 1, 1, 20)
    _fill(tmem, 2, 1, 20)
    policy = PressurePolicy(tmem, S, now=0)
    policy.step(100.0, {1: report("idle", at=95.0)})
    assert tmem._reg.guest(1).account.bias == 0.5
    policy.step(130.0, {1: report("idle", at=95.0)})  # 35 s old: past pressure_ttl_s (30 s)
    assert tmem._reg.guest(1).account.bias == 1.0
    tmem.evict(2 * PAGE)  # equal standing again: the older account first, then the other
    assert tmem.guest_stats(1).ephemeral_pages == 19 == tmem.guest_stats(2).ephemeral_pages


opt_pct = st.none() | st.floats(0.0, 100.0)
opt_bytes = st.none() | st.integers(0, 1 << 40)


@settings(max_examples=200, deadline=None)
@given(
    some=opt_pct, full=opt_pct, available=opt_bytes, swap=opt_bytes, less=st.integers(0, 1 << 30)
)
def test_the_multiplier_stays_in_its_bounds_and_less_memory_never_weighs_less(
    some: float | None, full: float | None, available: int | None, swap: int | None, less: int
) -> None:
    r = GuestPressure(some, 0.0, psi_full=full, mem_available=available, swap_used=swap)
    m = pressure_multiplier(r, S)
    assert 1 - S.pressure_free_discount <= m <= 1 + S.pressure_boost
    if available is not None:
        tighter = GuestPressure(
            some, 0.0, psi_full=full, mem_available=max(0, available - less), swap_used=swap
        )
        assert memory_need(tighter, S) >= memory_need(r, S)
        assert pressure_multiplier(tighter, S) >= m - 1e-12
