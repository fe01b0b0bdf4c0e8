"""Admission of ephemeral puts: hit-rate feedback per guest while memory is tight.

While page storage is above the low watermark (see :mod:`broker.core.eviction`), a guest whose
ephemeral pages are rarely got back has only a fraction of its ephemeral puts admitted:
``max(admission_floor, hit_rate / admission_min_hit_rate)`` (the settings are
:class:`broker.core.pressure.PressureSettings`). The others are declined with ``policy`` and
counted by sub-reason (``low_hit_rate``). Zero pages cost nothing and are always admitted.

Under the ``tinylfu`` ephemeral policy, a put to an object the policy predicts useless (its
pages keep being evicted unread and none was read lately: :meth:`broker.core.policy.TinyLfu.
useless`) is declined first, counted as ``predicted_useless``: storing it would only push out
a page that may be read. And a compressing guest's ephemeral put that compresses poorly, of a
page TinyLFU saw rarely lately, is declined too (``poor_compression``,
:meth:`Admission.too_costly`): zswap rejects every poor compressor; this keeps the ones that
are read again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.core.content import ZERO_PAGE
from broker.core.keys import M32, MIX
from broker.core.pressure import PressureSettings

if TYPE_CHECKING:
    from broker.core.registry import Guest, Pool


# a poorly compressing ephemeral put is kept when TinyLFU saw its page more often than this
# lately, this put included (a get and a put per round trip: 4 is a page on its second round).
# The scoreboard (bench/README.md): 2 or 3 kept too many, 4 and "none" (zswap's rule)
# did alike
POOR_KEPT_ABOVE = 4


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
        self.predicted_useless = 0  # ... by the TinyLFU object prediction
        self.poor_compression = 0  # ... as compressing poorly and seen once lately

    def admit(self, g: Guest, pool: Pool, oid: int, data: bytes, tight: bool) -> bool:
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
        if tinylfu is not None and tinylfu.useless((oid << 24) | pool.ref):
            g.policy_predicted_useless += 1
            self.predicted_useless += 1
            return False
        if gate.admit(settings):
            return True
        g.policy_low_hit_rate += 1
        self.low_hit_rate += 1
        return False

    def too_costly(self, g: Guest, pool: Pool, oid: int, index: int, tight: bool) -> bool:
        """Whether a compressing guest's ephemeral put that compressed poorly (it would take
        a whole page) is declined: while storage is above the low watermark, under TinyLFU,
        unless the page was seen more than :data:`POOR_KEPT_ABOVE` times lately. Its room
        holds two or three pages that compress. Counted as ``poor_compression``."""
        account = pool.account
        if not tight or self.settings is None or account is None or account.tinylfu is None:
            return False
        key = (oid << 56) | pool.lru_tag | ((index + (oid & M32) * MIX) & M32)
        sketch = account.tinylfu.sketch
        if sketch.estimate(key) + 1 > POOR_KEPT_ABOVE:  # + this put
            return False
        sketch.record(key)  # a declined put is demand too (a stored one counts in on_put)
        g.policy_poor_compression += 1
        self.poor_compression += 1
        return True
