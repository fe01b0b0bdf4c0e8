"""Independent figures for a finished run: what the broker must hold, recomputed from the
files on disk and the anonymous-page generator, never from what the broker said."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from guest_agent.sim.images import DEFAULT_IMAGE, ZERO_PAGE, Image, read_file_page
from guest_agent.sim.model import GuestModel, anon_page
from guest_agent.sim.runner import SimConfig


@dataclass
class Expected:
    logical_pages: int
    unique_pages: int
    zero_pages: int


def expected_at_broker(models: Iterable[GuestModel]) -> Expected:
    """Distinct non-zero contents, zero pages and handles the broker should hold."""
    contents: set[bytes] = set()
    zeros = logical = 0
    shared: set[tuple[str, int, int]] = set()  # a shared pool holds a file page once
    for m in models:
        pages: list[bytes] = []
        for p in m.broker_swap_pages():
            pages.append(anon_page(m.seed, m.guest_no, p, m.version[p], m.image))
        for p in m.broker_cache_pages():
            fp = m.image.locate(p - m.spec.anon_pages)
            if m.shared_cache:
                if (m.image.root, fp.file_no, fp.index) in shared:
                    continue
                shared.add((m.image.root, fp.file_no, fp.index))
            pages.append(read_file_page(m.image.files[fp.file_no].path, fp.index))
        for data in pages:
            logical += 1
            if data == ZERO_PAGE:
                zeros += 1
            else:
                contents.add(data)
    return Expected(logical, len(contents), zeros)


def copy_image(dest: Path, *, max_files: int = 120, max_bytes: int = 3 << 20) -> Path:
    """Copy the first files of /usr/lib (sorted walk) into ``dest`` and return it."""
    src = Image.scan(DEFAULT_IMAGE, max_files=max_files, max_bytes=max_bytes)
    for i, f in enumerate(src.files):
        target = dest / f"d{i % 7}" / f"{i:04d}-{Path(f.path).name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f.path, target)
    return dest


def small_config(image: Path, **kw: object) -> SimConfig:
    """A small, fast simulation over ``image`` (4 guests, 40 steps); ``kw`` overrides."""
    base: dict[str, object] = dict(
        guests=4,
        steps=40,
        ram_pages=128,
        anon_pages=400,
        file_pages=600,
        accesses_per_step=64,
        images=[str(image)],
        sample_every=5,
    )
    base.update(kw)
    return SimConfig(**base)  # type: ignore[arg-type]
