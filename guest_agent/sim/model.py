"""The simulated guest: RAM frames, anonymous memory, a page cache, and what a kernel does on
a fault or an eviction, expressed against a small :class:`GuestBackend` interface.

Pure and deterministic: a :class:`GuestModel` never looks at the clock and never starts a
thread. Each :meth:`GuestModel.step` takes the accesses of one step and turns them into at most
five batched backend calls, in an order that can never read a page before it is written:

1. ``swap_load`` of faulted anonymous pages that have a swap copy, ``cache_get`` of faulted
   file pages (cleancache is asked before the file is read, as Linux does);
2. ``swap_store`` of evicted dirty anonymous pages (frontswap; a declined page goes to the
   fallback swap file), ``cache_put`` of evicted file pages (cleancache);
3. ``swap_invalidate`` of the broker copies of pages written during the step.

Victims are taken from the cold end of an LRU among pages not touched in the step, so the
pages loaded, stored and invalidated in one step are always different pages.

Anonymous page contents are a pure function of ``(seed, guest, page, version)`` (see
:func:`anon_page`): a seeded mix of zero pages, small structured records, copies of image
pages (as a process holds after reading a file) and random bytes. Version 0 of the zero,
structured and file-copy kinds is the same in every guest running the same image (the same
program starting the same way); every write makes the page guest-specific.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from schemas.batch import PAGE_SIZE

from .errors import WorkloadError
from .images import ZERO_PAGE, Image
from .workloads import Access, PageSpace, derive_seed

SwapSource = str
"""Where a swap load was served from: ``"tmem"``, ``"disk"`` (the fallback swap file) or
``"miss"`` (the page was nowhere: a bug in the broker or the agent, reported as such)."""

KIND_ZERO = "zero"
KIND_PATTERN = "pattern"
KIND_FILECOPY = "filecopy"
KIND_RANDOM = "random"

# Shares of each kind of anonymous page, in percent; zero pages are the most common kind in
# real guests, random (compressed, encrypted) data the least shareable.
DEFAULT_ANON_MIX: tuple[tuple[str, int], ...] = (
    (KIND_ZERO, 30),
    (KIND_PATTERN, 25),
    (KIND_FILECOPY, 20),
    (KIND_RANDOM, 25),
)


class GuestBackend(Protocol):
    """What a simulated guest needs from the agent, one batch per call.

    Implemented by :class:`guest_agent.sim.backends.AgentBackend` (the real Frontswap and
    Cleancache shims against a broker) and :class:`guest_agent.sim.backends.MemoryBackend` (an
    in-memory twin for unit tests). Offsets are frontswap offsets (one per anonymous page);
    cache keys are ``(inode, index)`` in the guest's cleancache filesystem.
    """

    def swap_store(self, items: Sequence[tuple[int, bytes]]) -> list[str | None]:
        """Store pages; per page ``None`` if the broker took it, else the decline reason (the
        page then went to the fallback swap file)."""
        ...

    def swap_load(self, offsets: Sequence[int]) -> list[tuple[SwapSource, bytes | None]]:
        """Load pages; per page where it came from and its bytes."""
        ...

    def swap_invalidate(self, offsets: Sequence[int]) -> None:
        """Forget the swap copies of these offsets (the guest rewrote the pages)."""
        ...

    def swap_at_broker(self, offsets: Sequence[int]) -> list[bool]:
        """Per offset, whether the broker (not the fallback file) holds its swap copy; asked
        after a shed moved pages to the fallback behind the guest's back."""
        ...

    def cache_put(self, items: Sequence[tuple[int, int, bytes]]) -> list[str | None]:
        """Offer clean file pages; per page ``None`` when stored, else the decline reason."""
        ...

    def cache_get(self, keys: Sequence[tuple[int, int]]) -> list[bytes | None]:
        """Ask for file pages; per page the bytes on a hit, ``None`` on a miss."""
        ...


def anon_kind(seed: int, page: int, mix: Sequence[tuple[str, int]] = DEFAULT_ANON_MIX) -> str:
    """The kind of anonymous page ``page``: the same in every guest of a run."""
    total = sum(w for _, w in mix)
    u = derive_seed(seed, "kind", page) % total
    for kind, weight in mix:
        if u < weight:
            return kind
        u -= weight
    return mix[-1][0]


