"""``--plot FILE.png``: hit rate, broker memory and dedup ratio over the run (matplotlib, Agg).

write_plot(result, "sim.png")
"""

from __future__ import annotations

import os

from .runner import SimResult


def write_plot(result: SimResult, path: str | os.PathLike[str]) -> None:
    """Draw three stacked panels against the step number and save them as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a host or in CI
    import matplotlib.pyplot as plt

    steps = [s.step for s in result.timeline]
    hit = [100.0 * s.hit_rate for s in result.timeline]
    mem = [
        s.used_bytes / (1 << 20) if s.used_bytes is not None else float("nan")
        for s in result.timeline
    ]
    dedup = [s.dedup_ratio if s.dedup_ratio is not None else float("nan") for s in result.timeline]

    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    c = result.config
    fig.suptitle(f"{c.guests} simulated guests, workload '{c.workload}', seed {c.seed}")
    axes[0].plot(steps, hit, color="tab:green")
    axes[0].set_ylabel("tmem hit rate (%)")
    axes[0].set_ylim(0, 100)
    axes[1].plot(steps, mem, color="tab:blue")
    own = (result.broker_stats or {}).get("source") == "self"
    axes[1].set_ylabel("memory charged (MiB)" if own else "broker memory (MiB)")
    axes[1].set_ylim(bottom=0)
    axes[2].plot(steps, dedup, color="tab:purple")
    axes[2].set_ylabel("dedup ratio")
    axes[2].set_xlabel("step")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    if all(s.dedup_ratio is None for s in result.timeline):
        axes[2].set_yticks([])
        axes[2].text(
            0.5, 0.5, "dedup ratio needs the admin token", ha="center", transform=axes[2].transAxes
        )
    if all(s.used_bytes is None for s in result.timeline):
        axes[1].text(
            0.5,
            0.5,
            "no broker stats (give --admin-token)",
            ha="center",
            transform=axes[1].transAxes,
        )
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
