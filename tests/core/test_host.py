"""Host-aware capacity in the core (broker/core/host.py): the figures, ``auto`` sizing and the
governor, with fixed clocks and the figures of recorded hosts (tests/data/host/)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.host import (
    NORMAL,
    REASON_AVAILABLE,
    REASON_CGROUP,
    REASON_PSI,
    REASON_RECOVERED,
    RECOVERING,
    SHRUNK,
    GovernorSettings,
    HostGovernor,
    HostMemory,
    HostMemoryError,
    Psi,
    auto_capacity,
    judge,
    reserve_bytes,
)

pytestmark = pytest.mark.timeout(30)

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30
KIB = 1024


def quiet_psi(some: float = 0.0) -> Psi:
    return Psi(some, some / 2, some / 4, 1_000_000, some / 3, some / 6, some / 12, 300_000)


def host(
    total: int = 16 * GiB,
    available: int | None = None,
    *,
    psi: float | None = 0.0,
    limit: int | None = None,
    current: int | None = None,
    inactive: int | None = None,
    cgroup_psi: float | None = None,
) -> HostMemory:
    """A host's figures: ``available`` defaults to 30 % of ``total`` (healthy)."""
    return HostMemory(
        mem_total_bytes=total,
        mem_available_bytes=available if available is not None else total * 3 // 10,
        swap_total_bytes=0,
        swap_free_bytes=0,
        psi=None if psi is None else quiet_psi(psi),
        cgroup_path="/" if limit is not None else None,
        cgroup_limit_path="/" if limit is not None else None,
        cgroup_limit_bytes=limit,
        cgroup_current_bytes=current,
        cgroup_inactive_file_bytes=inactive,
        cgroup_psi=None if cgroup_psi is None else quiet_psi(cgroup_psi),
        source="test",
    )


