"""SIGKILL a real broker during concurrent persistent puts and flushes, five times in a row
(every other time with its journal writer).

After every restart each handle must read exactly as its last acknowledged operation left it:
the page bytes of an acknowledged put, a miss after an acknowledged flush. A handle whose last
operation was in flight when the broker died may read as before or after that operation.
"""

from __future__ import annotations

import http.client
import random
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from schemas.batch import (
    BATCH_CONTENT_TYPE,
    OP_FLUSH_PAGE,
    OP_GET,
    OP_PUT,
    STATUS_DONE,
    STATUS_MISS,
    decode_results,
    encode_request,
)
from tests.e2e.brokerproc import BrokerProcess

pytestmark = pytest.mark.timeout(600)

WORKERS = 4
OBJECTS = 24
INDEXES = 8
ROUNDS = 5

Handle = tuple[int, int]  # (oid, index)


def make_page(worker: int, handle: Handle, version: int) -> bytes:
    # Unique per (worker, handle, version): a stale or foreign page cannot pass for the right one.
    return struct.pack(">QQQQ", worker, handle[0], handle[1], version) * 128


@dataclass
class Model:
    """What one worker knows: the acknowledged state of each handle, and for handles whose
    last operation got no answer, the state that operation would have left."""

    acked: dict[Handle, bytes | None] = field(default_factory=dict)
    in_flight: dict[Handle, bytes | None] = field(default_factory=dict)


class Worker(threading.Thread):
    def __init__(self, n: int, port: int, token: str, pool: int, model: Model, seed: int) -> None:
        super().__init__(daemon=True)
        self.n = n
        self.port = port
        self.token = token
        self.pool = pool
        self.model = model
        self.rng = random.Random(seed)
        self.version = seed * 1_000_000
        self.acked_ops = 0
        self.error: BaseException | None = None

    def handles(self) -> list[Handle]:
        return [(self.n * 1000 + o, i) for o in range(OBJECTS) for i in range(INDEXES)]

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            while True:
                self.step(conn)
        except (OSError, http.client.HTTPException):
            return  # the broker died: the in-flight operation stays undecided
        except BaseException as exc:
            self.error = exc
        finally:
            conn.close()

    def step(self, conn: http.client.HTTPConnection) -> None:
        rng = self.rng
        handles = self.handles()
        auth = {"Authorization": f"Bearer {self.token}"}
        roll = rng.random()
        if roll < 0.55:
            # A batch of puts and flushes; sometimes a put and then a flush of the same handle.
            # One in three is puts only, of distinct handles: the broker journals those before
            # its core applies them (``put_ahead``).
            ops: list[tuple[int, int, int, bytes | None]] = []
            after: dict[Handle, bytes | None] = {}
            puts_only = rng.random() < 0.33
            for h in rng.sample(handles, rng.randint(4, 64)):
                if puts_only or rng.random() < 0.75:
                    self.version += 1
                    page = make_page(self.n, h, self.version)
                    ops.append((OP_PUT, h[0], h[1], page))
                    after[h] = page
                    if not puts_only and rng.random() < 0.15:
                        ops.append((OP_FLUSH_PAGE, h[0], h[1], None))
                        after[h] = None
                else:
                    ops.append((OP_FLUSH_PAGE, h[0], h[1], None))
                    after[h] = None
            self.model.in_flight = dict(after)
            conn.request(
                "POST",
                f"/v1/pools/{self.pool}/batch",
                body=encode_request(ops),
                headers={**auth, "Content-Type": BATCH_CONTENT_TYPE},
            )
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, (resp.status, body[:300])
            results = decode_results(body, [op[0] for op in ops])
            assert all(r.status == STATUS_DONE for r in results), results
        elif roll < 0.8:
            h = rng.choice(handles)
            self.version += 1
            page = make_page(self.n, h, self.version)
            self.model.in_flight = {h: page}
            conn.request(
                "PUT",
                f"/v1/pools/{self.pool}/objects/{h[0]}/pages/{h[1]}",
                body=page,
                headers={**auth, "Content-Type": "application/octet-stream"},
            )
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 204, (resp.status, body[:300])
            after = {h: page}
        elif roll < 0.95:
            h = rng.choice(handles)
            self.model.in_flight = {h: None}
            conn.request(
                "DELETE", f"/v1/pools/{self.pool}/objects/{h[0]}/pages/{h[1]}", headers=auth
            )
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 204, resp.status
            after = {h: None}
        else:
            oid = self.n * 1000 + rng.randrange(OBJECTS)
            after = {(oid, i): None for i in range(INDEXES)}
            self.model.in_flight = dict(after)
            conn.request("DELETE", f"/v1/pools/{self.pool}/objects/{oid}", headers=auth)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 204, resp.status
        # Acknowledged: this is now what must survive.
        self.model.acked.update(after)
        self.model.in_flight = {}
        self.acked_ops += 1


