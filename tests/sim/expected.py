"""Independent figures for a finished run: what the broker must hold, recomputed from the
files on disk and the anonymous-page generator, never from what the broker said."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from guest_agent.sim.images import ZERO_PAGE, read_file_page
from guest_agent.sim.model import GuestModel, anon_page


@dataclass
class Expected:
    logical_pages: int
    unique_pages: int
    zero_pages: int


def expected_at_broker(models: Iterable[GuestModel]) -> Expected:
    """Distinct non-zero contents, zero pages and handles the broker should hold."""
    contents: set[bytes] = set()
    zeros = logical = 0
    for m in models:
        pages: list[bytes] = []
        for p in m.broker_swap_pages():
            pages.append(anon_page(m.seed, m.guest_no, p, m.version[p], m.image))
        for p in m.broker_cache_pages():
            fp = m.image.locate(p - m.spec.anon_pages)
            pages.append(read_file_page(m.image.files[fp.file_no].path, fp.index))
        for data in pages:
            logical += 1
            if data == ZERO_PAGE:
                zeros += 1
            else:
                contents.add(data)
    return Expected(logical, len(contents), zeros)