def _pattern_page(key: int) -> bytes:
    # 256 records of 16 bytes, as an array of small structs: a pointer-like u64 growing by a
    # fixed stride, then a u32 counter and a u32 tag. Compressible, rarely equal across keys.
    base = (key & 0xFFFF_FFFF_F000) | 0x7F00_0000_0000
    stride = 16 << (key % 5)
    tag = (key >> 48) & 0xFFFF_FFFF
    words = array("Q")
    for i in range(256):
        words.append(base + i * stride)
        words.append((tag << 32) | i)
    return words.tobytes()


def _random_page(key: int) -> bytes:
    return hashlib.shake_128(key.to_bytes(8, "big")).digest(PAGE_SIZE)


def anon_page(
    seed: int,
    guest: int,
    page: int,
    version: int,
    image: Image,
    mix: Sequence[tuple[str, int]] = DEFAULT_ANON_MIX,
) -> bytes:
    """The contents of anonymous page ``page`` of guest ``guest`` after ``version`` writes.

    Pure: the same arguments give the same bytes in any process. ``image`` supplies the file
    pages that file-copy pages copy.
    """
    kind = anon_kind(seed, page, mix)
    if kind == KIND_RANDOM:
        return _random_page(derive_seed(seed, "random", guest, page, version))
    if version == 0:
        if kind == KIND_ZERO:
            return ZERO_PAGE
        if kind == KIND_PATTERN:
            return _pattern_page(derive_seed(seed, "pattern", page))
        src = derive_seed(seed, "copy", page) % image.total_pages
        return image.read_page(image.locate(src))
    if kind == KIND_FILECOPY:
        # A process patched a few words of a copied file page (relocations, a header).
        src = derive_seed(seed, "copy", page) % image.total_pages
        data = bytearray(image.read_page(image.locate(src)))
        patch = derive_seed(seed, "patch", guest, page, version)
        off = (patch % (PAGE_SIZE // 64)) * 64
        data[off : off + 16] = patch.to_bytes(8, "big") + version.to_bytes(8, "big")
        return bytes(data)
    # A written zero or structured page holds guest-specific records.
    return _pattern_page(derive_seed(seed, "pattern", guest, page, version))


@dataclass
class GuestCounters:
    """Everything counted about one guest; integers only, so two runs compare exactly."""

    steps: int = 0
    accesses: int = 0
    ram_hits: int = 0
    faults: int = 0
    first_touch: int = 0
    swap_ins: int = 0
    swap_tmem_hits: int = 0
    swap_disk_reads: int = 0
    swap_lost: int = 0
    cache_gets: int = 0
    cache_hits: int = 0
    shared_cache_hits: int = 0
    cache_misses: int = 0
    file_disk_reads: int = 0
    swap_puts: int = 0
    swap_stored: int = 0
    swap_disk_writes: int = 0
    swap_invalidates: int = 0
    cache_puts: int = 0
    cache_stored: int = 0
    evictions: int = 0
    clean_evictions: int = 0
    corrupt_pages: int = 0
    sheds_answered: int = 0
    shed_pages_returned: int = 0
    pressure_reports: int = 0
    declines: dict[str, int] = field(default_factory=dict)

    @property
    def tmem_hits(self) -> int:
        return self.swap_tmem_hits + self.cache_hits

    @property
    def tmem_misses(self) -> int:
        return self.cache_misses + self.swap_lost

    @property
    def disk_reads(self) -> int:
        return self.swap_disk_reads + self.file_disk_reads

    @property
    def disk_reads_avoided(self) -> int:
        return self.tmem_hits

    @property
    def disk_writes_avoided(self) -> int:
        return self.swap_stored

    def as_dict(self) -> dict[str, object]:
        """All counters plus the derived figures, for JSON."""
        out: dict[str, object] = {
            k: (dict(sorted(v.items())) if isinstance(v, dict) else v)
            for k, v in self.__dict__.items()
        }
        out.update(
            tmem_hits=self.tmem_hits,
            tmem_misses=self.tmem_misses,
            disk_reads=self.disk_reads,
            disk_reads_avoided=self.disk_reads_avoided,
            disk_writes_avoided=self.disk_writes_avoided,
        )
        return out


@dataclass(frozen=True, slots=True)
class GuestSpec:
    """Sizes of one simulated guest, in pages."""

    ram_pages: int
    anon_pages: int
    file_pages: int


class GuestModel:
    """One simulated guest's memory. Drive it with :meth:`step`; read :attr:`counters`.

    ``verify`` compares every page a backend returns with the bytes the model expects and
    counts mismatches in ``counters.corrupt_pages`` (the broker must never return stale data).
    """

    def __init__(
        self,
        guest_no: int,
        spec: GuestSpec,
        image: Image,
        backend: GuestBackend,
        *,
        seed: int,
        verify: bool = True,
        pressure_window: int = 10,
        shared_cache: bool = False,
    ) -> None:
        if spec.ram_pages < 1:
            raise WorkloadError("a guest needs at least one RAM frame")
        if spec.file_pages > image.total_pages:
            raise WorkloadError(
                f"guest wants {spec.file_pages} file pages; the image has {image.total_pages}"
            )
        self.guest_no = guest_no
        self.spec = spec
        self.space = PageSpace(spec.anon_pages, spec.file_pages)
        self.image = image
        self.backend = backend
        self.seed = seed
        self.verify = verify
        # A shared cleancache pool: gets are not exclusive and other guests fill it too.
        self.shared_cache = shared_cache
        self.counters = GuestCounters()
        # page -> None, least recently used first
        self.resident: OrderedDict[int, None] = OrderedDict()
        # anon page -> number of writes so far; absent = never touched
        self.version: dict[int, int] = {}
        # anon pages whose current contents have a swap copy: True at the broker, False on disk
        self.swapped: dict[int, bool] = {}
        # file pages the guest believes cleancache holds (the broker may have dropped some)
        self.cached: set[int] = set()
        self._window: deque[tuple[int, int, int]] = deque(maxlen=pressure_window)

    # -- contents -------------------------------------------------------------------------

    def anon_contents(self, page: int) -> bytes:
        """Current bytes of anonymous page ``page`` (must have been touched)."""
        return anon_page(self.seed, self.guest_no, page, self.version[page], self.image)

    def file_key(self, page: int) -> tuple[int, int]:
        """The cleancache ``(inode, index)`` of file page ``page`` of the page space."""
        fp = self.image.locate(page - self.spec.anon_pages)
        return fp.file_no, fp.index

    def file_contents(self, page: int) -> bytes:
        """The bytes of file page ``page``, read from the image file now."""
        return self.image.read_page(self.image.locate(page - self.spec.anon_pages))

    # -- the step -------------------------------------------------------------------------

    def step(self, accesses: Sequence[Access]) -> None:
        """Apply one step of accesses: faults, evictions, writes, with batched backend calls."""
        c = self.counters
        c.steps += 1
        c.accesses += len(accesses)
        anon = self.spec.anon_pages
        resident = self.resident
        touched = list(dict.fromkeys(p for p, _ in accesses))
        if len(touched) > self.spec.ram_pages:
            raise WorkloadError(
                f"a step touches {len(touched)} pages but the guest has {self.spec.ram_pages} frames"
            )
        faults: list[int] = []
        for p in touched:
            if p in resident:
                resident.move_to_end(p)
            else:
                faults.append(p)
        c.ram_hits += len(accesses) - len(faults)
        c.faults += len(faults)

        victims = self._pick_victims(len(resident) + len(faults) - self.spec.ram_pages, touched)
        self._fault_in(faults, anon)
        self._evict(victims, anon)
        for p in faults:
            resident[p] = None
        self._writes(accesses)
        self._window.append((len(accesses), len(faults), c.disk_reads))

    def _pick_victims(self, need: int, touched: list[int]) -> list[int]:
        if need <= 0:
            return []
        pinned = set(touched)
        victims: list[int] = []
        for p in self.resident:
            if p not in pinned:
                victims.append(p)
                if len(victims) == need:
                    break
        return victims

    def _fault_in(self, faults: list[int], anon: int) -> None:
        c = self.counters
        swap_in: list[int] = []
        file_in: list[int] = []
        for p in faults:
            if p < anon:
                if p in self.swapped:
                    swap_in.append(p)
                else:
                    # First touch: the kernel hands out a fresh page, no I/O.
                    self.version[p] = 0
                    c.first_touch += 1
            else:
                file_in.append(p)
        if swap_in:
            c.swap_ins += len(swap_in)
            loaded = self.backend.swap_load(swap_in)
            for p, (source, data) in zip(swap_in, loaded, strict=True):
                if source == "tmem":
                    c.swap_tmem_hits += 1
                elif source == "disk":
                    c.swap_disk_reads += 1
                    self.swapped[p] = False
                else:
                    c.swap_lost += 1
                if self.verify and data != self.anon_contents(p):
                    c.corrupt_pages += 1
        if file_in:
            keys = [self.file_key(p) for p in file_in]
            c.cache_gets += len(keys)
            got = self.backend.cache_get(keys)
            for p, data in zip(file_in, got, strict=True):
                if data is None:
                    self.cached.discard(p)
                    c.cache_misses += 1
                    c.file_disk_reads += 1
                    self.file_contents(p)  # the read a real guest would do
                    continue
                c.cache_hits += 1
                if p not in self.cached:
                    c.shared_cache_hits += 1  # another guest put it there
                if not self.shared_cache:
                    # A private cleancache hit is exclusive: the page has left the broker.
                    self.cached.discard(p)
                if self.verify and data != self.file_contents(p):
                    c.corrupt_pages += 1

    def _evict(self, victims: list[int], anon: int) -> None:
        c = self.counters
        c.evictions += len(victims)
        stores: list[tuple[int, bytes]] = []
        puts: list[tuple[int, int, bytes]] = []
        put_pages: list[int] = []
        for p in victims:
            del self.resident[p]
            if p < anon:
                if p in self.swapped:
                    c.clean_evictions += 1  # swap copy still valid: drop the frame
                else:
                    stores.append((p, self.anon_contents(p)))
            else:
                inode, index = self.file_key(p)
                puts.append((inode, index, self.file_contents(p)))
                put_pages.append(p)
        if stores:
            c.swap_puts += len(stores)
            results = self.backend.swap_store(stores)
            for (p, _), reason in zip(stores, results, strict=True):
                if reason is None:
                    c.swap_stored += 1
                    self.swapped[p] = True
                else:
                    c.swap_disk_writes += 1
                    self._decline(reason)
                    self.swapped[p] = False
        if puts:
            c.cache_puts += len(puts)
            results = self.backend.cache_put(puts)
            for p, reason in zip(put_pages, results, strict=True):
                if reason is None:
                    c.cache_stored += 1
                    self.cached.add(p)
                else:
                    self._decline(reason)
                    self.cached.discard(p)

    def _decline(self, reason: str) -> None:
        d = self.counters.declines
        d[reason] = d.get(reason, 0) + 1

    def _writes(self, accesses: Sequence[Access]) -> None:
        anon = self.spec.anon_pages
        invalidate: list[int] = []
        for p, write in accesses:
            if not write or p >= anon:
                continue
            self.version[p] += 1
            where = self.swapped.pop(p, None)
            if where:
                invalidate.append(p)
        if invalidate:
            self.counters.swap_invalidates += len(invalidate)
            self.backend.swap_invalidate(invalidate)

    # -- what the guest tells the broker --------------------------------------------------

    def pressure(self) -> dict[str, float | int]:
        """The guest's own view of its memory pressure (the body of ``POST /v1/self/pressure``).

        PSI is modelled from the recent window: ``some`` is the share of accesses that faulted,
        ``full`` the share that waited for a disk read; available memory is free frames plus
        clean page cache, as the kernel's MemAvailable counts it.
        """
        window = list(self._window)
        accesses = sum(a for a, _, _ in window) or 1
        faults = sum(f for _, f, _ in window)
        disk = window[-1][2] - window[0][2] if len(window) > 1 else 0
        anon = self.spec.anon_pages
        clean_cache = sum(1 for p in self.resident if p >= anon)
        free = self.spec.ram_pages - len(self.resident)
        return {
            "psi_some_avg10": round(min(100.0, 100.0 * faults / accesses), 2),
            "psi_full_avg10": round(min(100.0, 100.0 * disk / accesses), 2),
            "mem_available_bytes": (free + clean_cache) * PAGE_SIZE,
            "swap_used_bytes": len(self.swapped) * PAGE_SIZE,
        }

    def resync_swap(self) -> int:
        """After a shed: learn which swap copies the agent moved to the fallback file; returns
        how many the guest believed were at the broker and are not."""
        at_broker = [p for p, b in self.swapped.items() if b]
        if not at_broker:
            return 0
        moved = 0
        for p, still in zip(at_broker, self.backend.swap_at_broker(at_broker), strict=True):
            if not still:
                self.swapped[p] = False
                moved += 1
        return moved

    # -- what the broker should hold ------------------------------------------------------

    def broker_swap_pages(self) -> list[int]:
        """Anonymous pages the guest believes are stored in frontswap at the broker."""
        return sorted(p for p, at_broker in self.swapped.items() if at_broker)

    def broker_cache_pages(self) -> list[int]:
        """File pages the guest believes are held in cleancache at the broker."""
        return sorted(self.cached)
