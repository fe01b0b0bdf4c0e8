"""The one error handler: every class of the core's and the shell's trees answers with its own
status and code in the contract's shape; a journal failure is a 503 and acknowledges nothing."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from broker.api import errors as api_errors
from broker.api.errors import ApiError, error_response
from broker.app import service_of
from broker.core import errors as core_errors
from broker.core.errors import TmemError
from broker.store.errors import JournalFailed
from tests.api.conftest import Guest, error_code, page, page_url


def _subclasses(base: type[Exception]) -> list[type[Exception]]:
    out: list[type[Exception]] = []
    stack = [base]
    while stack:
        cls = stack.pop()
        out.append(cls)
        stack.extend(cls.__subclasses__())
    return out


CLASSES = [
    c
    for c in _subclasses(TmemError) + _subclasses(ApiError)
    if c.__module__ in (core_errors.__name__, api_errors.__name__)
    and c not in (TmemError, ApiError, api_errors.NotHome)
]


def test_not_home_is_a_redirect_to_the_home() -> None:
    url = "http://10.0.0.2:8470/v1/pools/0/batch"
    response = error_response(api_errors.NotHome(url, "b2"))
    assert response.status_code == 307
    assert response.headers["location"] == url
    assert json.loads(bytes(response.body))["error"]["code"] == "not_home"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_error_class_maps_to_its_status_and_code(cls: type[Exception]) -> None:
    status: int = cls.status  # type: ignore[attr-defined]
    code: str = cls.code  # type: ignore[attr-defined]
    assert 400 <= status < 500
    response = error_response(cls("what went wrong"))
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert json.loads(bytes(response.body)) == {
        "error": {"code": code, "message": "what went wrong"}
    }


def test_trees_are_covered() -> None:
    names = {c.__name__ for c in CLASSES}
    assert {"BadPageSize", "BadHandle", "UnknownGuest", "UnknownPool", "NotAuthorised"} <= names
    assert {"TooManyPools", "GuestExists", "Conflict", "BadRequest"} <= names
    assert {
        "BadJson",
        "BadBatch",
        "Unauthorised",
        "Forbidden",
        "UnknownNotice",
        "BodyTooLarge",
    } <= names


class _FailingJournal:
    """A journal whose commits fail, as on a full or broken disk."""

    pending = True

    async def barrier(self) -> None:
        raise JournalFailed("disk full")


def test_journal_failure_is_503_and_not_acknowledged(
    client: TestClient, guest: Guest, make_pool: Callable[..., int]
) -> None:
    _, headers = guest
    pool = make_pool(headers)
    service = service_of(client.app)
    real = service.journal
    service.journal = _FailingJournal()
    try:
        r = client.put(page_url(pool, 1, 0), content=page(1), headers=headers)
        assert (r.status_code, error_code(r)) == (503, "journal_unavailable")
        r = client.post(f"/v1/pools/{pool}/batch", content=b"", headers=headers)
        assert r.status_code == 503
    finally:
        service.journal = real