def read_all(
    broker: BrokerProcess, token: str, pool: int, handles: list[Handle]
) -> dict[Handle, bytes | None]:
    out: dict[Handle, bytes | None] = {}
    for start in range(0, len(handles), 500):
        part = handles[start : start + 500]
        ops = [(OP_GET, oid, index, None) for oid, index in part]
        status, body = broker.call(
            "POST",
            f"/v1/pools/{pool}/batch",
            encode_request(ops),
            token=token,
            content_type=BATCH_CONTENT_TYPE,
        )
        assert status == 200, (status, body[:300])
        for h, r in zip(part, decode_results(body, [OP_GET] * len(ops)), strict=True):
            assert r.status in (STATUS_DONE, STATUS_MISS)
            out[h] = r.page
    return out


def test_acknowledged_pages_survive_sigkill_five_times(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "data", durability="sync")
    broker.start()
    try:
        _, token = broker.new_guest("crash-victim")
        pool = broker.new_pool(token, "persistent")
        models = [Model() for _ in range(WORKERS)]
        rng = random.Random(20261127)
        total_acked = 0
        for round_no in range(ROUNDS):
            workers = [
                Worker(w, broker.port, token, pool, models[w], seed=round_no * 100 + w + 1)
                for w in range(WORKERS)
            ]
            for w in workers:
                w.start()
            # Let traffic build up (some acknowledged operations from every worker), then crash.
            deadline = time.monotonic() + 60
            while min(w.acked_ops for w in workers) < 5 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.2, 0.8))
            # Every other round the journal's writer dies too, before it could commit its log
            # to LMDB: the next start must replay the log.
            broker.kill(children=round_no % 2 == 1)
            for w in workers:
                w.join(timeout=60)
                assert not w.is_alive()
                assert w.error is None, w.error
            total_acked += sum(w.acked_ops for w in workers)
            assert all(w.acked_ops >= 5 for w in workers)

            broker.start()
            for n, model in enumerate(models):
                handles = [(n * 1000 + o, i) for o in range(OBJECTS) for i in range(INDEXES)]
                seen = read_all(broker, token, pool, handles)
                for h in handles:
                    acked = model.acked.get(h)
                    got = seen[h]
                    if h in model.in_flight:
                        assert got in (acked, model.in_flight[h]), (round_no, n, h)
                    elif acked is None:
                        assert got is None, f"round {round_no}: flushed page {h} came back"
                    else:
                        assert got == acked, (
                            f"round {round_no}: acknowledged page {h} lost or stale"
                        )
                    model.acked[h] = got  # what the broker holds now is the new baseline
                model.in_flight = {}
        stored = sum(v is not None for m in models for v in m.acked.values())
        assert total_acked >= ROUNDS * WORKERS * 5
        assert stored > 0
        print(
            f"{ROUNDS} SIGKILLs survived: {total_acked} acknowledged operations, {stored} pages held"
        )
    finally:
        broker.kill()