# the recorded hosts of tests/data/host/ (the same figures, as the reader returns them)
HOST_95 = host(16 * GiB, 16 * GiB * 5 // 100 // KIB * KIB, psi=4.12)  # 95 % of memory in use
PSI_SPIKE = host(16 * GiB, 16 * GiB * 40 // 100, psi=38.5)  # room, but tasks stall on memory
CGROUP_AT_LIMIT = host(64 * GiB, 32 * GiB, psi=0.35, limit=2 * GiB, current=2 * GiB - 4 * MiB,
                       inactive=12 * MiB, cgroup_psi=22.0)  # fmt: skip
RECOVERED = host(16 * GiB, 16 * GiB * 30 // 100, psi=0.0)


# -- the figures -----------------------------------------------------------------------------


def test_the_host_limit_is_memtotal_or_the_lower_cgroup_limit() -> None:
    assert HOST_95.limit_bytes == 16 * GiB and HOST_95.limited_by == "host"
    assert CGROUP_AT_LIMIT.limit_bytes == 2 * GiB and CGROUP_AT_LIMIT.limited_by == "cgroup"
    # a cgroup limit above MemTotal limits nothing
    assert host(4 * GiB, limit=8 * GiB, current=0).limited_by == "host"


def test_available_is_the_lowest_of_memavailable_the_cgroup_room_and_the_limit() -> None:
    # the cgroup's inactive page cache counts as room (memory.current alone sits at the limit)
    assert CGROUP_AT_LIMIT.cgroup_available_bytes == 2 * GiB - (2 * GiB - 4 * MiB - 12 * MiB)
    assert CGROUP_AT_LIMIT.available_bytes == 16 * MiB
    assert CGROUP_AT_LIMIT.used_percent == pytest.approx(99.22, abs=0.01)
    # no memory.current known: MemAvailable, but never more than the limit
    assert host(64 * GiB, 32 * GiB, limit=2 * GiB).available_bytes == 2 * GiB
    assert HOST_95.used_percent == pytest.approx(95.0, abs=0.01)
    no_available = HostMemory(mem_total_bytes=GiB)
    assert no_available.available_bytes is None and no_available.used_percent is None


def test_psi_is_the_larger_of_the_systems_and_the_cgroups() -> None:
    assert CGROUP_AT_LIMIT.psi_some_avg10 == 22.0
    assert host(psi=None).psi_some_avg10 is None
    assert host(psi=3.0, cgroup_psi=1.0).psi_some_avg10 == 3.0


def test_as_dict_is_flat_and_json_ready_with_every_figure() -> None:
    figures = CGROUP_AT_LIMIT.as_dict()
    json.dumps(figures)
    assert figures["cgroup_psi_some_avg10"] == 22.0 and figures["psi_some_avg10"] == 0.35
    assert figures["limit_bytes"] == 2 * GiB and figures["limited_by"] == "cgroup"
    assert figures["available_bytes"] == 16 * MiB and figures["source"] == "test"
    assert host(psi=None).as_dict()["psi_full_total_us"] is None


# -- auto sizing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "reserve"),
    [
        (16 * GiB, math.ceil(0.15 * 16 * GiB)),  # 15 % above 512 MiB
        (2 * GiB, 512 * MiB),  # 15 % is 307 MiB: the minimum holds
        (512 * MiB, 512 * MiB),
    ],
)
def test_the_default_reserve_is_15_percent_at_least_512_mib(limit: int, reserve: int) -> None:
    assert reserve_bytes(limit) == reserve


def test_auto_capacity_is_the_limit_less_the_reserve_in_whole_pages() -> None:
    cap = auto_capacity(HOST_95)
    assert cap == (16 * GiB - math.ceil(0.15 * 16 * GiB)) // PAGE * PAGE
    assert auto_capacity(CGROUP_AT_LIMIT) == 2 * GiB - 512 * MiB  # the cgroup, not MemTotal
    assert auto_capacity(HOST_95, reserve=GiB) == 15 * GiB
    assert auto_capacity(HOST_95, reserve=0) == 16 * GiB


def test_auto_capacity_on_a_host_too_small_names_the_limit_and_its_file() -> None:
    with pytest.raises(HostMemoryError, match=r"MemTotal \(/proc/meminfo\)") as info:
        auto_capacity(host(512 * MiB))
    assert info.value.path == "/proc/meminfo"
    with pytest.raises(HostMemoryError, match="cgroup limit") as info:
        auto_capacity(host(64 * GiB, limit=256 * MiB, current=0))
    assert info.value.path == "/"
    assert isinstance(info.value, ValueError)  # a settings validator reports it as bad input
    with pytest.raises(ValueError, match="reserve"):
        auto_capacity(HOST_95, reserve=-1)


@pytest.mark.parametrize(
    "bad",
    [
        {"short_available_fraction": 0.2, "healthy_available_fraction": 0.1},
        {"healthy_available_fraction": 1.0},
        {"short_available_min_bytes": -1},
        {"psi_short": 5.0, "psi_healthy": 6.0},
        {"psi_short": 101.0},
        {"shrink_step": 0.0},
        {"grow_step": 1.5},
        {"recover_after": 0},
        {"settle_s": -1.0},
        {"min_capacity_fraction": 1.1},
    ],
)
def test_contradicting_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        GovernorSettings(**bad)  # type: ignore[arg-type]


# -- the governor: shrinking -----------------------------------------------------------------

BASE = 8 * GiB
STEP = math.ceil(0.05 * BASE)


def pages_down(n: int) -> int:
    return n // PAGE * PAGE


def test_a_host_at_95_percent_shrinks_the_capacity_at_once() -> None:
    reading = judge(HOST_95, GovernorSettings())
    assert reading.short and reading.reason == REASON_AVAILABLE and reading.deficit > 0
    gov = HostGovernor(BASE)
    assert gov.state == NORMAL
    # the deficit is a few hundred bytes: a step is given back, from what the broker holds
    eff = gov.observe(HOST_95, 6 * GiB, now=100.0)
    assert eff == pages_down(6 * GiB - STEP)
    assert gov.state == SHRUNK and gov.last_reason == REASON_AVAILABLE
    f = gov.figures()
    assert f["effective_capacity_bytes"] == eff and f["shrunk_by_bytes"] == BASE - eff
    assert f["base_capacity_bytes"] == BASE and f["last_change_at"] == 100.0
    assert f["host"]["used_percent"] == pytest.approx(95.0, abs=0.01)
    json.dumps(f)


def test_a_large_deficit_is_given_back_whole() -> None:
    short = host(16 * GiB, 16 * GiB // 100)  # 1 % available: 4 % of 16 GiB short of the floor
    deficit = math.ceil(0.05 * 16 * GiB) - 16 * GiB // 100
    assert deficit > STEP
    gov = HostGovernor(BASE)
    assert gov.observe(short, 6 * GiB, now=0.0) == pages_down(6 * GiB - deficit)


def test_a_psi_spike_shrinks_the_capacity() -> None:
    gov = HostGovernor(BASE)
    eff = gov.observe(PSI_SPIKE, 4 * GiB, now=0.0)
    assert eff == pages_down(4 * GiB - STEP) and gov.last_reason == REASON_PSI


def test_a_cgroup_at_its_limit_shrinks_the_capacity() -> None:
    base = auto_capacity(CGROUP_AT_LIMIT)  # 1.5 GiB
    gov = HostGovernor(base)
    eff = gov.observe(CGROUP_AT_LIMIT, base, now=0.0)
    deficit = 128 * MiB - 16 * MiB  # the 128 MiB minimum floor less the 16 MiB of room
    assert eff == pages_down(base - deficit) and gov.last_reason == REASON_CGROUP


def test_shrinking_starts_from_what_the_broker_holds_when_it_holds_less() -> None:
    gov = HostGovernor(BASE)
    # a broker holding 2 GiB of an 8 GiB capacity must not grow into the short host
    assert gov.observe(HOST_95, 2 * GiB, now=0.0) == pages_down(2 * GiB - STEP)


def test_while_short_the_governor_shrinks_again_only_after_settling_or_when_worse() -> None:
    gov = HostGovernor(BASE)
    first = gov.observe(HOST_95, 6 * GiB, now=0.0)
    # the next readings of the same shortage: the give-back is under way, nothing more
    for t in (1.0, 5.0, 9.9):
        assert gov.observe(HOST_95, 6 * GiB, now=t) == first
    assert gov.shrinks == 1
    # after settle_s (10 s: PSI avg10's window) still short: another step
    second = gov.observe(HOST_95, first, now=10.0)
    assert second == pages_down(first - STEP) and gov.shrinks == 2
    # the host got worse by more than a step at once: no waiting
    worse = host(16 * GiB, 0)
    third = gov.observe(worse, second, now=11.0)
    assert third == pages_down(second - math.ceil(0.05 * 16 * GiB)) and gov.shrinks == 3


def test_never_below_the_floor() -> None:
    gov = HostGovernor(BASE)
    floor = pages_down(int(0.10 * BASE))
    assert gov.floor == floor
    t = 0.0
    for _ in range(100):
        eff = gov.observe(host(16 * GiB, 0, psi=90.0), gov.effective, now=t)
        assert eff >= floor
        t += 10.0
    assert gov.effective == floor
    shrinks = gov.shrinks
    gov.observe(host(16 * GiB, 0, psi=90.0), 0, now=t + 100)
    assert gov.shrinks == shrinks  # at the floor: nothing left to give


# -- the governor: growing back --------------------------------------------------------------


def shrunk_governor(**tunables: float) -> HostGovernor:
    gov = HostGovernor(BASE, GovernorSettings(**tunables))  # type: ignore[arg-type]
    gov.observe(HOST_95, 6 * GiB, now=0.0)
    return gov


def test_recovery_grows_back_only_after_the_hysteresis_by_a_bounded_step() -> None:
    gov = shrunk_governor()
    shrunk = gov.effective
    counted = shrunk  # the broker filled what it has
    for i in range(1, 5):  # recover_after (5) healthy readings are needed
        assert gov.observe(RECOVERED, counted, now=float(i)) == shrunk
        assert gov.state == RECOVERING and gov.healthy_streak == i
    grown = gov.observe(RECOVERED, counted, now=5.0)
    assert grown == pages_down(shrunk + STEP) and gov.last_reason == REASON_RECOVERED
    # the count starts again: the next step needs five more healthy readings
    assert gov.healthy_streak == 0
    assert [gov.observe(RECOVERED, grown, now=6.0 + i) for i in range(4)] == [grown] * 4
    assert gov.observe(RECOVERED, grown, now=10.0) == pages_down(grown + STEP)


def test_a_reading_in_the_band_or_short_starts_the_count_again() -> None:
    gov = shrunk_governor()
    shrunk = gov.effective
    for i in range(4):
        gov.observe(RECOVERED, shrunk, now=1.0 + i)
    in_band = host(16 * GiB, 16 * GiB * 7 // 100)  # 7 %: neither short (5 %) nor healthy (10 %)
    assert not judge(in_band, gov.settings).short
    assert not judge(in_band, gov.settings).healthy
    assert gov.observe(in_band, shrunk, now=5.0) == shrunk and gov.healthy_streak == 0
    stalling = host(psi=5.0)  # PSI between healthy (1 %) and short (10 %)
    for i in range(4):
        gov.observe(RECOVERED, shrunk, now=6.0 + i)
    assert gov.observe(stalling, shrunk, now=10.0) == shrunk and gov.healthy_streak == 0


def test_growth_never_passes_the_base() -> None:
    base = BASE + 1000  # not a whole number of pages: the base itself is reached
    gov = HostGovernor(base, GovernorSettings(recover_after=1))
    gov.observe(HOST_95, 6 * GiB, now=0.0)
    t = 1.0
    while gov.effective < base:
        before = gov.effective
        gov.observe(RECOVERED, before, now=t)  # the broker uses what it has
        assert before < gov.effective <= base
        t += 1.0
    assert gov.effective == base and gov.state == NORMAL
    for i in range(10):
        assert gov.observe(RECOVERED, base, now=t + i) == base
    assert gov.figures()["shrunk_by_bytes"] == 0


def test_growth_takes_no_more_than_the_host_can_back() -> None:
    gov = shrunk_governor(recover_after=1)
    shrunk = gov.effective
    # healthy, but only 200 MiB above the healthy level (10 % of 16 GiB)
    healthy_level = math.ceil(0.10 * 16 * GiB)
    tight = host(16 * GiB, healthy_level + 200 * MiB)
    assert judge(tight, gov.settings).healthy
    assert gov.observe(tight, shrunk, now=1.0) == shrunk + 200 * MiB
    # the broker has 1 GiB of room unused: the host cannot back more, nothing grows
    assert gov.observe(tight, gov.effective - GiB, now=2.0) == shrunk + 200 * MiB


def test_set_base_moves_an_unshrunk_governor_and_caps_a_shrunk_one() -> None:
    gov = HostGovernor(BASE)
    assert gov.set_base(4 * GiB) == 4 * GiB and gov.state == NORMAL
    gov.observe(HOST_95, 4 * GiB, now=0.0)
    shrunk = gov.effective
    assert gov.set_base(16 * GiB) == shrunk  # grows back by recovery, not at once
    assert gov.set_base(2 * GiB) == 2 * GiB
    with pytest.raises(ValueError):
        gov.set_base(0)
    with pytest.raises(ValueError):
        HostGovernor(100)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 16 * GiB),  # MemAvailable
            st.floats(0.0, 100.0),  # PSI some avg10
            st.integers(0, 12 * GiB),  # counted bytes
            st.floats(0.0, 20.0),  # seconds since the last reading
        ),
        max_size=60,
    ),
    st.integers(PAGE, 12 * GiB),
)
def test_the_effective_capacity_stays_between_the_floor_and_the_base(
    readings: list[tuple[int, float, int, float]], base: int
) -> None:
    gov = HostGovernor(base)
    now = 0.0
    for available, psi, counted, dt in readings:
        now += dt
        eff = gov.observe(host(16 * GiB, available, psi=psi), counted, now=now)
        assert gov.floor <= eff <= base
        assert eff == base or eff % PAGE == 0
        assert gov.figures()["shrunk_by_bytes"] == base - eff
