"""The pool's figures: ``GET /v1/stats`` of any broker of a cluster sums the brokers.

Every broker publishes its own ``/v1/stats`` with its heartbeat (``brokers.figures`` in
PostgreSQL); :func:`pooled_stats` sums the live ones (this broker's own figures taken fresh):
numbers are added, counters by reason (dicts) added key by key, the per-guest list is the
union of each broker's served guests, and the two ratios are computed again from the sums
(their definitions in ``broker.core.figures``). Strings and anything else keep this broker's
value. The per-broker breakdown is the additive field ``brokers``.

Contents in the Redis Cluster are counted once for the pool: each broker's ``unique_pages``
(and ``used_bytes``) counts the Redis contents its own guests reference
(``redis_contents_held``), so a content referenced from two brokers would count twice in the
sum. Given ``redis_contents`` (the cluster's own count, ``ClusterEngine.count_contents``), the
pool's figures take the brokers' shares out and that count in.
"""

from __future__ import annotations

from typing import Any

from schemas.batch import PAGE_SIZE


def _add(total: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        mine = total.get(key)
        if isinstance(value, bool) or key not in total:
            if key not in total:
                total[key] = value
            continue
        if isinstance(value, int | float) and isinstance(mine, int | float):
            total[key] = mine + value
        elif isinstance(value, dict) and isinstance(mine, dict):
            merged = dict(mine)
            _add(merged, value)
            total[key] = merged
        elif isinstance(value, list) and isinstance(mine, list):
            total[key] = mine + value


def pooled_stats(
    local: dict[str, Any],
    broker_id: str,
    brokers: list[dict[str, Any]],
    redis_contents: int | None = None,
) -> dict[str, Any]:
    """``local`` (this broker's stats) summed with the live ``brokers``' published stats
    (``{"broker_id", "url", "alive", "heartbeat_at", "stats"}`` each), plus the breakdown;
    ``redis_contents``: the cluster-wide count of contents (None: unknown, the sum stays)."""
    total: dict[str, Any] = {
        k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
        for k, v in local.items()
    }
    breakdown = []
    for b in brokers:
        own = b["broker_id"] == broker_id
        stats = local if own else b.get("stats")
        if b.get("alive") and not own and isinstance(stats, dict):
            _add(total, {k: v for k, v in stats.items() if k != "guests_served"})
        breakdown.append(
            {
                "broker_id": b["broker_id"],
                "url": b["url"],
                "alive": bool(b.get("alive")) or own,
                "heartbeat_at": b.get("heartbeat_at"),
                "stats": {k: v for k, v in (stats or {}).items() if k != "guests_served"},
            }
        )
    total.pop("guests_served", None)
    held = total.get("redis_contents_held")
    if redis_contents is not None and isinstance(held, int):
        total["unique_pages"] = (total.get("unique_pages") or 0) - held + redis_contents
        total["used_bytes"] = (total.get("used_bytes") or 0) + (redis_contents - held) * PAGE_SIZE
        total["redis_contents_held"] = redis_contents
    unique = total.get("unique_pages") or 0
    if isinstance(unique, int):
        nonzero = (total.get("logical_pages") or 0) - (total.get("zero_pages") or 0)
        total["dedup_ratio"] = round(nonzero / unique, 4) if unique else 1.0
        used = total.get("used_bytes") or 0
        total["compression_ratio"] = round(unique * PAGE_SIZE / used, 4) if used else 1.0
    total["brokers"] = breakdown
    return total
