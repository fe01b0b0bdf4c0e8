"""The typed figures: their JSON is, key for key and value for value, what ``/v1/stats``,
``/v1/self`` and the pool figures showed before they were typed (``GOLDEN`` was printed by the
dict-building code they replaced, on the scenario below), and a guest's own view holds no
private figure."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from broker.core import CoreConfig, Status, Tmem
from broker.core import figures as figures_module
from broker.core.figures import StatsFigures, as_json
from broker.core.pressure import PressurePolicy, PressureSettings

PAGE = 4096
ZERO = bytes(PAGE)
SHARED = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"


def page(tag: int) -> bytes:
    # incompressible and unique to tag (a fixed generator, so sizes never vary)
    out = bytearray()
    x = tag * 2654435761 + 1
    while len(out) < PAGE:
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out += x.to_bytes(8, "little")
    return bytes(out[:PAGE])


def soft_page(tag: int) -> bytes:
    return tag.to_bytes(8, "little") + bytes(PAGE - 9) + b"\x01"


def scenario() -> tuple[Tmem, PressurePolicy]:
    tmem = Tmem(CoreConfig(capacity_bytes=16 * PAGE, max_pools_per_guest=8))
    tmem.add_guest(1, name="one", compress=True, cap_pages=5)
    tmem.add_guest(2, name="two", weight=200)
    tmem.add_guest(3, name="three", dedup_domain="other", frozen=True)
    tmem.add_guest(4, name="gone")
    per1 = tmem.create_pool(1, "persistent")
    eph1 = tmem.create_pool(1, "ephemeral")
    per2 = tmem.create_pool(2, "persistent")
    eph2 = tmem.create_pool(2, "ephemeral", exclusive_gets=True)
    tmem.create_pool(3, "persistent")
    for gid in (1, 2):
        tmem.authorise_shared(SHARED, gid, True)
    sh1 = tmem.create_pool(1, "ephemeral", shared=True, uuid=SHARED)
    sh2 = tmem.create_pool(2, "ephemeral", shared=True, uuid=SHARED)
    assert tmem.put(1, per1, 0, 0, page(1)) == Status.DONE  # compress_poor
    assert tmem.put(1, per1, 0, 1, soft_page(2)) == Status.DONE  # compressed
    assert tmem.put(1, per1, 0, 2, ZERO) == Status.DONE
    assert tmem.put(1, per1, 1, 0, page(1)) == Status.DONE  # dedup hit
    assert tmem.put(1, per1, 1, 1, page(5)) == Status.DONE
    assert tmem.put(1, per1, 1, 2, page(6)) == Status.QUOTA  # cap 5
    assert tmem.put(3, 0, 0, 0, page(7)) == Status.FROZEN
    for i in range(14):  # fills the broker: declined with capacity at the end
        tmem.put(2, per2, 5, i, page(100 + i))
    tmem.flush_object(2, per2, 5)
    tmem.put(1, eph1, 0, 0, page(8))
    tmem.put(1, eph1, 0, 1, page(9))
    tmem.get(1, eph1, 0, 0)
    tmem.get(1, eph1, 9, 9)
    tmem.flush_page(1, eph1, 0, 1)
    tmem.flush_page(1, eph1, 0, 1)
    tmem.put(2, sh2, 3, 0, page(10))
    tmem.put(1, sh1, 3, 1, page(11))
    tmem.get(1, sh1, 3, 0)
    tmem.put(2, eph2, 0, 0, page(12))
    tmem.get(2, eph2, 0, 0)  # exclusive
    tmem.put(4, tmem.create_pool(4, "persistent"), 0, 0, page(13))
    tmem.get(4, 0, 0, 0)
    tmem.remove_guest(4)
    tmem.put(2, per2, 6, 0, page(1))
    for i in range(10):  # evicts the oldest ephemeral pages
        tmem.put(2, per2, 7, i, page(200 + i))
    policy = PressurePolicy(tmem, PressureSettings(), now=0.0)
    policy.step(1.0, {})
    return tmem, policy


def figures_of(tmem: Tmem, policy: PressurePolicy) -> dict[str, Any]:
    """The figures the scenario left, as JSON (guest 1 compresses and has a cap; guest 3 is
    frozen, in another dedup domain; guest 1's pool 2 is shared with guest 2)."""
    return {
        "stats": as_json(tmem.stats()),
        "guest_1": as_json(tmem.guest_stats(1)),
        "guest_3": as_json(tmem.guest_stats(3)),
        "pool_1_0": as_json(tmem.pool_stats(1, 0)),
        "pool_1_0_admin": as_json(tmem.pool_stats(1, 0, admin=True)),
        "pool_1_2": as_json(tmem.pool_stats(1, 2)),
        "pressure": as_json(policy.figures()),
    }


GOLDEN: dict[str, Any] = {
    "stats": {
        "capacity_bytes": 65536,
        "used_bytes": 53275,
        "charged_bytes": 61467,
        "logical_pages": 17,
        "unique_pages": 14,
        "zero_pages": 1,
        "persistent_pages": 16,
        "ephemeral_pages": 1,
        "dedup_ratio": 1.1428571428571428,
        "compression_ratio": 1.0763772876583764,
        "puts": 38,
        "puts_stored": 34,
        "puts_declined": {"quota": 1, "capacity": 2, "frozen": 1, "policy": 0},
        "gets": 5,
        "get_hits": 4,
        "flushes": 2,
        "flushes_found": 1,
        "object_flushes": 1,
        "evictions": 1,
        "compress_poor": 6,
        "dedup_hits": 2,
        "policy_declines": {"low_hit_rate": 0},
        "reclaimed_on_put": 0,
        "guests": [
            {
                "guest_id": 1,
                "name": "one",
                "weight": 100,
                "cap_pages": 5,
                "quota_pages": 4,
                "frozen": False,
                "compress": True,
                "dedup_domain": "default",
                "pools": 3,
                "logical_pages": 5,
                "zero_pages": 1,
                "persistent_pages": 5,
                "ephemeral_pages": 0,
                "charged_bytes": 12315,
                "compression_ratio": 1.3304100690215184,
                "puts": 9,
                "puts_stored": 8,
                "puts_declined": {"quota": 1, "capacity": 0, "frozen": 0, "policy": 0},
                "gets": 3,
                "get_hits": 2,
                "flushes": 2,
                "flushes_found": 1,
                "object_flushes": 0,
                "evictions": 0,
                "compress_poor": 6,
                "dedup_hits": 1,
                "policy_declines": {"low_hit_rate": 0},
            },
            {
                "guest_id": 2,
                "name": "two",
                "weight": 200,
                "cap_pages": None,
                "quota_pages": 8,
                "frozen": False,
                "compress": False,
                "dedup_domain": "default",
                "pools": 3,
                "logical_pages": 11,
                "zero_pages": 0,
                "persistent_pages": 11,
                "ephemeral_pages": 0,
                "charged_bytes": 45056,
                "compression_ratio": 1.0,
                "puts": 27,
                "puts_stored": 25,
                "puts_declined": {"quota": 0, "capacity": 2, "frozen": 0, "policy": 0},
                "gets": 1,
                "get_hits": 1,
                "flushes": 0,
                "flushes_found": 0,
                "object_flushes": 1,
                "evictions": 0,
                "compress_poor": 0,
                "dedup_hits": 1,
                "policy_declines": {"low_hit_rate": 0},
            },
            {
                "guest_id": 3,
                "name": "three",
                "weight": 100,
                "cap_pages": None,
                "quota_pages": 4,
                "frozen": True,
                "compress": False,
                "dedup_domain": "other",
                "pools": 1,
                "logical_pages": 0,
                "zero_pages": 0,
                "persistent_pages": 0,
                "ephemeral_pages": 0,
                "charged_bytes": 0,
                "compression_ratio": 1.0,
                "puts": 1,
                "puts_stored": 0,
                "puts_declined": {"quota": 0, "capacity": 0, "frozen": 1, "policy": 0},
                "gets": 0,
                "get_hits": 0,
                "flushes": 0,
                "flushes_found": 0,
                "object_flushes": 0,
                "evictions": 0,
                "compress_poor": 0,
                "dedup_hits": 0,
                "policy_declines": {"low_hit_rate": 0},
            },
        ],
        "shared_pools": [
            {
                "uuid": "6ba7b810-9dad-11d1-80b4-00c04fd430c8",
                "members": [1, 2],
                "weight": 200,
                "evictions": 1,
                "logical_pages": 1,
                "zero_pages": 0,
                "charged_bytes": 4096,
                "compression_ratio": 1.0,
            }
        ],
    },
    "guest_1": {
        "guest_id": 1,
        "name": "one",
        "weight": 100,
        "cap_pages": 5,
        "quota_pages": 4,
        "frozen": False,
        "compress": True,
        "dedup_domain": "default",
        "pools": 3,
        "logical_pages": 5,
        "zero_pages": 1,
        "persistent_pages": 5,
        "ephemeral_pages": 0,
        "charged_bytes": 12315,
        "compression_ratio": 1.3304100690215184,
        "puts": 9,
        "puts_stored": 8,
        "puts_declined": {"quota": 1, "capacity": 0, "frozen": 0, "policy": 0},
        "gets": 3,
        "get_hits": 2,
        "flushes": 2,
        "flushes_found": 1,
        "object_flushes": 0,
        "evictions": 0,
        "compress_poor": 6,
        "policy_declines": {"low_hit_rate": 0},
    },
    "guest_3": {
        "guest_id": 3,
        "name": "three",
        "weight": 100,
        "cap_pages": None,
        "quota_pages": 4,
        "frozen": True,
        "compress": False,
        "dedup_domain": "other",
        "pools": 1,
        "logical_pages": 0,
        "zero_pages": 0,
        "persistent_pages": 0,
        "ephemeral_pages": 0,
        "charged_bytes": 0,
        "compression_ratio": 1.0,
        "puts": 1,
        "puts_stored": 0,
        "puts_declined": {"quota": 0, "capacity": 0, "frozen": 1, "policy": 0},
        "gets": 0,
        "get_hits": 0,
        "flushes": 0,
        "flushes_found": 0,
        "object_flushes": 0,
        "evictions": 0,
        "compress_poor": 0,
        "policy_declines": {"low_hit_rate": 0},
    },
    "pool_1_0": {
        "pool_id": 0,
        "kind": "persistent",
        "shared": False,
        "uuid": None,
        "logical_pages": 5,
        "zero_pages": 1,
        "charged_bytes": 12315,
        "compression_ratio": 1.3304100690215184,
        "puts": 6,
        "puts_stored": 5,
        "puts_declined": {"quota": 1, "capacity": 0, "frozen": 0, "policy": 0},
        "gets": 0,
        "get_hits": 0,
        "flushes": 0,
        "flushes_found": 0,
        "object_flushes": 0,
        "evictions": 0,
        "compress_poor": 3,
    },
    "pool_1_0_admin": {
        "pool_id": 0,
        "kind": "persistent",
        "shared": False,
        "uuid": None,
        "logical_pages": 5,
        "zero_pages": 1,
        "charged_bytes": 12315,
        "compression_ratio": 1.3304100690215184,
        "puts": 6,
        "puts_stored": 5,
        "puts_declined": {"quota": 1, "capacity": 0, "frozen": 0, "policy": 0},
        "gets": 0,
        "get_hits": 0,
        "flushes": 0,
        "flushes_found": 0,
        "object_flushes": 0,
        "evictions": 0,
        "compress_poor": 3,
        "dedup_hits": 1,
    },
    "pool_1_2": {
        "pool_id": 2,
        "kind": "ephemeral",
        "shared": True,
        "uuid": "6ba7b810-9dad-11d1-80b4-00c04fd430c8",
        "logical_pages": 1,
        "zero_pages": 0,
        "charged_bytes": 4096,
        "compression_ratio": 1.0,
        "puts": 2,
        "puts_stored": 2,
        "puts_declined": {"quota": 0, "capacity": 0, "frozen": 0, "policy": 0},
        "gets": 1,
        "get_hits": 1,
        "flushes": 0,
        "flushes_found": 0,
        "object_flushes": 0,
        "evictions": 1,
        "compress_poor": 1,
    },
    "pressure": {
        "state": "quotas_lowered",
        "high_watermark_bytes": 62259,
        "low_watermark_bytes": 55705,
        "persistent_trigger_pages": 12,
        "persistent_release_pages": 9,
        "sheds_issued": 2,
        "sheds_acked": 0,
        "sheds_met": 0,
        "sheds_overdue": 0,
        "sheds_open": 2,
        "guests_overdue": 0,
        "pages_returned": 0,
        "quotas_lowered": 3,
        "quotas_raised": 0,
        "reclaim_runs": 0,
        "reclaimed_pages": 0,
        "evicted_notices": 0,
        "steps": 1,
        "dynamic_quotas": {"1": 4, "2": 8, "3": 4},
    },
}


# What issue #16 [capacity] added to these figures (the contract changes only by adding):
# counted_bytes, the compression modes, the background pass's count; and a guest made without
# a compress setting now shows ``compress: null`` (it inherits) where it showed false.
ADDED = {
    "stats": {
        "counted_bytes": 61467,
        "compress_default": "never",
        "compressed_cold": 0,
        "recompressed_pages": 0,
        "recompressed_saved_bytes": 0,
    },
    "pressure": {"compressed_pages": 0, "admin_sheds": 0},
}
GUEST_MODES = {1: "always", 2: "never", 3: "never"}
INHERITING = {2, 3}


def _before_capacity(got: dict[str, Any]) -> dict[str, Any]:
    """``got`` less the additions listed above, checking each on the way."""
    out = json.loads(json.dumps(got))
    for part, added in ADDED.items():
        for key, value in added.items():
            assert out[part].pop(key) == value, (part, key)
    assert out["stats"]["policy_declines"].pop("predicted_useless") == 0
    assert out["stats"]["policy_declines"].pop("poor_compression") == 0
    guests = [*out["stats"]["guests"], out["guest_1"], out["guest_3"]]
    for g in guests:
        assert g["policy_declines"].pop("predicted_useless") == 0
        assert g["policy_declines"].pop("poor_compression") == 0
        gid = g["guest_id"]
        assert g.pop("compress_mode") == GUEST_MODES[gid]
        if gid in INHERITING:
            assert g["compress"] is None
            g["compress"] = False
    return out


def test_the_json_of_the_typed_figures_is_the_json_of_before() -> None:
    got = _before_capacity(figures_of(*scenario()))
    assert got == GOLDEN
    # the same keys in the same order, nested alike, values of the same JSON types
    assert json.dumps(got) == json.dumps(GOLDEN)


def test_a_guest_sees_no_private_figure() -> None:
    tmem, _ = scenario()
    own = tmem.guest_stats(1)
    assert own.ops.dedup_hits is None and "dedup_hits" not in as_json(own)
    assert tmem.pool_stats(1, 0).ops.dedup_hits is None
    assert tmem.pool_stats(1, 0, admin=True).ops.dedup_hits == 1
    admin = next(g for g in tmem.stats().guests if g.guest_id == 1)
    assert admin.ops.dedup_hits == 1
    # the two views differ only in what is private
    assert dataclasses.replace(admin, ops=dataclasses.replace(admin.ops, dedup_hits=None)) == own


def test_stats_without_a_pressure_loop_have_no_pressure_key() -> None:
    tmem, policy = scenario()
    without = as_json(StatsFigures(broker=tmem.stats(), sheds_issued=3))
    assert "pressure" not in without and without["sheds_issued"] == 3
    with_policy = as_json(
        StatsFigures(broker=tmem.stats(), sheds_issued=3, pressure=policy.figures())
    )
    assert with_policy["pressure"] == {**GOLDEN["pressure"], **ADDED["pressure"]}
    assert list(with_policy)[-2:] == ["sheds_issued", "pressure"]


def _models() -> list[type]:
    return [
        obj
        for obj in vars(figures_module).values()
        if isinstance(obj, type) and dataclasses.is_dataclass(obj)
    ]


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.__name__)
def test_every_figure_says_what_it_is(model: type) -> None:
    for f in dataclasses.fields(model):
        assert f.metadata.get("kind"), f"{model.__name__}.{f.name} has no kind"
        help = f.metadata.get("help")
        assert isinstance(help, str) and len(help.split()) >= 3, f"{model.__name__}.{f.name}"
    assert model.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert "__slots__" in vars(model)
