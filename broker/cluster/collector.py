"""The collector: reclaims content references leaked by crashes, while brokers run.

Why leaks happen. A put takes the content's reference first and writes the handle after; a
handle's removal comes before its reference's drop. A broker (or its link) dying between the
two leaves a reference no handle holds: a content whose count exceeds the handles pointing at
it. It never leaves a handle without its content.

The algorithm (one :meth:`Collector.collect` run):

1. note the server time ``t0``; read every content's header ``(n, t)`` (its reference count
   and the server time of its last change); count the handles pointing at each content ``h``
   by reading every handle map; note the time ``t1``;
2. candidates: contents with ``n > h`` whose last change ``t < t0 - G/2`` (``G``: the grace);
3. wait until the server time passes ``t1 + G/2``;
4. for each candidate, run ``lua.COLLECT``: drop ``n - h`` references only if the header is
   still exactly ``(n, t)`` (atomically on the content's slot).

Why it is safe (no reference still in use is dropped). Two deadlines are enforced by the
scripts themselves, in server time: a handle is written at most ``G/2`` after its take
(``lua.HANDLE`` refuses older takes; the put then fails and is not acknowledged), and a
reference is dropped at most ``G/2`` after its handle went (``lua.DROP`` refuses later drops,
leaving a leak for a later run). Every take and every drop rewrites the header's time. So when
step 4 finds ``(n, t)`` unchanged, with ``t < t0 - G/2``:

* no take happened since ``t``, and the handle of every earlier take was written (or refused)
  before ``t + G/2 < t0``: no handle of this content appeared during the scan, and none will;
* a handle removed before ``t1`` had its drop due by ``t1 + G/2``: its drop was refused (the
  header is unchanged), so that reference is a true leak whether the scan saw the handle or
  not (seen: counted in ``h``, the run leaves one leak for the next run: safe);
* a handle removed after ``t1`` was seen by the scan (none appeared, see above), so it is in
  ``h`` and its pending drop finds the count it expects.

Hence ``n - h`` references are held by nobody and dropping them leaves every handle's content
in place. Two collectors at once are safe too: the second one's check fails once the first
changed ``n``. Assumes the masters' clocks agree to well within ``G/2`` (NTP); ``G`` defaults
to 60 s (``cluster_grace_s``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from broker.cluster.redis_store import HEADER, RedisPages

log = logging.getLogger(__name__)


@dataclass
class CollectReport:
    """What one run saw and did."""

    contents: int = 0
    handles: int = 0
    leaked_refs: int = 0  # references above the handles, among the candidates
    reclaimed_refs: int = 0
    deleted_contents: int = 0
    changed: int = 0  # candidates that changed meanwhile (left for a later run)


class Collector:
    """Scans one namespace of the cluster; :meth:`collect` runs the algorithm once."""

    def __init__(self, pages: RedisPages, sleep: Callable[[float], None] = time.sleep) -> None:
        self.pages = pages
        self.sleep = sleep

    def _masters(self) -> list[Any]:
        rc = self.pages.rc
        rc.nodes_manager.initialize()
        return [rc.get_redis_connection(n) for n in rc.get_primaries()]

    def server_time(self) -> int:
        seconds, _micro = self.pages.rc.time()
        return int(seconds)

    def _scan(self, pattern: bytes) -> Iterator[tuple[Any, list[bytes]]]:
        for node in self._masters():
            cursor = 0
            while True:
                cursor, keys = node.scan(cursor, match=pattern, count=1000)
                if keys:
                    yield node, keys
                if cursor == 0:
                    break

    def contents(self) -> dict[bytes, tuple[int, int]]:
        """Every content of the namespace: name -> (reference count, last change)."""
        out: dict[bytes, tuple[int, int]] = {}
        for node, keys in self._scan(self.pages.ns + b":c{*"):
            pipe = node.pipeline(transaction=False)
            for key in keys:
                pipe.getrange(key, 0, HEADER - 1)
            for key, head in zip(keys, pipe.execute(), strict=True):
                if len(head) == HEADER:
                    out[key] = (int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big"))
        return out

    def handle_counts(self) -> Counter[bytes]:
        """How many handles point at each content (by content name)."""
        counts: Counter[bytes] = Counter()
        name = self.pages.content_name
        for node, keys in self._scan(self.pages.ns + b":{g*}:o:*"):
            pipe = node.pipeline(transaction=False)
            for key in keys:
                pipe.hvals(key)
            for values in pipe.execute():
                for ref in values:
                    if ref:
                        counts[name(ref)] += 1
        return counts

    def collect(self, grace_s: int | None = None) -> CollectReport:
        """One run of the algorithm in the module docstring."""
        half = (self.pages.grace_s if grace_s is None else grace_s) // 2
        report = CollectReport()
        t0 = self.server_time()
        contents = self.contents()
        counts = self.handle_counts()
        t1 = self.server_time()
        report.contents = len(contents)
        report.handles = sum(counts.values())
        candidates = [
            (key, n, t, n - counts.get(key, 0))
            for key, (n, t) in contents.items()
            if n > counts.get(key, 0) and t < t0 - half
        ]
        if not candidates:
            return report
        report.leaked_refs = sum(c[3] for c in candidates)
        while self.server_time() <= t1 + half:
            self.sleep(0.2)
        rc = self.pages.rc
        sha = self.pages.sha["collect"]
        for key, n, t, excess in candidates:
            left = int(rc.evalsha(sha, 2, key, self.pages.count_name(key), n, t, excess))
            if left < 0:
                report.changed += 1
                continue
            report.reclaimed_refs += excess
            if left == 0:
                report.deleted_contents += 1
        return report


class CollectorThread:
    """Runs :meth:`Collector.collect` every ``interval`` seconds in a daemon thread (a run
    sleeps through half the grace: not a job for the event loop). Any broker may run one;
    two at once are safe. ``last`` is the last run's report and ``beat`` its time (for
    ``/readyz`` or the admin views); a failed run is logged and retried next time."""

    def __init__(self, pages: RedisPages, interval: float = 300.0) -> None:
        self.collector = Collector(pages, sleep=self._sleep)
        self.interval = interval
        self.last: CollectReport | None = None
        self.beat = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tmem-collector", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.last = self.collector.collect()
                self.beat = time.time()
            except Exception:
                log.exception("the collector's run failed; retrying in %s s", self.interval)
            self._stop.wait(self.interval)
