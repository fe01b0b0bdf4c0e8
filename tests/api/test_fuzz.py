"""Arbitrary paths, methods and bodies never get a 5xx (a 5xx is a bug), every 4xx has the
contract's error shape, and a refused request changes nothing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.conftest import ADMIN, Guest, error_code, page, page_url

segment = st.one_of(
    st.integers(min_value=-5, max_value=1 << 200).map(str),
    st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#%"),
        max_size=12,
    ),
    st.sampled_from(["0", "00", "1e3", "0x1", " 1", "4294967296", "4294967295"]),
)
paths = st.one_of(
    st.builds(lambda p, o, i: f"/v1/pools/{p}/objects/{o}/pages/{i}", segment, segment, segment),
    st.builds(lambda p, o: f"/v1/pools/{p}/objects/{o}", segment, segment),
    st.builds(lambda p: f"/v1/pools/{p}/batch", segment),
    st.builds(lambda p: f"/v1/pools/{p}", segment),
    st.builds(
        lambda g, a: f"/v1/guests/{g}/{a}",
        segment,
        st.sampled_from(["freeze", "thaw", "flush", "x"]),
    ),
    st.builds(lambda s: f"/v1/notices/{s}/ack", segment),
    st.sampled_from(
        ["/v1/pools", "/v1/self", "/v1/self/pressure", "/v1/notices", "/v1/shared-auth"]
    ),
)
bodies = st.one_of(
    st.binary(max_size=64),
    st.just(page(7)),
    st.binary(min_size=4096, max_size=4096),
    st.sampled_from([b"{}", b'{"kind": "persistent"}', b"[]", b"null", b'{"pages_returned": -1}']),
)


@pytest.mark.timeout(120)
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(["GET", "PUT", "POST", "DELETE", "PATCH"]),
    path=paths,
    body=bodies,
    as_admin=st.booleans(),
)
def test_no_request_gets_a_5xx(
    client: TestClient,
    guest: Guest,
    make_pool: Callable[..., int],
    method: str,
    path: str,
    body: bytes,
    as_admin: bool,
) -> None:
    gid, headers = guest
    # Each example starts from the same state (earlier examples may have frozen the guest,
    # flushed the page or destroyed the pool): pool 0 holding page(1) at (oid 1, index 0).
    client.post(f"/v1/guests/{gid}/thaw", headers=ADMIN)
    if 0 not in [p["pool_id"] for p in client.get("/v1/self", headers=headers).json()["pools"]]:
        assert make_pool(headers) == 0
    assert client.put(page_url(0, 1, 0), content=page(1), headers=headers).status_code == 204
    r = client.request(method, path, content=body, headers=ADMIN if as_admin else headers)
    assert r.status_code < 500, (method, path, r.text)
    if r.status_code >= 400:
        error_code(r)
    if r.status_code >= 400 and r.status_code != 409:
        # a refused request changed nothing: the page is still there
        assert client.get(page_url(0, 1, 0), headers=headers).content == page(1)
