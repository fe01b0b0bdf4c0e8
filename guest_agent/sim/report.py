"""Tables and a plain-words summary of a :class:`~guest_agent.sim.runner.SimResult`.

console.print(figures_table(result))
console.print(broker_table(result))
print(what_happened(result))
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table

from .runner import SimResult

_PAGE = 4096


def _int(d: dict[str, object], key: str) -> int:
    v = d.get(key, 0)
    return v if isinstance(v, int) else 0


def _declines(d: dict[str, object]) -> str:
    # "quota (agent)" (pages the agent withheld, knowing it was at its cap) counts with the
    # broker's "quota" declines here; the JSON keeps them apart.
    v = d.get("declines")
    if not isinstance(v, dict) or not v:
        return "-"
    merged: dict[str, int] = {}
    for k, n in v.items():
        base = str(k).split(" ")[0]
        merged[base] = merged.get(base, 0) + int(n)
    return ", ".join(f"{k} {n:,}" for k, n in sorted(merged.items()))


def _rate(hits: int, misses: int) -> str:
    return f"{100.0 * hits / (hits + misses):.1f}%" if hits + misses else "-"


def figures_table(result: SimResult) -> Table:
    """One row per guest and a total row: faults, tmem hits/misses, disk I/O avoided, ..."""
    # Narrow enough for an 80-column terminal: no vertical rules, two-line headers.
    table = Table(
        title="Simulated guests", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0)
    )
    for name, justify in (
        ("guest", "left"),
        ("faults", "right"),
        ("tmem\nhits", "right"),
        ("tmem\nmisses", "right"),
        ("hit\nrate", "right"),
        ("reads\nsaved", "right"),
        ("writes\nsaved", "right"),
        ("declined", "left"),
        ("sheds", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]

    def row(name: str, d: dict[str, object], *, style: str | None = None) -> None:
        hits, misses = _int(d, "tmem_hits"), _int(d, "tmem_misses")
        table.add_row(
            name,
            f"{_int(d, 'faults'):,}",
            f"{hits:,}",
            f"{misses:,}",
            _rate(hits, misses),
            f"{_int(d, 'disk_reads_avoided'):,}",
            f"{_int(d, 'disk_writes_avoided'):,}",
            _declines(d),
            f"{_int(d, 'sheds_answered')}",
            style=style,
        )

    for name, d in result.guests.items():
        row(name, d)
    table.add_section()
    row("all", result.totals, style="bold")
    return table


def broker_table(result: SimResult) -> Table:
    """The broker's own figures at the end and the modelled time saved."""
    table = Table(title="Broker and modelled time", show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, label in broker_lines(result):
        table.add_row(key, label)
    return table


def broker_lines(result: SimResult) -> list[tuple[str, str]]:
    """(label, value) pairs of :func:`broker_table`, usable without rich."""
    lines: list[tuple[str, str]] = []
    st: dict[str, Any] | None = result.broker_stats
    if st and st.get("source") == "self":
        lines.append(("pages held (guests' own view)", f"{st['logical_pages']:,}"))
        lines.append(("zero pages", f"{st['zero_pages']:,}"))
        lines.append(("memory charged to guests", f"{st['charged_bytes'] / (1 << 20):.1f} MiB"))
        lines.append(("dedup ratio", "needs --admin-token"))
    elif st:
        for key in ("logical_pages", "unique_pages", "zero_pages", "evictions"):
            if isinstance(st.get(key), int):
                lines.append((key.replace("_", " "), f"{st[key]:,}"))
        for key, label in (
            ("capacity_bytes", "capacity"),
            ("used_bytes", "memory used"),
            ("charged_bytes", "memory charged (each page's own size)"),
            ("counted_bytes", "memory counted against capacity"),
        ):
            if isinstance(st.get(key), int):
                lines.append((label, _mib(st[key])))
        if isinstance(st.get("dedup_ratio"), int | float):
            lines.append(("dedup ratio", f"{st['dedup_ratio']:.2f}"))
        if isinstance(st.get("compression_ratio"), int | float):
            lines.append(("compression ratio", f"{st['compression_ratio']:.2f}"))
        if _int(st, "compressed_cold"):
            lines.append(("pages compressed when cold", f"{st['compressed_cold']:,}"))
    lines.append(("guests compress", compress_setup(result)))
    m = result.modelled
    lines += [
        ("broker latency (measured)", f"{m['broker_us_per_page']:.1f} µs/page"),
        ("disk latency (modelled)", f"{m['disk_latency_us']:.0f} µs/page"),
        ("disk time avoided", f"{m['disk_seconds_avoided']:.2f} s"),
        ("broker time paid", f"{m['broker_seconds']:.2f} s"),
        ("time saved", f"{m['seconds_saved']:.2f} s"),
    ]
    return lines


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def compress_setup(result: SimResult) -> str:
    """How the simulated guests compress (the modes in force, from their own ``GET /v1/self``)
    and, for guests the run created, where that mode comes from and their dedup domain."""
    modes = sorted(
        {str(m) for st in result.self_stats.values() if (m := st.get("compress_mode")) is not None}
    )
    text = f"mode {', '.join(modes)}" if modes else "mode unknown"
    d = result.domain
    if d is None:  # guests that existed already, or no admin token: nothing more is known
        return text
    origin = {
        "never": "their own setting",
        "always": "their own setting",
        "pressure": "their domain's",
    }.get(result.config.compress, "inherited")
    trust = "trusted" if d.get("trusted") else "untrusted"
    return f"{text} ({origin}); domain {d.get('name')}, {trust}"


def what_happened(result: SimResult) -> str:
    """One paragraph in plain words: what the guests did and what the broker gave them."""
    t = result.totals
    c = result.config
    hits, misses = _int(t, "tmem_hits"), _int(t, "tmem_misses")
    parts = [
        f"{c.guests} guests with {c.ram_pages * _PAGE >> 20} MiB of RAM each ran the "
        f"'{c.workload}' workload for {c.steps} steps (seed {c.seed}) over "
        f"{c.anon_pages * _PAGE >> 20} MiB of anonymous memory and a page cache of "
        f"{', '.join(result.images)}.",
        f"They took {_int(t, 'faults'):,} page faults; {hits:,} were served by the broker "
        f"({_int(t, 'swap_tmem_hits'):,} from frontswap, {_int(t, 'cache_hits'):,} from "
        f"cleancache) and {misses:,} missed, a hit rate of {_rate(hits, misses)}.",
        (
            f"{_int(t, 'shared_cache_hits'):,} cleancache hits were pages another guest had "
            "put in the shared pool of their image."
            if _int(t, "shared_cache_hits")
            else ""
        ),
        f"The broker spared {_int(t, 'disk_reads_avoided'):,} disk reads and "
        f"{_int(t, 'disk_writes_avoided'):,} swap writes; "
        f"{_int(t, 'disk_reads'):,} reads still went to disk.",
    ]
    declines = t.get("declines")
    if isinstance(declines, dict) and declines:
        parts.append(
            f"It declined {sum(declines.values()):,} puts ({_declines(t)}); declined swap "
            f"pages went to the fallback file."
        )
    if _int(t, "sheds_answered"):
        parts.append(
            f"Guests answered {_int(t, 'sheds_answered')} shed notices, returning "
            f"{_int(t, 'shed_pages_returned'):,} pages."
        )
    st = result.broker_stats
    if st and st.get("source") == "self":
        parts.append(
            f"At the end the guests held {st['logical_pages']:,} pages at the broker, "
            f"{st['charged_bytes'] / (1 << 20):.1f} MiB charged to them (the dedup ratio is "
            "an admin figure)."
        )
    elif (
        st and isinstance(st.get("unique_pages"), int) and isinstance(st.get("logical_pages"), int)
    ):
        parts.append(
            f"At the end it held {st['logical_pages']:,} pages as {st['unique_pages']:,} "
            f"distinct contents plus {st.get('zero_pages', 0):,} zero pages "
            f"(dedup ratio {float(st.get('dedup_ratio', 0.0)):.2f})."
        )
    if st and st.get("source") != "self" and isinstance(st.get("compression_ratio"), int | float):
        parts.append(
            f"Those contents took {_mib(_int(st, 'used_bytes'))} of page storage, a compression "
            f"ratio of {float(st['compression_ratio']):.2f} (guests compress: "
            f"{compress_setup(result)}); {_mib(_int(st, 'charged_bytes'))} was charged to the "
            f"guests page by page and {_mib(_int(st, 'counted_bytes'))} counted against the "
            f"capacity of {_mib(_int(st, 'capacity_bytes'))}."
        )
    m = result.modelled
    saved = m["seconds_saved"]
    outcome = (
        f"{saved:.2f} s of I/O time saved"
        if saved >= 0
        else f"{-saved:.2f} s more than the disk would have taken: at this latency the "
        "broker does not pay for itself on this machine"
    )
    parts.append(
        f"At {m['disk_latency_us']:.0f} µs per disk access against the "
        f"{m['broker_us_per_page']:.1f} µs per page measured at the broker (every call, "
        f"misses included), that is {outcome}."
    )
    bad = _int(t, "corrupt_pages") + _int(t, "swap_lost")
    parts.append(
        "Every page the broker returned matched what the guest had stored."
        if not bad
        else f"WARNING: {bad} pages came back wrong or were lost."
    )
    return " ".join(p for p in parts if p)
