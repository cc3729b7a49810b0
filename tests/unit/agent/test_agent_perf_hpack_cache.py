"""agent.http2.CachingDecoder decodes exactly like hpack's Decoder, whatever the dynamic table does."""

from __future__ import annotations

import pytest
from hpack import Decoder, Encoder
from hpack.exceptions import HPACKError
from hypothesis import given, settings
from hypothesis import strategies as st
from nodemesh.agent.http2 import CachingDecoder

INDEXED_62 = bytes([0x80 | 62])  # "the newest dynamic table entry": same bytes, meaning follows the table


def test_same_block_follows_the_dynamic_table() -> None:
    enc, dec = Encoder(), CachingDecoder()
    assert dec.decode(enc.encode([("x-a", "1")])) == [("x-a", "1")]  # literal with indexing: inserts
    assert dec.decode(INDEXED_62) == [("x-a", "1")]
    assert dec.decode(INDEXED_62) == [("x-a", "1")]                   # served from the cache
    assert dec.decode(enc.encode([("x-b", "2")])) == [("x-b", "2")]  # a new newest entry
    assert dec.decode(INDEXED_62) == [("x-b", "2")]                   # not the stale cached answer


def test_table_size_update_and_allowed_size_invalidate() -> None:
    enc, dec = Encoder(), CachingDecoder()
    dec.decode(enc.encode([("x-a", "1")]))
    assert dec.decode(INDEXED_62) == [("x-a", "1")]
    dec.decode(bytes([0x20]))  # dynamic table size update to 0: the table is emptied
    with pytest.raises(HPACKError):  # an index past the (now empty) table
        dec.decode(INDEXED_62)
    dec2 = CachingDecoder()
    dec2.decode(Encoder().encode([("x-c", "3")]))
    assert dec2.decode(INDEXED_62) == [("x-c", "3")]
    dec2.max_allowed_table_size = 0  # the peer shrank it: the next block must be checked again
    with pytest.raises(HPACKError):  # table larger than allowed, no size update seen
        dec2.decode(INDEXED_62)


def test_returned_lists_are_not_shared() -> None:
    enc, dec = Encoder(), CachingDecoder()
    block = enc.encode([(":status", "200")])
    first = dec.decode(block)
    first.append(("mutated", "yes"))
    assert dec.decode(block) == [(":status", "200")]


names = st.sampled_from([":path", ":authority", "content-type", "grpc-status", "x-id", "te"])
values = st.sampled_from(["/a", "/b", "svc:80", "application/grpc", "0", "13", "trailers", "v" * 40])
blocks = st.lists(st.lists(st.tuples(names, values), min_size=1, max_size=5), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(blocks=blocks, table_size=st.sampled_from([0, 64, 256, 4096]), repeat=st.integers(1, 3))
def test_matches_plain_hpack_decoder(blocks: list[list[tuple[str, str]]], table_size: int, repeat: int) -> None:
    enc = Encoder()
    enc.header_table_size = table_size  # emits a size update in the next block
    plain, cached = Decoder(), CachingDecoder()
    for headers in blocks:
        for _ in range(repeat):  # repeated header sets: mostly indexed blocks, cache hits
            block = enc.encode(headers)
            assert cached.decode(block) == list(plain.decode(block)) == headers
