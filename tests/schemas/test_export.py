"""The export stream codec: round trips, and every kind of corruption refused."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.export import (
    MAGIC,
    ExportDecoder,
    ExportEncoder,
    ExportError,
    ExportGuest,
    ExportHeader,
    ExportPage,
    ExportPool,
    ExportTrailer,
    decode_export,
    encode_export,
)

pytestmark = pytest.mark.timeout(120)

HEADER = ExportHeader(
    guest=ExportGuest(
        name="vm-1", weight=200, cap_pages=1000, dedup_domain="tenant-a", compress=True
    ),
    pools=[ExportPool(pool_id=0), ExportPool(pool_id=3, exclusive_gets=True)],
    source={"broker": "http://127.0.0.1:1", "guest_id": 7},
)


def page(n: int) -> bytes:
    return n.to_bytes(8, "big") * 512


PAGES = [
    (0, 0, 0, page(1)),
    (0, (1 << 192) - 1, (1 << 32) - 1, page(2)),
    (3, 5, 1, bytes(4096)),
    (3, 5, 2, page(3)),
]


def stream(
    pages: list[tuple[int, int, int, bytes]] = PAGES, header: ExportHeader = HEADER
) -> bytes:
    return b"".join(encode_export(header, pages))


def decode_in_chunks(data: bytes, cuts: list[int]) -> tuple[list[object], ExportTrailer]:
    dec = ExportDecoder()
    items: list[object] = []
    last = 0
    for cut in sorted(cuts):
        items += dec.feed(data[last:cut])
        last = cut
    items += dec.feed(data[last:])
    return items, dec.finish()


def test_round_trip() -> None:
    header, pages, trailer = decode_export(stream())
    assert header == HEADER
    assert pages == [ExportPage(*p) for p in PAGES]
    assert trailer == ExportTrailer(pages=4, zero_pages=1)


def test_zero_pages_carry_no_bytes() -> None:
    with_zero = stream([(0, 1, 1, bytes(4096))])
    with_data = stream([(0, 1, 1, page(1))])
    assert len(with_data) - len(with_zero) == 4096


def test_empty_guest_round_trips() -> None:
    header, pages, trailer = decode_export(
        stream([], ExportHeader(guest=ExportGuest(name="x"), pools=[]))
    )
    assert header.guest.name == "x" and pages == [] and trailer == ExportTrailer(0, 0)


_pages = st.lists(
    st.tuples(
        st.sampled_from([0, 3]),
        st.integers(0, (1 << 192) - 1),
        st.integers(0, (1 << 32) - 1),
        st.one_of(st.just(bytes(4096)), st.binary(min_size=8, max_size=8).map(lambda b: b * 512)),
    ),
    max_size=12,
)


@settings(max_examples=100, deadline=None)
@given(pages=_pages, cuts=st.lists(st.integers(0, 70_000), max_size=8))
def test_round_trip_in_any_chunking(
    pages: list[tuple[int, int, int, bytes]], cuts: list[int]
) -> None:
    data = stream(pages)
    items, trailer = decode_in_chunks(data, [c % (len(data) + 1) for c in cuts])
    assert items[0] == HEADER
    assert items[1:-1] == [ExportPage(*p) for p in pages]
    assert (
        items[-1] == trailer == ExportTrailer(len(pages), sum(p[3] == bytes(4096) for p in pages))
    )


def refused(data: bytes, cuts: list[int] | None = None) -> bool:
    try:
        decode_in_chunks(data, cuts or [])
    except ExportError:
        return True
    return False


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_flipped_byte_is_refused(data: st.DataObject) -> None:
    good = stream()
    pos = data.draw(st.integers(0, len(good) - 1))
    xor = data.draw(st.integers(1, 255))
    bad = bytearray(good)
    bad[pos] ^= xor
    cuts = data.draw(st.lists(st.integers(0, len(good)), max_size=4))
    assert refused(bytes(bad), cuts)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_truncation_is_refused(data: st.DataObject) -> None:
    good = stream()
    cut = data.draw(st.integers(0, len(good) - 1))
    assert refused(good[:cut])


@settings(max_examples=100, deadline=None)
@given(extra=st.binary(min_size=1, max_size=64))
def test_bytes_after_the_trailer_are_refused(extra: bytes) -> None:
    assert refused(stream() + extra)
    dec = ExportDecoder()
    dec.feed(stream())
    with pytest.raises(ExportError, match="after the trailer"):
        dec.feed(extra)


@settings(max_examples=200, deadline=None)
@given(junk=st.binary(max_size=5000))
def test_arbitrary_bytes_never_crash_the_decoder(junk: bytes) -> None:
    # Anything that is not a well-formed stream ends in ExportError, never another exception.
    assert refused(junk)
    assert refused(MAGIC + junk)


def test_dropped_page_record_is_refused() -> None:
    enc = ExportEncoder()
    parts = [enc.header(HEADER), *(enc.page(*p) for p in PAGES), enc.trailer()]
    del parts[2]
    with pytest.raises(ExportError, match=r"checksum|counts"):
        decode_export(b"".join(parts))


def test_swapped_page_records_are_refused() -> None:
    enc = ExportEncoder()
    parts = [enc.header(HEADER), *(enc.page(*p) for p in PAGES), enc.trailer()]
    parts[1], parts[2] = parts[2], parts[1]
    with pytest.raises(ExportError, match="whole-stream checksum"):
        decode_export(b"".join(parts))


def test_page_of_undeclared_pool_is_refused() -> None:
    enc = ExportEncoder()
    head = enc.header(HEADER)
    other = ExportEncoder()
    other.header(HEADER.model_copy(update={"pools": [ExportPool(pool_id=9)]}))
    rogue = other.page(9, 1, 1, page(1))
    with pytest.raises(ExportError, match="does not declare"):
        ExportDecoder().feed(head + rogue)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"XXXXXXXX" + b[8:], "bad magic"),
        (lambda b: b[:8] + b"\x00\x02" + b[10:], "version 2"),
        (lambda b: b[:10] + b"\x7f\xff\xff\xff" + b[14:], "too large"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b"", "truncated"),
    ],
)
def test_refusals_say_why(mutate: object, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        decode_export(mutate(stream()))  # type: ignore[operator]


def header_frame(body: bytes) -> bytes:
    head = (1).to_bytes(2, "big") + len(body).to_bytes(4, "big")
    return MAGIC + head + body + zlib.crc32(head + body).to_bytes(4, "big")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"guest": {"name": "a"}, "pools": [{"pool_id": 1}, {"pool_id": 1}]}', "pool twice"),
        (b'{"guest": {"name": ""}, "pools": []}', "invalid export header"),
        (b'{"guest": {"name": "a"}, "pools": [], "evil": 1}', "invalid export header"),
        (b'{"guest": {"name": "a"}, "pools": [{"pool_id": 70000}]}', "invalid export header"),
        (b"not json", "invalid export header"),
    ],
)
def test_invalid_header_json_is_refused(body: bytes, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        ExportDecoder().feed(header_frame(body))


def test_a_well_formed_header_frame_is_accepted() -> None:
    items = ExportDecoder().feed(header_frame(b'{"guest": {"name": "a"}, "pools": []}'))
    assert items == [ExportHeader(guest=ExportGuest(name="a"), pools=[])]


def test_encoder_refuses_bad_input() -> None:
    enc = ExportEncoder()
    with pytest.raises(ExportError, match="before header"):
        enc.page(0, 0, 0, page(1))
    enc.header(HEADER)
    with pytest.raises(ExportError, match="not in the header"):
        enc.page(1, 0, 0, page(1))
    with pytest.raises(ExportError, match="out of range"):
        enc.page(0, 1 << 192, 0, page(1))
    with pytest.raises(ExportError, match="exactly 4096"):
        enc.page(0, 0, 0, b"short")
