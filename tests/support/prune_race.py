"""Children for the upload-vs-prune races: ``python -m support.prune_race ROLE SPEC_JSON``.

Both build their store from the environment (``settings_env(settings)``).

- ``uploader``: ``iterations`` times, makes the target look old (local store: its mtime set
  two hours back, as if uploaded then), uploads the same file again (content already stored:
  no bytes written, only the age restarted) and checks right after the upload returned that
  the object is there. Prints ``{"iterations", "lost"}``; ``lost`` counts uploads that
  returned an id whose object was gone. Creates ``stop`` when done.
- ``pruner``: prunes targets older than one hour in a loop until ``stop`` exists. Prints
  ``{"rounds", "deleted"}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from forgespace.config import Settings
from forgespace.errors import TargetNotFoundError
from forgespace.storage import open_store
from forgespace.storage.lifecycle import ManagedStore, plan_prune


def _store() -> ManagedStore:
    store = open_store(Settings.from_env())
    assert isinstance(store, ManagedStore)
    return store


def uploader(spec: dict[str, object]) -> dict[str, int]:
    store = _store()
    src = Path(str(spec["source"]))
    stop = Path(str(spec["stop"]))
    root = Path(str(spec["root"])) if spec.get("root") else None
    lost = 0
    n = int(str(spec["iterations"]))
    try:
        for _ in range(n):
            tid = store.upload_target(src)
            try:
                store.stat_target(tid)
            except TargetNotFoundError:
                lost += 1
            if root is not None:
                old = time.time() - 7200
                # pruned meanwhile (it was old): the next upload stores it again
                with contextlib.suppress(FileNotFoundError):
                    os.utime(root / tid / "target", (old, old))
    finally:
        stop.touch()
    return {"iterations": n, "lost": lost}


def pruner(spec: dict[str, object]) -> dict[str, int]:
    store = _store()
    stop = Path(str(spec["stop"]))
    rounds = deleted = 0
    while not stop.exists():
        plan = plan_prune(store, target_ttl=3600.0, result_ttl=None, temp_grace=3600.0)
        deleted += len(plan.execute(store).deleted)
        rounds += 1
    return {"rounds": rounds, "deleted": deleted}


if __name__ == "__main__":
    role, spec = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps({"uploader": uploader, "pruner": pruner}[role](spec)), flush=True)
