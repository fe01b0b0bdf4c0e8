"""The pressure policy with a fake clock: every rule, both ways (broker/core/pressure.py)."""

from __future__ import annotations

import itertools

import pytest

from broker.core import CoreConfig, Tmem
from broker.core.admission import AdmissionGate
from broker.core.figures import PolicyDeclines
from broker.core.pressure import (
    NORMAL,
    QUOTAS_LOWERED,
    RECLAIMING,
    GuestPressure,
    Intent,
    PressurePolicy,
    PressureSettings,
)
from schemas.batch import STATUS_DONE, STATUS_POLICY, STATUS_QUOTA
from tests.core.conftest import PAGE, ZERO, page

CAP = 100  # pages of capacity in these tests


def broker(
    weights: dict[int, int], caps: dict[int, int | None] | None = None, capacity: int = CAP
) -> Tmem:
    tmem = Tmem(CoreConfig(capacity_bytes=capacity * PAGE))
    for gid, weight in weights.items():
        tmem.add_guest(gid, name=f"g{gid}", weight=weight, cap_pages=(caps or {}).get(gid))
        assert tmem.create_pool(gid, "persistent") == 0
        assert tmem.create_pool(gid, "ephemeral") == 1
    return tmem


def fill(tmem: Tmem, gid: int, pool: int, n: int, start: int = 0) -> list[int]:
    return [tmem.put(gid, pool, gid, start + i, page(gid * 100_000 + start + i)) for i in range(n)]


def of(intents: list[Intent], kind: str) -> dict[int, Intent]:
    return {i.guest_id: i for i in intents if i.kind == kind}


# -- watermarks ------------------------------------------------------------------------------

SETTINGS = PressureSettings(high_watermark=0.9, low_watermark=0.7)


def test_background_step_evicts_down_to_the_low_watermark_only_above_the_high() -> None:
    tmem = broker({1: 100})
    policy = PressurePolicy(tmem, PressureSettings(high_watermark=1.0, low_watermark=0.7), now=0)
    fill(tmem, 1, 1, 90)  # 90 %: at most the high watermark (1.0), nothing to do
    policy.step(0.0, {})
    assert tmem.used_bytes == 90 * PAGE and policy.state == NORMAL
    policy.update_settings(SETTINGS)  # an admin lowers the high watermark to 0.9
    fill(tmem, 1, 1, 1, start=90)  # 91 pages: above 0.9
    policy.step(1.0, {})
    assert tmem.used_bytes == 70 * PAGE  # down to the low watermark, not just under the high
    assert policy.counters.reclaimed_pages == 21
    assert policy.state == RECLAIMING
    policy.step(2.0, {})  # under the low watermark again: back to normal, nothing evicted
    assert policy.state == NORMAL and policy.counters.reclaimed_pages == 21


