"""parse_manifest checks a well-formed manifest in one pass (``_well_formed``: all digests at
once) and falls back to the row-by-row check only to name the first fault: both must accept
and refuse exactly the same manifests, and a refusal must name the entry that is wrong."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from forgespace.errors import IntegrityError
from forgespace.storage.manifest import (
    MANIFEST_MAGIC,
    FileEntry,
    _entry,
    parse_manifest,
)


def _rows(n: int = 12) -> list[list[object]]:
    rows: list[list[object]] = [["d", "src"]]
    for i in range(n):
        digest, pack = os.urandom(32).hex(), os.urandom(32).hex()
        rows.append(["f", f"src/f{i}", i % 2, 100 + i, digest, pack, 10 * i, 50, "z"])
    rows.append(["l", "src/link", "f0"])
    return rows


def _encode(rows: list[list[object]]) -> bytes:
    body = {"format": "forgespace-manifest", "version": 1, "tree": "t", "entries": rows}
    return MANIFEST_MAGIC + gzip.compress(json.dumps(body).encode(), mtime=0)


def test_a_well_formed_manifest_parses_as_row_by_row() -> None:
    rows = _rows()
    m = parse_manifest(_encode(rows), "target t")
    assert m.entries == tuple(_entry(r, i, "target t") for i, r in enumerate(rows))
    assert m.files[3] == FileEntry("src/f3", True, 103, rows[4][4], rows[4][5], 30, 50, "z")


FAULTS = {
    "upper-hex digest": (4, "A" * 64),
    "digest with a space": (4, "ab " + "c" * 61),
    "non-ascii digits": (4, "\u0663" * 64),
    "short digest": (4, "a" * 63),
    "long digest": (4, "a" * 65),
    "upper-hex pack": (5, "F" * 64),
    "bool executable": (2, True),
    "negative executable": (2, -1),
    "bool size": (3, False),
    "float offset": (6, 1.0),
    "negative length": (7, -5),
    "range past a file offset": (6, 2**63 - 10),
    "unknown codec": (8, "lz4"),
    "integer codec": (8, 0),
    "integer path": (1, 7),
}


@pytest.mark.parametrize("fault", FAULTS, ids=list(FAULTS))
def test_each_fault_is_refused_naming_its_entry(fault: str) -> None:
    field, value = FAULTS[fault]
    rows = _rows()
    rows[9][field] = value  # entry 9: the faults before it would be found first
    rows[11][4] = "B" * 64  # a later fault of the batched digest check: not the one named
    expected = None
    try:
        _entry(rows[9], 9, "target t")
    except IntegrityError as exc:
        expected = str(exc)
    assert expected is not None and "entry 9 " in expected
    with pytest.raises(IntegrityError) as info:
        parse_manifest(_encode(rows), "target t")
    assert str(info.value) == expected


@pytest.mark.parametrize(
    "row",
    [[], ["x", "p"], ["d"], ["d", "p", "q"], ["l", "p"], ["f", "p"], "f", ["d", 3], {"f": 1}],
    ids=["empty", "unknown kind", "short dir", "long dir", "short link", "short file", "string",
         "integer dir path", "object"],
)  # fmt: skip
def test_rows_of_the_wrong_shape_are_refused_naming_their_entry(row: object) -> None:
    rows: list[object] = [*_rows(3), row]
    with pytest.raises(IntegrityError, match=r"not a valid forgespace manifest: entry 5 "):
        parse_manifest(_encode(rows), "target t")  # type: ignore[arg-type]
