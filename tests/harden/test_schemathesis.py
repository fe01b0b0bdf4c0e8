"""Schemathesis against the broker's own ``/openapi.json``, on a real broker process.

Every operation of the document is fuzzed with the token of its side (admin or guest) and with
the other side's token: no answer may be a 5xx, and every answer must match what the document
says of that operation (status code, content type, headers, body schema). The run is bounded by
``MAX_EXAMPLES`` per operation (env ``TMEM_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from broker.app import create_app
from broker.settings import Settings
from tests.e2e.brokerproc import ADMIN, BrokerProcess

MAX_EXAMPLES = int(os.environ.get("TMEM_FUZZ_EXAMPLES", "50"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@dataclass
class World:
    """The broker under fuzz, and a guest with pools 0 (persistent) and 1 (ephemeral) that is
    made again whenever a fuzzed admin call deleted it."""

    broker: BrokerProcess
    token: str = ""
    answers: dict[int, int] = field(default_factory=dict)

    def guest_headers(self) -> dict[str, str]:
        status, _ = self.broker.call("GET", "/v1/self", token=self.token or None)
        if status != 200:
            _, self.token = self.broker.new_guest(f"fuzz-{len(self.answers)}-{os.urandom(4).hex()}")
            self.broker.new_pool(self.token, "persistent")
            self.broker.new_pool(self.token, "ephemeral")
            self.broker.call("PUT", "/v1/pools/0/objects/1/pages/0", b"\1" * 4096, token=self.token)
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    data: Path = tmp_path_factory.mktemp("fuzz") / "data"
    with BrokerProcess(data, capacity="64MiB") as broker:
        yield World(broker)


def _document() -> dict[str, Any]:
    # The app's own document, built without starting it (create_app touches nothing on disk);
    # test_the_process_serves_this_document checks the real process serves the same one.
    app = create_app(Settings(data_dir=Path("/nonexistent"), admin_token="unused-" * 4))
    doc: dict[str, Any] = app.openapi()
    return doc


DOCUMENT = _document()
# The batch and the export stream are raw bytes on the wire, like a page.
schemathesis.serializer.alias(
    ["application/x-tmem-batch", "application/x-tmem-export"], "application/octet-stream"
)
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_the_process_serves_this_document(world: World) -> None:
    status, body = world.broker.call("GET", "/openapi.json", token=None)
    assert status == 200
    assert json.loads(body) == DOCUMENT


def _side(case: Any) -> str:
    tags = case.operation.definition.raw.get("tags", [])
    return "guest" if ("guest" in tags or "pages" in tags) else "admin"


@pytest.mark.timeout(300)
@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_matches_the_document(case: Any, world: World) -> None:
    if case.query and "wait" in case.query:
        case.query["wait"] = 0  # a long-poll would only make the run slow
    guest = world.guest_headers()
    admin = {"Authorization": f"Bearer {ADMIN}"}
    own, other = (guest, admin) if _side(case) == "guest" else (admin, guest)
    for headers in (own, other):
        response = case.call(base_url=world.broker.url, headers=headers)
        world.answers[response.status_code] = world.answers.get(response.status_code, 0) + 1
        case.validate_response(response, checks=CHECKS, headers=headers)


def test_the_fuzz_reached_both_success_and_refusal(world: World) -> None:
    # Runs after the fuzz (file order): a fuzz that only ever got 401s would prove nothing.
    print("fuzz answers by status:", dict(sorted(world.answers.items())))
    assert sum(world.answers.values()) > 0
    assert any(200 <= s < 300 for s in world.answers)
    assert {401, 403} & set(world.answers) and {400, 404, 422} & set(world.answers)
    assert not any(s >= 500 for s in world.answers)