def test_a_put_above_the_high_watermark_steps_toward_the_low_one_with_hysteresis() -> None:
    tmem = broker({1: 100})
    PressurePolicy(tmem, SETTINGS, now=0)
    fill(tmem, 1, 1, 90)
    assert tmem.used_bytes == 90 * PAGE and not tmem.reclaiming
    fill(tmem, 1, 1, 1, start=90)  # 91 > 90, but a put checks before it adds its page
    assert not tmem.reclaiming and tmem.used_bytes == 91 * PAGE
    fill(tmem, 1, 1, 1, start=91)  # this put finds storage above the high mark
    assert tmem.reclaiming
    used = [tmem.used_bytes // PAGE]
    for i in range(100):
        fill(tmem, 1, 1, 1, start=200 + i)
        used.append(tmem.used_bytes // PAGE)
        if not tmem.reclaiming:
            break
    # each put evicts at most RECLAIM_PER_PUT (2) and adds one: a net page per put, down to
    # the low watermark (then the put adds its page)
    assert all(a - b == 1 for a, b in itertools.pairwise(used))
    assert used[0] == 90 and used[-1] == 71 and not tmem.reclaiming
    # below the high watermark again the puts do not evict (hysteresis both ways)
    before = tmem.stats().ops.evictions
    fill(tmem, 1, 1, 10, start=400)
    assert tmem.stats().ops.evictions == before
    assert tmem.stats().reclaimed_on_put > 0


def test_persistent_pages_are_never_reclaimed() -> None:
    tmem = broker({1: 100})
    policy = PressurePolicy(
        tmem, PressureSettings(high_watermark=0.5, low_watermark=0.4, persistent_share=1.0,
                               release_share=1.0), now=0,
    )  # fmt: skip
    assert fill(tmem, 1, 0, 80) == [STATUS_DONE] * 80
    policy.step(0.0, {})
    assert tmem.stats().persistent_pages == 80 and tmem.stats().ops.evictions == 0


# -- fair shares and sheds -------------------------------------------------------------------

QUOTA = PressureSettings(persistent_share=0.6, release_share=0.3, shed_deadline_s=10.0)


def test_quotas_follow_weights_and_caps_and_the_excess_is_shed() -> None:
    # budget: 60 pages. Guest 1 (weight 200), 2 (100), 3 (100, cap 10).
    tmem = broker({1: 200, 2: 100, 3: 100}, caps={3: 10})
    policy = PressurePolicy(tmem, QUOTA, now=0)
    fill(tmem, 1, 0, 30)
    fill(tmem, 2, 0, 30)
    fill(tmem, 3, 0, 10)
    intents = policy.step(0.0, {})  # 70 > 60
    quota, shed = of(intents, "quota"), of(intents, "shed")
    # water level 0.2 pages per weight: guest 1 may hold 40 (it holds 30: room to grow),
    # guest 2 20 (it holds 30: shed 10), guest 3 is held by its cap (10) anyway
    assert tmem.quota_of(1) == 40 and tmem.quota_of(2) == 20 and tmem.quota_of(3) == 10
    assert quota[1].cap_pages == 40 and 1 not in shed
    assert quota[2].cap_pages == 20 and shed[2].pages == 10 and shed[2].deadline == 10.0
    assert 3 not in quota and 3 not in shed  # the cap binds before the share
    assert policy.state == QUOTAS_LOWERED
    assert tmem.guest_stats(2).quota_pages == 20


def test_a_guest_under_pressure_keeps_more_and_stale_reports_age_out() -> None:
    tmem = broker({1: 100, 2: 100})
    policy = PressurePolicy(tmem, QUOTA, now=0)
    fill(tmem, 1, 0, 40)
    fill(tmem, 2, 0, 40)
    # guest 2 reports PSI some 100 %: weight 200 against 100
    policy.step(100.0, {2: GuestPressure(100.0, at=95.0)})
    assert tmem.quota_of(1) == 20 and tmem.quota_of(2) == 40
    # the same report, now older than pressure_ttl_s (30 s), weighs nothing
    tmem2 = broker({1: 100, 2: 100})
    fill(tmem2, 1, 0, 40)
    fill(tmem2, 2, 0, 40)
    PressurePolicy(tmem2, QUOTA, now=0).step(100.0, {2: GuestPressure(100.0, at=60.0)})
    assert tmem2.quota_of(1) == 30 == tmem2.quota_of(2)


def test_grace_until_the_deadline_then_puts_are_declined_until_under_quota() -> None:
    tmem = broker({1: 100, 2: 100})
    policy = PressurePolicy(tmem, QUOTA, now=0)
    fill(tmem, 1, 0, 40)
    fill(tmem, 2, 0, 40)
    intents = policy.step(0.0, {})
    assert of(intents, "shed")[1].pages == 10
    policy.shed_sent(1, 7)
    # grace: replacing a page it holds works, growing does not
    assert tmem.put(1, 0, 1, 0, page(1)) == STATUS_DONE
    assert tmem.put(1, 0, 1, 999, page(2)) == STATUS_QUOTA
    policy.step(9.9, {})
    assert policy.sheds[1].overdue is False
    policy.step(10.0, {})  # the deadline: still 40 > 30
    assert policy.sheds[1].overdue and policy.counters.sheds_overdue == 2
    assert policy.figures().guests_overdue == 2
    # overdue: even a replacement is declined (and, per the contract, removes the old copy)
    assert tmem.put(1, 0, 1, 1, page(3)) == STATUS_QUOTA
    assert tmem.get(1, 0, 1, 1) is None
    # the guest sheds: back under its quota its puts are taken again
    for i in range(2, 12):
        tmem.flush_page(1, 0, 1, i)
    assert tmem.put(1, 0, 1, 1, page(3)) == STATUS_DONE
    policy.step(11.0, {})
    assert 1 not in policy.sheds
    assert policy.acked(1, 7, 11) and policy.counters.pages_returned == 11
    assert not policy.acked(1, 7, 11)  # an ack counts once
    # nothing persistent was dropped by the broker: what left was the guest's own doing
    assert tmem.guest_stats(1).persistent_pages == 30


def test_a_guest_that_sheds_in_time_is_never_overdue() -> None:
    tmem = broker({1: 100, 2: 100})
    policy = PressurePolicy(tmem, QUOTA, now=0)
    fill(tmem, 1, 0, 40)
    fill(tmem, 2, 0, 20)
    policy.step(0.0, {})  # 60: not above the share yet
    assert policy.state == NORMAL
    fill(tmem, 1, 0, 5, start=40)
    intents = policy.step(1.0, {})
    assert of(intents, "shed")[1].pages == 5  # level: 40 for guest 1 (guest 2 wants 20)
    policy.shed_sent(1, 3)
    for i in range(5):
        tmem.flush_page(1, 0, 1, i)
    assert policy.acked(1, 3, 5)
    policy.step(2.0, {})
    policy.step(20.0, {})
    assert policy.counters.sheds_met == 1 and policy.counters.sheds_overdue == 0
    assert policy.counters.sheds_acked == 1


def test_quotas_rise_again_when_pressure_eases() -> None:
    tmem = broker({1: 100, 2: 100}, caps={2: 35})
    policy = PressurePolicy(tmem, QUOTA, now=0)
    fill(tmem, 1, 0, 40)
    fill(tmem, 2, 0, 30)
    policy.step(0.0, {})
    assert tmem.quota_of(1) == 30 and policy.state == QUOTAS_LOWERED
    for i in range(20):  # 50 pages: between release (30) and trigger (60): quotas stay
        tmem.flush_page(1, 0, 1, i)
    assert of(policy.step(1.0, {}), "quota") == {}
    assert tmem.quota_of(1) == 30 and policy.state == QUOTAS_LOWERED
    for i in range(20, 40):
        tmem.flush_page(1, 0, 1, i)
    intents = policy.step(2.0, {})  # 30 <= release share: quotas back to the caps
    quota = of(intents, "quota")
    assert quota[1].cap_pages is None and quota[2].cap_pages == 35
    assert tmem.quota_of(1) is None and policy.state == NORMAL
    assert fill(tmem, 1, 0, 45) == [STATUS_DONE] * 45


def test_sheds_are_re_derived_by_a_new_policy_after_a_restart() -> None:
    tmem = broker({1: 100, 2: 100})
    fill(tmem, 1, 0, 40)
    fill(tmem, 2, 0, 40)
    PressurePolicy(tmem, QUOTA, now=0).step(0.0, {})
    tmem.set_quota(1, None)
    tmem.set_quota(2, None)  # a restart loses the dynamic quotas...
    intents = PressurePolicy(tmem, QUOTA, now=500).step(500.0, {})
    assert set(of(intents, "shed")) == {1, 2}  # ...and the first step sets them again
    assert of(intents, "shed")[1].deadline == 510.0


# -- admission -------------------------------------------------------------------------------

GATE = PressureSettings(
    high_watermark=1.0,
    low_watermark=0.5,
    admission_min_samples=20,
    admission_window=200,
    admission_min_hit_rate=0.2,
    admission_floor=0.25,
)


def test_admission_throttles_unused_ephemeral_pages_only_while_memory_is_tight() -> None:
    tmem = broker({1: 100, 2: 100}, capacity=1000)
    PressurePolicy(tmem, GATE, now=0)
    # loose (under the low watermark): everything is admitted, hit rate or not
    assert fill(tmem, 1, 1, 300) == [STATUS_DONE] * 300
    fill(tmem, 2, 0, 250)  # persistent: 550 pages, above the low watermark (500)
    statuses = fill(tmem, 1, 1, 400, start=1000)
    declined = statuses.count(STATUS_POLICY)
    assert declined == pytest.approx(300, abs=2)  # a quarter (the floor) admitted
    assert tmem.stats().policy_declines == PolicyDeclines(
        low_hit_rate=declined, predicted_useless=0, poor_compression=0
    )
    assert tmem.guest_stats(1).ops.puts_declined.policy == declined
    assert tmem.guest_stats(2).policy_declines == PolicyDeclines(
        low_hit_rate=0, predicted_useless=0, poor_compression=0
    )
    # zero pages cost nothing and always pass
    assert all(tmem.put(1, 1, 5, i, ZERO) == STATUS_DONE for i in range(50))


def test_admission_recovers_when_pages_come_back() -> None:
    tmem = broker({1: 100, 2: 100}, capacity=1000)
    PressurePolicy(tmem, GATE, now=0)
    fill(tmem, 2, 0, 600)  # tight from the start
    assert fill(tmem, 1, 1, 200).count(STATUS_POLICY) > 100
    # now every page the guest puts it gets back: the hit rate climbs and puts pass again
    results = []
    for i in range(400):
        status = tmem.put(1, 1, 9, i, page(50_000 + i))
        results.append(status)
        if status == STATUS_DONE:
            assert tmem.get(1, 1, 9, i) is not None
    assert results[-100:] == [STATUS_DONE] * 100


# -- evicted notices -------------------------------------------------------------------------


def test_evicted_notices_are_batched_one_per_interval() -> None:
    tmem = broker({1: 100, 2: 100})
    settings = PressureSettings(
        high_watermark=1.0, low_watermark=1.0, evicted_notice_interval_s=5.0
    )  # no reclaim: only the evictions that make room
    policy = PressurePolicy(tmem, settings, now=0)
    fill(tmem, 1, 1, 100)
    fill(tmem, 2, 0, 10)  # evicts 10 of guest 1's ephemeral pages
    assert of(policy.step(0.0, {}), "evicted")[1].pages == 10
    fill(tmem, 2, 0, 5, start=10)
    assert of(policy.step(1.0, {}), "evicted") == {}  # within the interval: held back
    fill(tmem, 2, 0, 3, start=15)
    assert of(policy.step(4.9, {}), "evicted") == {}
    assert of(policy.step(5.0, {}), "evicted")[1].pages == 8  # the count since the last
    assert of(policy.step(20.0, {}), "evicted") == {}  # nothing new: no notice
    assert policy.counters.evicted_notices == 2


def test_a_removed_guest_is_forgotten() -> None:
    tmem = broker({1: 100, 2: 100})
    policy = PressurePolicy(tmem, QUOTA, now=0)
    fill(tmem, 1, 0, 40)
    fill(tmem, 2, 0, 40)
    policy.step(0.0, {})
    tmem.remove_guest(1)
    policy.step(1.0, {})
    assert 1 not in policy.quotas and 1 not in policy.sheds


def test_an_admission_minimum_the_window_never_reaches_is_refused() -> None:
    # the decayed put count stays within (window/2, window] once it reached the window: a
    # minimum above window/2 would leave the gate open most or all of the time, silently
    with pytest.raises(ValueError, match="admission_min_samples"):
        PressureSettings(admission_min_samples=600, admission_window=1000)
    settings = PressureSettings(
        admission_min_samples=500, admission_window=1000, admission_min_hit_rate=0.5
    )
    gate = AdmissionGate()
    for i in range(10_000):
        gate.record_put(settings.admission_window)
        assert i < 1000 or 500 < gate.puts <= 1000
    assert gate.admit_fraction(settings) == settings.admission_floor
