"""The small blob store ``fuzz_manifest.py`` materialises manifests against, and its seeds' base.

One function builds it, so the harness (at start-up, in its scratch directory) and
``make_corpus.py`` (for the seeds) hold the same pack: same blobs, same offsets and codecs,
same pack name (the sha256 of its bytes). The tree has a raw and a zlib-compressed blob, an
executable, an empty file, a subdirectory and a symlink: every entry kind and both codecs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from forgespace.storage import blobs
from forgespace.storage.local import LocalStore
from forgespace.storage.manifest import Manifest, walk_tree

# path -> (content, executable); contents fixed so the pack's bytes (and name) are too.
FILES: dict[str, tuple[bytes, bool]] = {
    "a.txt": (b"alpha\n", False),  # raw: below the compression threshold
    "run.sh": (b"#!/bin/sh\necho run\n", True),
    "empty": (b"", False),  # no blob fetched, an empty file created
    "sub/mod.py": (b"print('compressible line')\n" * 40, False),  # stored zlib-compressed
    "sub/rand.bin": (b"".join(hashlib.sha256(bytes([i])).digest() for i in range(8)), False),
}
LINKS = {"link": "a.txt", "sub/up": "../run.sh"}


def make_store(root: Path) -> tuple[LocalStore, Manifest]:
    """Write the tree under ``root/src`` and upload its blobs to a LocalStore at
    ``root/store``; returns the store and the tree's manifest with every blob's location."""
    src = root / "src"
    for rel, (data, executable) in FILES.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o755 if executable else 0o644)
    for rel, target in LINKS.items():
        os.symlink(target, src / rel)
    store = LocalStore(root / "store")
    lease = blobs.begin_upload(store)
    try:
        located, _stats = blobs.store_tree(store, walk_tree(src))
    finally:
        blobs.end_upload(store, lease)
    return store, located
