"""Workloads: deterministic streams of page accesses for one simulated guest.

A guest's page space is numbered ``0 .. anon_pages-1`` for anonymous memory followed by
``anon_pages .. anon_pages+file_pages-1`` for the pages of its OS image. A workload yields,
for every step, a list of ``(page, write)`` accesses; only anonymous pages are ever written
(the image is mounted read-only). Every random choice comes from a :class:`random.Random`
seeded with :func:`derive_seed`, so a workload is a pure function of its seed.

    wl = make_workload("mix", PageSpace(4096, 16384), seed=7, accesses_per_step=256)
    for step in range(100):
        accesses = wl.step(step)

Names: ``hotcold`` (zipf over a fixed random ranking of pages), ``scan`` (sequential sweeps,
as ``cat`` or a table scan), ``phases`` (hot/cold whose hot set moves every ``phase_steps``
steps) and ``mix`` (all three interleaved).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import WorkloadError

Access = tuple[int, bool]
WORKLOADS = ("hotcold", "scan", "phases", "mix")


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any parts, stable across processes (unlike ``hash``)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big")


@dataclass(frozen=True, slots=True)
class PageSpace:
    """The pages a guest can touch: anonymous pages first, then image (file) pages."""

    anon_pages: int
    file_pages: int

    @property
    def total(self) -> int:
        return self.anon_pages + self.file_pages

    def is_anon(self, page: int) -> bool:
        return page < self.anon_pages


class Workload(Protocol):
    """Anything that yields the accesses of a step."""

    name: str

    def step(self, step_no: int) -> list[Access]: ...


def _zipf_cum_weights(n: int, skew: float) -> list[float]:
    return list(itertools.accumulate(1.0 / (rank**skew) for rank in range(1, n + 1)))


class HotCold:
    """Zipf-distributed accesses over a fixed random ranking of the whole page space."""

    name = "hotcold"

    def __init__(
        self,
        space: PageSpace,
        *,
        seed: int,
        accesses_per_step: int,
        write_fraction: float = 0.3,
        skew: float = 1.0,
    ) -> None:
        self.space = space
        self.k = accesses_per_step
        self.write_fraction = write_fraction
        self._rng = random.Random(derive_seed(seed, "hotcold"))
        self._ranking = list(range(space.total))
        self._rng.shuffle(self._ranking)
        self._cum = _zipf_cum_weights(space.total, skew)

    def step(self, step_no: int) -> list[Access]:
        rng = self._rng
        pages = rng.choices(self._ranking, cum_weights=self._cum, k=self.k)
        anon = self.space.anon_pages
        wf = self.write_fraction
        return [(p, p < anon and rng.random() < wf) for p in pages]


class Scan:
    """Sequential sweeps over the whole page space, wrapping around; anon pages are written
    with ``write_fraction`` (an array being updated in place)."""

    name = "scan"

    def __init__(
        self,
        space: PageSpace,
        *,
        seed: int,
        accesses_per_step: int,
        write_fraction: float = 0.3,
    ) -> None:
        self.space = space
        self.k = accesses_per_step
        self.write_fraction = write_fraction
        self._rng = random.Random(derive_seed(seed, "scan"))
        self._cursor = self._rng.randrange(space.total)

    def step(self, step_no: int) -> list[Access]:
        total = self.space.total
        anon = self.space.anon_pages
        rng = self._rng
        wf = self.write_fraction
        start = self._cursor
        self._cursor = (start + self.k) % total
        pages = [(start + i) % total for i in range(self.k)]
        return [(p, p < anon and rng.random() < wf) for p in pages]


class Phases:
    """Hot/cold accesses whose ranking is redrawn every ``phase_steps`` steps, as a program
    moving from one stage to the next."""

    name = "phases"

    def __init__(
        self,
        space: PageSpace,
        *,
        seed: int,
        accesses_per_step: int,
        write_fraction: float = 0.3,
        skew: float = 1.0,
        phase_steps: int = 50,
    ) -> None:
        if phase_steps < 1:
            raise WorkloadError("phase_steps must be at least 1")
        self.space = space
        self.k = accesses_per_step
        self.write_fraction = write_fraction
        self.phase_steps = phase_steps
        self._seed = seed
        self._rng = random.Random(derive_seed(seed, "phases"))
        self._cum = _zipf_cum_weights(space.total, skew)
        self._phase = -1
        self._ranking: list[int] = []

    def step(self, step_no: int) -> list[Access]:
        phase = step_no // self.phase_steps
        if phase != self._phase:
            self._phase = phase
            self._ranking = list(range(self.space.total))
            random.Random(derive_seed(self._seed, "phase", phase)).shuffle(self._ranking)
        rng = self._rng
        anon = self.space.anon_pages
        wf = self.write_fraction
        pages = rng.choices(self._ranking, cum_weights=self._cum, k=self.k)
        return [(p, p < anon and rng.random() < wf) for p in pages]


class Mix:
    """Half hot/cold, a quarter scan, a quarter phases, interleaved in a seeded order."""

    name = "mix"

    def __init__(self, parts: Sequence[Workload], *, seed: int) -> None:
        self.parts = list(parts)
        self._rng = random.Random(derive_seed(seed, "mix"))

    def step(self, step_no: int) -> list[Access]:
        out: list[Access] = []
        for part in self.parts:
            out.extend(part.step(step_no))
        self._rng.shuffle(out)
        return out


def make_workload(
    name: str,
    space: PageSpace,
    *,
    seed: int,
    accesses_per_step: int,
    write_fraction: float = 0.3,
    skew: float = 1.0,
    phase_steps: int = 50,
) -> Workload:
    """Build a workload by name (one of :data:`WORKLOADS`)."""
    if space.total < 1 or accesses_per_step < 1:
        raise WorkloadError("a workload needs at least one page and one access per step")
    if not 0.0 <= write_fraction <= 1.0:
        raise WorkloadError("write_fraction must be between 0 and 1")
    k = accesses_per_step
    if name == "hotcold":
        return HotCold(
            space, seed=seed, accesses_per_step=k, write_fraction=write_fraction, skew=skew
        )
    if name == "scan":
        return Scan(space, seed=seed, accesses_per_step=k, write_fraction=write_fraction)
    if name == "phases":
        return Phases(
            space,
            seed=seed,
            accesses_per_step=k,
            write_fraction=write_fraction,
            skew=skew,
            phase_steps=phase_steps,
        )
    if name == "mix":
        half = max(1, k // 2)
        quarter = max(1, k // 4)
        rest = max(1, k - half - quarter)
        parts: list[Workload] = [
            HotCold(
                space, seed=seed, accesses_per_step=half, write_fraction=write_fraction, skew=skew
            ),
            Scan(space, seed=seed, accesses_per_step=quarter, write_fraction=write_fraction),
            Phases(
                space,
                seed=seed,
                accesses_per_step=rest,
                write_fraction=write_fraction,
                skew=skew,
                phase_steps=phase_steps,
            ),
        ]
        return Mix(parts, seed=seed)
    raise WorkloadError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
