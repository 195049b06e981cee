"""Children for the incremental-transfer tests: ``python -m support.incremental ROLE SPEC_JSON``.

Every child builds its store (and cache) from its environment (``settings_env(settings)``).
Roles that stop for a SIGKILL create ``spec["signal"]`` at the named point and then sleep:

- ``upload``: uploads ``source``; ``pause`` = "pack-written" (the pack's temp file is written,
  not yet stored) or "pack-stored" (pack and index stored, the manifest not yet published).
- ``get``: get_target(``target_id``, ``run_id``, ``mode``); ``pause`` = "blob-write" stops while
  writing the second blob it fetches (a temp file in the blob store).
- ``sweep``: a blob sweep; ``pause`` = "deleted" stops after the first pack's index is deleted.
- ``churn``: ``iterations`` times: upload ``source``, check that every pack its manifest names
  exists, delete the target (its packs become unreferenced). Prints ``{"lost": n}``.
- ``sweeper``: sweeps blobs (grace 0) until ``stop`` exists. Prints ``{"rounds", "deleted"}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from forgespace.config import Settings
from forgespace.storage import blobs, open_store
from forgespace.storage.manifest import parse_manifest


def _pause(spec: dict[str, Any]) -> None:
    Path(spec["signal"]).touch()
    time.sleep(3600)


def upload(spec: dict[str, Any]) -> dict[str, Any]:
    store = open_store(Settings.from_env())
    if spec.get("pause") == "pack-written":
        orig_put = store.blob_put  # type: ignore[attr-defined]

        def put(key: str, src: Any) -> None:
            if key.startswith(blobs.PACKS):
                _pause(spec)
            orig_put(key, src)

        store.blob_put = put  # type: ignore[attr-defined]
    elif spec.get("pause") == "pack-stored":
        orig_send = blobs._send_pack

        def send(*args: Any) -> Any:
            out = orig_send(*args)
            _pause(spec)
            return out

        blobs._send_pack = send  # type: ignore[assignment]
    return {"target_id": store.upload_target(spec["source"])}


def get(spec: dict[str, Any]) -> dict[str, Any]:
    from forgespace.cache import blobstore
    from forgespace.cache.workspace import WorkspaceCache

    if spec.get("pause") == "blob-write":
        orig_write = blobstore._Sink.write
        seen: set[str] = set()

        def write(self: Any, data: bytes) -> None:
            seen.add(self.digest)
            if len(seen) == 2:
                orig_write(self, data[: len(data) // 2])
                _pause(spec)
            orig_write(self, data)

        blobstore._Sink.write = write  # type: ignore[method-assign]
    cache = WorkspaceCache(Settings.from_env())
    path = cache.get_target(spec["target_id"], spec.get("run_id"), spec.get("mode", "shared"))
    return {"path": path}


def sweep(spec: dict[str, Any]) -> dict[str, Any]:
    store = open_store(Settings.from_env())
    if spec.get("pause") == "deleted":
        orig_delete = store.blob_delete  # type: ignore[attr-defined]

        def delete(key: str) -> None:
            orig_delete(key)
            if key.startswith(blobs.INDEX):
                _pause(spec)

        store.blob_delete = delete  # type: ignore[attr-defined]
    res = store.sweep_blobs(0.0)  # type: ignore[attr-defined]
    return {"deleted": len(res.deleted), "skipped": res.skipped}


def _packs_of(store: Any, tid: str) -> set[str]:
    data = store.blob_get(f"{tid}/target") if hasattr(store, "client") else None
    if data is None:
        data = store.object_path(tid).read_bytes()
    return {f.pack for f in parse_manifest(data, tid).files}


def churn(spec: dict[str, Any]) -> dict[str, Any]:
    """Upload and delete the same tree again and again, counting packs a manifest names that
    are gone: at least ``iterations`` times, and on until the sweeper has deleted a pack (so
    the race really happened however slowly either process runs; ``cap`` bounds it)."""
    store: Any = open_store(Settings.from_env())
    started, swept = Path(spec["started"]), Path(spec["swept"])
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    lost = rounds = 0
    while rounds < int(spec["iterations"]) or (not swept.exists() and rounds < int(spec["cap"])):
        tid = store.upload_target(spec["source"])
        present = {k[len(blobs.PACKS) :] for k, _s, _m in store.blob_list(blobs.PACKS)[0]}
        lost += len(_packs_of(store, tid) - present)
        store.delete_target(tid)
        rounds += 1
    Path(spec["stop"]).touch()
    return {"lost": lost, "rounds": rounds}


def sweeper(spec: dict[str, Any]) -> dict[str, Any]:
    store: Any = open_store(Settings.from_env())
    rounds = deleted = 0
    Path(spec["started"]).touch()
    while not Path(spec["stop"]).exists():
        deleted += len(store.sweep_blobs(0.0).deleted)
        rounds += 1
        if deleted:
            Path(spec["swept"]).touch()
    return {"rounds": rounds, "deleted": deleted}


if __name__ == "__main__":
    role, spec_arg = sys.argv[1], json.loads(sys.argv[2])
    roles = {"upload": upload, "get": get, "sweep": sweep, "churn": churn, "sweeper": sweeper}
    print(json.dumps(roles[role](spec_arg)), flush=True)
