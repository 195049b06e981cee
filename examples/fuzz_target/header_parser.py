"""A tiny record-header parser with a planted bug for the atheris_fuzzing workflow.

Records start with a 4-byte magic, a version byte and a length byte. The bug: a
``FSPC`` header with version 7 takes a "legacy" branch that reads a checksum byte
past the end of a short input (IndexError). Coverage-guided fuzzing (atheris
instruments the comparisons and feeds the compared bytes back) finds it in well under a
second: in 40 trial runs it took 1.5k-60k inputs (median ~7k).
"""

from __future__ import annotations

MAGIC = b"FSPC"


class HeaderError(ValueError):
    """The input is not a valid record header (expected, not a bug)."""


def parse_header(data: bytes) -> dict[str, int | bytes]:
    """Parse ``MAGIC | version | length | payload``; raise HeaderError on bad input."""
    if len(data) < 6:
        raise HeaderError("short header")
    if data[:4] != MAGIC:
        raise HeaderError("bad magic")
    version, length = data[4], data[5]
    payload = data[6 : 6 + length]
    if version == 7:
        # Planted bug: legacy records carry a checksum byte after the payload,
        # but nothing checks that the input is long enough to hold it.
        checksum = data[6 + length]
        return {"version": version, "payload": payload, "checksum": checksum}
    return {"version": version, "payload": payload}
