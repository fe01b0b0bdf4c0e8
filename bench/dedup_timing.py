"""The dedup timing channel: how much longer (or shorter) a put takes when its content is
already held by *another* guest, in process (the core alone) and over HTTP (a real broker).

The probe is the one a CAIN-style attacker would run: put a guessed content, time it, flush it,
repeat. When a victim in the same dedup domain holds that content, the put is a dedup hit
(digest lookup finds it, byte compare, reference count) and the flush only drops a reference;
otherwise the put stores a new copy and the flush frees it. Samples of the two cases are
interleaved so drift on this busy machine hits both alike. A third case puts the attacker in
another dedup domain: there the victim's contents are never found, which is how the broker
closes the channel between guests that must not learn about each other.

For each case it prints the median and the 10th/90th percentiles of the put latency; for each
``held`` case, the difference of medians from the same attacker's ``unique`` case and ``n95``: about how many probe pairs an attacker needs to tell the
two cases apart with ~95 % confidence (from the difference of means and the spread of trimmed
samples). Run: ``.venv/bin/python -m bench.dedup_timing [--samples 20000] [--http-samples 3000]``.
Not a test: it never fails on a time.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import broker_process
from bench.http_bench import RawClient
from broker.core import CoreConfig, Tmem

PAGE = 4096


def figures(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    n = len(ordered)
    return {
        "p10": ordered[n // 10],
        "p50": ordered[n // 2],
        "p90": ordered[(9 * n) // 10],
    }


def trimmed(samples: list[float]) -> list[float]:
    ordered = sorted(samples)
    n = len(ordered)
    return ordered[n // 20 : n - n // 20]  # drop the slowest and fastest 5 % (scheduling noise)


def probes_needed(a: list[float], b: list[float]) -> float:
    """Probe pairs for a ~95 % decision: n = ((1.96 + 1.64) * sigma / delta)^2 * 2."""
    ta, tb = trimmed(a), trimmed(b)
    delta = abs(statistics.fmean(ta) - statistics.fmean(tb))
    sigma = max(statistics.pstdev(ta), statistics.pstdev(tb))
    if delta == 0:
        return float("inf")
    return 2 * ((1.96 + 1.64) * sigma / delta) ** 2


def report(title: str, unit: str, scale: float, cases: dict[str, list[float]]) -> None:
    """Each ``held ...`` case against the ``unique ...`` case of the same attacker: what that
    attacker can compare."""
    print(f"\n{title}")
    for name, samples in cases.items():
        f = {k: v * scale for k, v in figures(samples).items()}
        line = f"  {name:<22} p10 {f['p10']:8.2f}  p50 {f['p50']:8.2f}  p90 {f['p90']:8.2f} {unit}"
        if name.startswith("held"):
            base = cases[name.replace("held", "unique", 1)]
            diff = (figures(samples)["p50"] - figures(base)["p50"]) * scale
            n95 = probes_needed(samples, base)
            line += f"   p50 - unique {diff:+7.2f} {unit}   n95 {n95:10.0f}"
        print(line)


def interleave(n: int, probes: dict[str, Callable[[int], float]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in probes}
    names = list(probes)
    rng = random.Random(1)
    for i in range(n):
        rng.shuffle(names)
        for name in names:
            out[name].append(probes[name](i))
    return out


def in_process(samples: int) -> None:
    rng = random.Random(7)
    tmem = Tmem(CoreConfig(capacity_bytes=1 << 30))
    tmem.add_guest(1, name="victim")
    tmem.add_guest(2, name="attacker")
    tmem.add_guest(3, name="attacker-elsewhere", dedup_domain="elsewhere")
    victim = tmem.create_pool(1, "persistent")
    pools = {2: tmem.create_pool(2, "persistent"), 3: tmem.create_pool(3, "persistent")}
    held = [rng.randbytes(PAGE) for _ in range(1024)]
    for i, page in enumerate(held):
        tmem.put(1, victim, 0, i, page)
    # as many fresh contents as held ones: both cases touch as much memory (cache effects)
    fresh = [rng.randbytes(PAGE) for _ in range(len(held))]
    clock = time.perf_counter_ns

    def probe(guest: int, pages: list[bytes]) -> Callable[[int], float]:
        pool = pools[guest]

        def one(i: int) -> float:
            page = pages[i % len(pages)]
            t = clock()
            tmem.put(guest, pool, 1, 0, page)
            took = clock() - t
            tmem.flush_page(guest, pool, 1, 0)
            return float(took)

        return one

    probes = {
        "unique, same domain": probe(2, fresh),
        "held, same domain": probe(2, held),
        "unique, other domain": probe(3, fresh),
        "held, other domain": probe(3, held),
    }
    interleave(2000, probes)  # warm-up
    cases = interleave(samples, probes)
    report(f"in process (core put), {samples} samples per case", "µs", 1e-3, cases)


def over_http(samples: int) -> None:
    rng = random.Random(8)
    with tempfile.TemporaryDirectory() as tmp, broker_process(Path(tmp), durability="none") as b:
        tokens = {}
        for name, domain in (("victim", "default"), ("attacker", "default"), ("elsewhere", "x")):
            body = {"name": name, "dedup_domain": domain}
            tokens[name] = str(b.json("POST", "/v1/guests", body, expect=201)["token"])
            b.new_pool(tokens[name])
        held = [rng.randbytes(PAGE) for _ in range(512)]
        victim = RawClient("127.0.0.1", b.port, tokens["victim"])
        for i, page in enumerate(held):
            assert victim.request(b"PUT", b"/v1/pools/0/objects/0/pages/%d" % i, page)[0] == 204
        fresh = [rng.randbytes(PAGE) for _ in range(len(held))]
        clients = {
            "attacker": RawClient("127.0.0.1", b.port, tokens["attacker"]),
            "elsewhere": RawClient("127.0.0.1", b.port, tokens["elsewhere"]),
        }

        def probe(who: str, pages: list[bytes]) -> Callable[[int], float]:
            client = clients[who]
            path = b"/v1/pools/0/objects/1/pages/0"

            def one(i: int) -> float:
                t = time.perf_counter_ns()
                status, _ = client.request(b"PUT", path, pages[i % len(pages)])
                took = time.perf_counter_ns() - t
                assert status == 204
                client.request(b"DELETE", path)
                return float(took)

            return one

        probes = {
            "unique, same domain": probe("attacker", fresh),
            "held, same domain": probe("attacker", held),
            "unique, other domain": probe("elsewhere", fresh),
            "held, other domain": probe("elsewhere", held),
        }
        interleave(300, probes)
        cases = interleave(samples, probes)
        report(
            f"over HTTP (PUT on a keep-alive connection), {samples} samples per case",
            "µs",
            1e-3,
            cases,
        )
        for c in (victim, *clients.values()):
            c.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--http-samples", type=int, default=3000)
    args = parser.parse_args()
    print("dedup timing channel (this machine is shared: figures are noisy)")
    in_process(args.samples)
    over_http(args.http_samples)


if __name__ == "__main__":
    main()
