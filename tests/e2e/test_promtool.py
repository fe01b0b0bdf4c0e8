"""A live broker's ``/metrics`` passes ``promtool check metrics`` (Prometheus's own linter:
counters end in ``_total``, every family has help text, units are base units, ...)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.batch import BATCH_CONTENT_TYPE, OP_GET, OP_PUT, encode_request
from tests.e2e.brokerproc import BrokerProcess

PROMTOOL = shutil.which("promtool")

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        PROMTOOL is None, reason="promtool is not installed (make system-deps: prometheus)"
    ),
]

SHARED = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"


def _page(tag: int) -> bytes:
    return tag.to_bytes(8, "little") * 512


def test_promtool_finds_no_problem_in_a_live_brokers_metrics(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    with BrokerProcess(tmp_path / "data", durability="none", capacity="64MiB") as broker:
        for name in ("vm1", "vm2"):
            gid, token = broker.new_guest(name)
            broker.json(
                "POST",
                "/v1/shared-auth",
                {"uuid": SHARED, "guest_id": gid, "allow": True},
                expect=204,
            )
            pool = broker.new_pool(token)
            broker.new_pool(token, "ephemeral", shared=True, uuid=SHARED)
            for i in range(8):
                url = f"/v1/pools/{pool}/objects/1/pages/{i}"
                assert broker.call("PUT", url, _page(i % 3), token=token)[0] == 204
                assert broker.call("GET", url, token=token)[0] == 200
            assert broker.call("GET", f"/v1/pools/{pool}/objects/2/pages/0", token=token)[0] == 404
            batch = encode_request([(OP_PUT, 3, 0, _page(9)), (OP_GET, 3, 0, None)])
            status, _ = broker.call(
                "POST",
                f"/v1/pools/{pool}/batch",
                batch,
                token=token,
                content_type=BATCH_CONTENT_TYPE,
            )
            assert status == 200
        assert broker.call("PATCH", "/v1/guests/2", {"cap_pages": 4})[0] == 200
        public_status, public = broker.call("GET", "/metrics", token=None)
        status, body = broker.call("GET", "/metrics")  # the admin token's: every figure
    assert status == public_status == 200
    text = body.decode()
    for exposition in (body, public):
        checked = subprocess.run(
            [PROMTOOL, "check", "metrics"],
            input=exposition,
            capture_output=True,
            timeout=60,
            check=False,
        )
        problems = (checked.stdout + checked.stderr).decode()
        assert checked.returncode == 0 and not problems.strip(), problems
    assert b"tmem_unique_pages " in body and b"tmem_unique_pages" not in public
    # what was checked is the real thing: the guests' traffic is in it
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert values[("tmem_guests", ())] == 2
    assert values[("tmem_puts_total", ())] == 18
    assert values[("tmem_guest_cap_pages", (("guest_id", "2"),))] == 4
    timed = ("tmem_request_duration_seconds_count", (("family", "guest_pages"),))
    assert values[timed] == 2 * 17


def test_promtool_would_say_so() -> None:
    """The check above means something: promtool flags what the naming rules forbid."""
    assert PROMTOOL is not None
    bad = b"# HELP tmem_puts puts\n# TYPE tmem_puts counter\ntmem_puts 1\n"
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=bad, capture_output=True, timeout=60, check=False
    )
    assert checked.returncode != 0 and b"_total" in checked.stdout + checked.stderr
