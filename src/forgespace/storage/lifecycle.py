"""Store lifecycle: what a store holds, and pruning it (a plan first, then its execution).

Ages count from the last *upload*: an upload of content the store already holds (which sends
no bytes) refreshes the object's age, so ``prune`` never removes a target that is still being
uploaded again and again. Each backend re-checks the age of every object right before it
deletes it, in a way that excludes a concurrent re-upload (the local store under the same
per-id lock the upload takes; S3 with an intent marker the upload waits for, see
``forgespace.storage.s3``). A target re-uploaded between the plan and its execution is kept
and reported as such.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from forgespace.storage.base import Store

ObjectKind = Literal["target", "result", "leftover", "blob"]


@dataclass(frozen=True)
class StoredObject:
    """One object of a store. ``key`` is the target id for targets, the result key for
    results, and a path relative to the store (or a bucket key) for leftovers. ``modified``
    is the time (epoch seconds) of the last upload; ``sha256`` None when not known without an
    extra request (S3 listings) or not recorded (foreign objects)."""

    kind: ObjectKind
    key: str
    size: int
    modified: float
    sha256: str | None = None
    # kind "blob": a pack of file contents (forgespace.storage.blobs) no target references

    def to_json(self) -> dict[str, object]:
        """The JSON form used by `forgespace store ls|prune --json`."""
        return {
            "kind": self.kind,
            "key": self.key,
            "bytes": self.size,
            "modified": self.modified,
            "sha256": self.sha256,
        }


@runtime_checkable
class ManagedStore(Store, Protocol):
    """A store with a lifecycle (both LocalStore and S3Store implement it)."""

    def list_targets(self) -> list[StoredObject]:
        """Every target object (``{id}/target`` with a valid id), sorted by id."""
        ...

    def list_results(self) -> list[StoredObject]:
        """Every stored workflow result, sorted by key."""
        ...

    def list_leftovers(self, grace: float, now: float | None = None) -> list[StoredObject]:
        """The store's own debris older than ``grace`` seconds that nothing alive uses."""
        ...

    def prune_target(self, target_id: str, cutoff: float) -> bool:
        """Delete the target if its last upload is still before ``cutoff`` (epoch seconds),
        re-checked so that no concurrent upload can be relying on it; True if deleted."""
        ...

    def prune_result(self, key: str, cutoff: float) -> bool:
        """Delete the result if it was still last written before ``cutoff``; True if deleted."""
        ...

    def remove_leftover(self, obj: StoredObject, grace: float) -> bool:
        """Remove one leftover if it is still dead and older than ``grace``; True if removed."""
        ...


@dataclass(frozen=True)
class PruneResult:
    """What ``PrunePlan.execute`` did: ``deleted`` objects, and ``kept`` ones that were
    re-uploaded (or changed, or already gone) between the plan and the deletion."""

    deleted: tuple[StoredObject, ...]
    kept: tuple[StoredObject, ...]

    @property
    def freed_bytes(self) -> int:
        """Bytes of the objects deleted."""
        return sum(o.size for o in self.deleted)


@dataclass(frozen=True)
class PrunePlan:
    """What a prune would delete (data, rendered by the CLI), and ``execute`` to do it."""

    target_cutoff: float
    result_cutoff: float
    temp_grace: float
    targets: tuple[StoredObject, ...] = field(default=())
    results: tuple[StoredObject, ...] = field(default=())
    leftovers: tuple[StoredObject, ...] = field(default=())
    #: blob packs no target references now (more may go once the planned targets are gone)
    blobs: tuple[StoredObject, ...] = field(default=())

    @property
    def objects(self) -> tuple[StoredObject, ...]:
        """Everything the plan names, targets first."""
        return self.targets + self.results + self.leftovers + self.blobs

    @property
    def expected_freed_bytes(self) -> int:
        """Bytes freed if nothing is re-uploaded meanwhile."""
        return sum(o.size for o in self.objects)

    def execute(self, store: ManagedStore) -> PruneResult:
        """Delete what the plan names, each object re-checked right before (see module)."""
        deleted: list[StoredObject] = []
        kept: list[StoredObject] = []
        for obj in self.targets + self.results + self.leftovers:
            if obj.kind == "target":
                done = store.prune_target(obj.key, self.target_cutoff)
            elif obj.kind == "result":
                done = store.prune_result(obj.key, self.result_cutoff)
            else:
                done = store.remove_leftover(obj, self.temp_grace)
            (deleted if done else kept).append(obj)
        sweep = getattr(store, "sweep_blobs", None)
        if sweep is not None:
            # after the targets: packs only they referenced go in the same prune
            swept = sweep(self.temp_grace).deleted
            gone = {k for k, _s, _m in swept}
            deleted += [StoredObject("blob", k, size, m) for k, size, m in swept]
            kept += [o for o in self.blobs if o.key not in gone]
        return PruneResult(tuple(deleted), tuple(kept))


def plan_prune(
    store: ManagedStore,
    *,
    target_ttl: float | None,
    result_ttl: float | None,
    temp_grace: float,
    now: float | None = None,
) -> PrunePlan:
    """Targets not uploaded for ``target_ttl`` seconds, results older than ``result_ttl``
    (None: that kind is left alone) and the store's dead leftovers older than ``temp_grace``."""
    now = time.time() if now is None else now
    t_cut = now - target_ttl if target_ttl is not None else float("-inf")
    r_cut = now - result_ttl if result_ttl is not None else float("-inf")
    targets = [] if target_ttl is None else [o for o in store.list_targets() if o.modified < t_cut]
    results = [] if result_ttl is None else [o for o in store.list_results() if o.modified < r_cut]
    return PrunePlan(
        target_cutoff=t_cut,
        result_cutoff=r_cut,
        temp_grace=temp_grace,
        targets=tuple(targets),
        results=tuple(results),
        leftovers=tuple(store.list_leftovers(temp_grace, now)),
        blobs=_unreferenced_blobs(store, temp_grace),
    )


def _unreferenced_blobs(store: ManagedStore, grace: float) -> tuple[StoredObject, ...]:
    """Blob packs a sweep would delete now (stores without blobs: none)."""
    sweep = getattr(store, "sweep_blobs", None)
    if sweep is None:
        return ()
    return tuple(StoredObject("blob", k, s, m) for k, s, m in sweep(grace, dry_run=True).deleted)


__all__ = [
    "ManagedStore",
    "ObjectKind",
    "PrunePlan",
    "PruneResult",
    "StoredObject",
    "plan_prune",
]
