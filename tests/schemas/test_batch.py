from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.batch import (
    HEADER,
    MAX_INDEX,
    MAX_OID,
    OP_FLUSH_OBJECT,
    OP_FLUSH_PAGE,
    OP_GET,
    OP_PUT,
    PAGE_SIZE,
    STATUS_DONE,
    STATUS_MISS,
    STATUS_QUOTA,
    BatchError,
    decode_request,
    decode_results,
    encode_gets,
    encode_request,
    encode_results,
    join_oid,
    split_oid,
)

oids = st.integers(min_value=0, max_value=MAX_OID)
indexes = st.integers(min_value=0, max_value=MAX_INDEX)


@given(oids)
def test_oid_words_round_trip(oid: int) -> None:
    hi, mid, lo = split_oid(oid)
    assert all(0 <= w < 2**64 for w in (hi, mid, lo))
    assert join_oid(hi, mid, lo) == oid


@given(
    st.lists(
        st.tuples(
            st.sampled_from([OP_PUT, OP_GET, OP_FLUSH_PAGE, OP_FLUSH_OBJECT]),
            oids,
            indexes,
            st.binary(min_size=1, max_size=1),
        ),
        max_size=20,
    )
)
def test_request_round_trip(raw: list[tuple[int, int, int, bytes]]) -> None:
    ops = [(op, oid, idx, fill * PAGE_SIZE if op == OP_PUT else None) for op, oid, idx, fill in raw]
    body = encode_request(ops)
    decoded = decode_request(body, max_ops=1024)
    assert [
        (op, oid, idx, bytes(pg) if pg is not None else None) for op, oid, idx, pg in decoded
    ] == ops


def test_oid_words_are_big_endian_most_significant_first() -> None:
    body = encode_request([(OP_GET, (1 << 128) | (2 << 64) | 3, 7, None)])
    assert body == HEADER.pack(OP_GET, 1, 2, 3, 7)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (HEADER.pack(9, 0, 0, 0, 0), "unknown op"),
        (HEADER.pack(OP_PUT, 0, 0, 0, 0) + b"x" * 100, "truncated page"),
        (HEADER.pack(OP_GET, 0, 0, 0, 0)[:-1], "truncated operation header"),
        (HEADER.pack(OP_GET, 0, 0, 0, 0) * 3, "more than 2"),
    ],
)
def test_malformed_requests_are_refused_whole(body: bytes, message: str) -> None:
    with pytest.raises(BatchError, match=message):
        decode_request(body, max_ops=2)


def test_results_round_trip() -> None:
    page = b"\x07" * PAGE_SIZE
    body = encode_results(
        [(STATUS_DONE, None), (STATUS_DONE, page), (STATUS_MISS, None), (STATUS_QUOTA, None)]
    )
    got = decode_results(body, [OP_PUT, OP_GET, OP_GET, OP_PUT])
    assert [(r.status, r.page) for r in got] == [
        (STATUS_DONE, None),
        (STATUS_DONE, page),
        (STATUS_MISS, None),
        (STATUS_QUOTA, None),
    ]
    with pytest.raises(BatchError):
        decode_results(body[:-1], [OP_PUT, OP_GET, OP_GET, OP_PUT])


@pytest.mark.parametrize("gets_before", [0, 1, 28])
def test_puts_whose_length_looks_like_headers_only_decode_exactly(gets_before: int) -> None:
    # 29 puts make a body whose length is a multiple of the header's (the put-free fast path
    # looks at such bodies first): every op must still come back as sent
    page = bytes(range(256)) * 16
    ops = [(OP_GET, 5, i, None) for i in range(gets_before)]
    ops += [(OP_PUT, (1 << 130) + i, i, page) for i in range(29)]
    body = encode_request(ops)
    assert len(body) % 29 == 0
    got = decode_request(body, 1024)
    assert [(op, oid, index, None if p is None else bytes(p)) for op, oid, index, p in got] == ops


def test_a_put_free_batch_over_the_limit_is_refused() -> None:
    body = encode_request([(OP_GET, 1, i, None) for i in range(5)])
    assert len(decode_request(body, 5)) == 5
    with pytest.raises(BatchError, match="more than 4"):
        decode_request(body, 4)


@given(st.lists(st.tuples(oids, indexes), max_size=40))
def test_encode_gets_is_encode_request_of_gets(handles: list[tuple[int, int]]) -> None:
    assert bytes(encode_gets(handles)) == encode_request([(OP_GET, o, i, None) for o, i in handles])


@pytest.mark.parametrize("bad", [(-1, 0), (MAX_OID + 1, 0), (1, -1), (1, MAX_INDEX + 1)])
def test_encode_gets_refuses_handles_out_of_range(bad: tuple[int, int]) -> None:
    with pytest.raises(BatchError, match="out of range"):
        encode_gets([(1, 1), bad])
