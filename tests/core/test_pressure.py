from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.core.admission import AdmissionGate
from broker.core.pressure import (
    Claim,
    PressureSettings,
    bytes_to_reclaim,
    effective_weight,
    fair_shares,
)

S = PressureSettings()


@pytest.mark.parametrize(
    ("used", "capacity", "expected"),
    [
        (0, 1000, 0),
        (950, 1000, 0),  # at the high watermark: nothing yet
        (951, 1000, 951 - 850),  # above it: down to the low watermark
        (1000, 1000, 150),
        (10, 0, 0),
    ],
)
def test_watermarks_reclaim_down_to_the_low_mark(used: int, capacity: int, expected: int) -> None:
    assert bytes_to_reclaim(used, capacity, S) == expected


def test_settings_refuse_contradictions() -> None:
    with pytest.raises(ValueError):
        PressureSettings(low_watermark=0.9, high_watermark=0.8)
    with pytest.raises(ValueError):
        PressureSettings(release_share=0.9, persistent_share=0.5)
    with pytest.raises(KeyError):
        S.updated({"no_such_knob": 1})
    assert S.updated({"shed_deadline_s": 5.0}).shed_deadline_s == 5.0


def test_every_demand_fits_gives_caps() -> None:
    shares = fair_shares(100, [Claim(1, 100, None, 10), Claim(2, 100, 40, 20)])
    assert shares == {1: 100, 2: 40}


def test_equal_weights_split_evenly_when_both_want_more() -> None:
    assert fair_shares(100, [Claim(1, 100, None, 80), Claim(2, 100, None, 80)]) == {1: 50, 2: 50}


def test_unequal_weights_split_by_weight() -> None:
    shares = fair_shares(90, [Claim(1, 200, None, 100), Claim(2, 100, None, 100)])
    assert shares == {1: 60, 2: 30}


def test_small_guest_keeps_its_pages_and_the_rest_is_redistributed() -> None:
    shares = fair_shares(100, [Claim(1, 100, None, 10), Claim(2, 100, None, 200)])
    assert shares[2] == 90
    # the small guest may grow to the level, which is above what it holds
    assert shares[1] >= 10


def test_caps_bound_shares() -> None:
    shares = fair_shares(100, [Claim(1, 100, 20, 200), Claim(2, 100, None, 200)])
    assert shares == {1: 20, 2: 80}


@given(
    st.integers(min_value=0, max_value=10_000),
    st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=1000),
            st.one_of(st.none(), st.integers(min_value=0, max_value=5000)),
            st.integers(min_value=0, max_value=5000),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_fair_shares_never_overcommit_the_budget_under_pressure(
    budget: int, raw: list[tuple[int, int | None, int]]
) -> None:
    claims = [Claim(i, w, cap, d) for i, (w, cap, d) in enumerate(raw)]
    shares = fair_shares(budget, claims)
    want = {c.guest_id: c.demand if c.cap is None else min(c.demand, c.cap) for c in claims}
    for c in claims:
        if c.cap is not None:
            assert shares[c.guest_id] <= c.cap
    if sum(want.values()) > budget:
        # the guests held to their share fit in the budget together
        held = sum(min(want[g], s) for g, s in shares.items())
        assert held <= budget
        # guests held below their demand by the level all sit at the same level (to rounding)
        limited = [c for c in claims if shares[c.guest_id] < want[c.guest_id]]
        for a in limited:
            for b in limited:
                assert shares[a.guest_id] / a.weight < (shares[b.guest_id] + 1) / b.weight


def test_pressure_raises_weight_and_stale_reports_are_ignored() -> None:
    assert effective_weight(100, None, S) == 100
    assert effective_weight(100, 50.0, S) == 150
    assert effective_weight(100, 500.0, S) == 200  # clamped to 100% PSI


def test_admission_gate_admits_everything_while_hits_come_back() -> None:
    gate = AdmissionGate()
    for _ in range(2000):
        gate.record_put(S.admission_window)
        gate.record_hit()
        assert gate.admit(S)


def test_admission_gate_throttles_a_guest_whose_pages_never_come_back() -> None:
    gate = AdmissionGate()
    admitted = 0
    for i in range(10_000):
        gate.record_put(S.admission_window)
        if i >= S.admission_min_samples and gate.admit(S):
            admitted += 1
    tried = 10_000 - S.admission_min_samples
    assert admitted == pytest.approx(tried * S.admission_floor, abs=2)


def test_admission_gate_recovers_when_hits_return() -> None:
    gate = AdmissionGate()
    for _ in range(5000):
        gate.record_put(S.admission_window)
    assert gate.admit_fraction(S) == S.admission_floor
    for _ in range(20_000):
        gate.record_put(S.admission_window)
        gate.record_hit()
    assert gate.admit_fraction(S) == 1.0
