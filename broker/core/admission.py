"""Admission of ephemeral puts: hit-rate feedback per guest while memory is tight.

While page storage is above the low watermark (see :mod:`broker.core.eviction`), a guest whose
ephemeral pages are rarely got back has only a fraction of its ephemeral puts admitted:
``max(admission_floor, hit_rate / admission_min_hit_rate)`` (the settings are
:class:`broker.core.pressure.PressureSettings`). The others are declined with ``policy`` and
counted by sub-reason (``low_hit_rate``). Zero pages cost nothing and are always admitted.

Under the ``tinylfu`` ephemeral policy, while memory is tight, two predictions come first,
both counted as ``predicted_useless``: a put to an object whose pages keep being evicted
unread and none was read lately (:meth:`broker.core.policy.TinyLfu.useless`), and a put of a
page on its first round trip (TinyLFU saw it fewer than :data:`FIRST_ROUND_TRIP` times
lately: a scan's pages are never seen again). And every put of a compressing guest that
compresses poorly is declined (``poor_compression``, :meth:`Admission.too_costly`), as zswap
rejects it: per byte held, its room is worth more to two or three pages that compress.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.core.content import ZERO_PAGE
from broker.core.keys import M32, MIX
from broker.core.policy import TINYLFU
from broker.core.pressure import PressureSettings

if TYPE_CHECKING:
    from broker.core.registry import Guest, Pool


# Under TinyLFU, while memory is tight, a put of a page seen fewer times than this lately
# (the sketch counts each put and get: a get that missed and this put make 2) is declined.
# A page is stored from its second round trip on. Scoreboard (bench/README.md "Policy
# scoreboard", one seed, faults per MiB against zswap-like, scan-heavy / mix / 8-guests):
# off +1.9 / +0.9 / +1.1 %, 1 (a no-op here: every put follows a get) +14.4 / -0.6 / ..,
# 2 +38.4 / +14.2 / +8.4 %; its price: a working set that moves while memory is tight waits
# one more round trip (shifting at half the capacity: 2.1 % over zswap-like without, -4.7 %
# with it). Made adaptive (off while the first trips it saw came back within a quarter of the
# account's pages in puts) it was a trade, not a win: half capacity shifting -8.8 -> -6.7 %,
# scan-heavy +15.6 -> +14.4 %, full capacity mix +12.4 -> +8.7 % (bench/README.md).
FIRST_ROUND_TRIP = 2


class AdmissionGate:
    """Hit-rate feedback for one guest's ephemeral puts (zcache wanted "high quality" pages).

    ``puts`` and ``hits`` are decayed counts over roughly the last ``window`` ephemeral puts.
    :meth:`admit` is deterministic: a credit accumulator admits exactly the fraction the hit
    rate earns, so two runs with the same operations make the same decisions.
    """

    __slots__ = ("credit", "hits", "puts")

    def __init__(self) -> None:
        self.puts = 0.0
        self.hits = 0.0
        self.credit = 0.0

    def record_put(self, window: int) -> None:
        """Count an ephemeral put (every one, admitted or not)."""
        self.puts += 1.0
        if self.puts > window:
            # Halve both counts: an exponential window with O(1) work per put.
            self.puts *= 0.5
            self.hits *= 0.5

    def record_hit(self) -> None:
        """Count an ephemeral get that found its page."""
        self.hits += 1.0

    def hit_rate(self) -> float:
        return self.hits / self.puts if self.puts else 1.0

    def admit_fraction(self, settings: PressureSettings) -> float:
        if self.puts < settings.admission_min_samples or settings.admission_min_hit_rate <= 0:
            return 1.0
        rate = self.hit_rate()
        if rate >= settings.admission_min_hit_rate:
            return 1.0
        return max(settings.admission_floor, rate / settings.admission_min_hit_rate)

    def admit(self, settings: PressureSettings) -> bool:
        fraction = self.admit_fraction(settings)
        if fraction >= 1.0:
            return True
        self.credit += fraction
        if self.credit >= 1.0:
            self.credit -= 1.0
            return True
        return False


class Admission:
    """The broker's admission policy: off until :attr:`settings` is set (pressure hooks)."""

    __slots__ = ("low_hit_rate", "poor_compression", "predicted_useless", "settings")

    def __init__(self) -> None:
        self.settings: PressureSettings | None = None
        self.low_hit_rate = 0  # ephemeral puts declined by a gate
        self.predicted_useless = 0  # ... by the TinyLFU predictions (object, first trip)
        self.poor_compression = 0  # ... as compressing poorly (TinyLFU)

    def admit(self, g: Guest, pool: Pool, oid: int, index: int, data: bytes, tight: bool) -> bool:
        """Whether the guest's ephemeral put of ``data`` to object ``oid`` of ``pool`` is
        admitted; ``tight``: storage is above the low watermark (only then may it say no)."""
        settings = self.settings
        assert settings is not None
        gate = g.gate
        gate.record_put(settings.admission_window)
        if not tight or data == ZERO_PAGE:
            return True
        account = pool.account
        tinylfu = None if account is None else account.tinylfu
        if tinylfu is not None:
            if tinylfu.useless((oid << 24) | pool.ref):
                g.policy_predicted_useless += 1
                self.predicted_useless += 1
                return False
            key = (oid << 56) | pool.lru_tag | ((index + (oid & M32) * MIX) & M32)
            sketch = tinylfu.sketch
            if sketch.estimate(key) < FIRST_ROUND_TRIP:
                sketch.record(key)  # a declined put is demand too (a stored one: on_put)
                g.policy_predicted_useless += 1
                self.predicted_useless += 1
                return False
        if gate.admit(settings):
            return True
        g.policy_low_hit_rate += 1
        self.low_hit_rate += 1
        return False

    def too_costly(self, g: Guest) -> bool:
        """Whether a compressing guest's put that compressed poorly (it would take a whole
        page) is declined: always under TinyLFU, persistent (frontswap) puts too, as zswap
        rejects poor compressors; the guest keeps such a page in its own swap (a declined put
        is not acknowledged: nothing is lost). Counted as ``poor_compression``.

        Scoreboard (one seed, faults per MiB against zswap-like, shifting / scan-heavy / mix):
        ephemeral ones declined only while tight and unless seen more than 4 times lately,
        persistent ones kept: -13.1 / -1.5 / -3.8 %; persistent ones declined too: -12.4 /
        -2.0 / -4.0 % (their room went to poor ephemeral pages); ephemeral ones always too:
        -3.4 / +1.9 / +0.9 %; without the "seen more than 4 times" exception: -0.4 %
        (shifting). With the first-round-trip rule: persistent ones declined only while
        tight -5.4 / +29.5 / +12.8 %, always -0.8 / +38.4 / +14.2 %."""
        settings = self.settings
        if settings is None or settings.ephemeral_policy != TINYLFU:
            return False
        g.policy_poor_compression += 1
        self.poor_compression += 1
        return True
