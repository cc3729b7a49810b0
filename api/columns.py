"""Series columns: an increment report's ref'd series as packed arrays (api/proto/nodemesh.proto,
`SeriesColumns`).

A node's report carries a few hundred series a second; as one protobuf `Series` each, the
controller spent ~14 µs of Python per series reading their fields one attribute at a time
(docs/scale.md). As columns, a report's refs and values decode with one `array.frombytes` per
column (a copy, in C) and the controller's loop touches plain ints and floats. Sans-IO: the agent
link packs (agent/seriesrefs.py), the controller unpacks (controlplane/columns.py).
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass, field

from nodemesh.api.gen import nodemesh_pb2 as pb

_SWAP = sys.byteorder != "little"  # the wire is little-endian
assert array("I").itemsize == 4 and array("Q").itemsize == 8 and array("d").itemsize == 8


def _pack(a: array) -> bytes:  # type: ignore[type-arg]
    if _SWAP:
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


def _unpack(typecode: str, data: bytes) -> array | None:  # type: ignore[type-arg]
    a = array(typecode)
    if len(data) % a.itemsize:
        return None
    a.frombytes(data)
    if _SWAP:
        a.byteswap()
    return a


@dataclass
class Columns:
    """One report's columns. `hist_counts` holds `n_buckets` counts per entry of `hist_refs`."""

    refs: array = field(default_factory=lambda: array("I"))          # type: ignore[type-arg]
    values: array = field(default_factory=lambda: array("d"))        # type: ignore[type-arg]
    hist_refs: array = field(default_factory=lambda: array("I"))     # type: ignore[type-arg]
    hist_sums: array = field(default_factory=lambda: array("d"))     # type: ignore[type-arg]
    hist_counts: array = field(default_factory=lambda: array("Q"))   # type: ignore[type-arg]

    def __len__(self) -> int:
        return len(self.refs) + len(self.hist_refs)

    def to_proto(self) -> pb.SeriesColumns:
        return pb.SeriesColumns(refs=_pack(self.refs), values=_pack(self.values), hist_refs=_pack(self.hist_refs),
                                hist_sums=_pack(self.hist_sums), hist_counts=_pack(self.hist_counts))


def series_count(msg: pb.SeriesColumns) -> int:
    """How many series a block claims (what a malformed block counts as rejected)."""
    return max(len(msg.refs) // 4, len(msg.values) // 8) + max(len(msg.hist_refs) // 4, len(msg.hist_sums) // 8)


def decode(msg: pb.SeriesColumns, n_buckets: int) -> Columns | None:
    """The block's arrays, or None when it is malformed (a length not a whole number of items,
    arrays that disagree, or histogram counts not `n_buckets` per histogram)."""
    refs, values = _unpack("I", msg.refs), _unpack("d", msg.values)
    hist_refs, hist_sums = _unpack("I", msg.hist_refs), _unpack("d", msg.hist_sums)
    hist_counts = _unpack("Q", msg.hist_counts)
    if refs is None or values is None or hist_refs is None or hist_sums is None or hist_counts is None:
        return None
    if len(refs) != len(values) or len(hist_refs) != len(hist_sums) or len(hist_counts) != len(hist_refs) * n_buckets:
        return None
    return Columns(refs, values, hist_refs, hist_sums, hist_counts)
