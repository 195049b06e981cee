"""Is the cache consistent? The index against the disk, shared workspaces against their
publish-time manifests, planted entries; and, on request, the repair policy: rebuild the index,
re-extract a modified shared workspace from its cached target, drop a modified copy-on-write
shared copy (unless leased). Returns a report the CLI only renders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from forgespace.cache.eviction import entry_paths, evict_entry
from forgespace.cache.index import scan_entries

if TYPE_CHECKING:
    from forgespace.cache.workspace import WorkspaceCache


@dataclass
class VerifyReport:
    """What ``verify_cache`` found (and repaired). ``ok``: nothing wrong was found."""

    entries_indexed: int = 0
    entries_on_disk: int = 0
    missing_from_index: list[str] = field(default_factory=list)
    missing_on_disk: list[str] = field(default_factory=list)
    modified: dict[str, list[str]] = field(default_factory=dict)
    unsafe: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing_from_index or self.missing_on_disk or self.modified or self.unsafe)

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON shape of ``forgespace cache verify --json`` (docs/operations.md)."""
        return {
            "ok": self.ok,
            "entries_indexed": self.entries_indexed,
            "entries_on_disk": self.entries_on_disk,
            "missing_from_index": self.missing_from_index,
            "missing_on_disk": self.missing_on_disk,
            "modified": self.modified,
            "repaired": self.repaired,
            "unsafe": self.unsafe,
        }


def verify_cache(cache: WorkspaceCache, *, repair: bool) -> VerifyReport:
    """Check ``cache``; with ``repair`` fix what can be fixed (see the module docstring)."""
    index, layout = cache.index, cache.layout
    indexed = {e.key: e for e in index.entries()}
    on_disk = {e.key: e for e in scan_entries(layout, with_sizes=False)}
    report = VerifyReport(
        entries_indexed=len(indexed),
        entries_on_disk=len(on_disk),
        missing_from_index=sorted(set(on_disk) - set(indexed)),
        missing_on_disk=sorted(
            k
            for k, e in indexed.items()
            if not any(p.exists() or p.is_symlink() for p in entry_paths(layout, e))
        ),
        unsafe=cache.audit_internal(),
    )
    for tid in sorted({e.target_id for e in on_disk.values() if e.kind != "run"}):
        diffs = cache.verify_shared(tid)
        if diffs:
            report.modified[tid] = diffs
    if repair:
        _repair(cache, report)
    return report


def _repair(cache: WorkspaceCache, report: VerifyReport) -> None:
    if report.missing_from_index or report.missing_on_disk:
        cache.index.rebuild()
        report.repaired.append("index rebuilt from disk")
    for tid, diffs in report.modified.items():
        ws, cow = f"{tid}/workspace", f"{tid}/shared"
        if any(d.startswith(ws) for d in diffs) and cache.repair_shared(tid):
            report.repaired.append(f"{ws} re-extracted from its cached target")
        # No pristine source beside a copy-on-write shared copy: drop it (the next run
        # downloads again) unless live runs lease it.
        if any(d.startswith(cow) for d in diffs) and evict_entry(cache, cow):
            report.repaired.append(f"{cow} removed (modified); the next run re-downloads")
