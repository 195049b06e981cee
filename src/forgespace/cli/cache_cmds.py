# Over 500 lines for now: the `forgespace cache` command group with its three renderings (table,
# plain columns, JSON); one module per command is the next split.
"""`forgespace cache status|ls|gc|prune|purge|evict|verify|dir`: see and steer the cache.

Human output goes to stdout: a rich table on a terminal, plain columns with full ids when
stdout is a pipe or a file (for grep/awk/cut); ``--json`` prints one JSON document instead
(shapes documented in docs/operations.md, stable: fields are only ever added; times are epoch
seconds with an ISO-8601 ``*_iso`` twin). Neither status nor ls nor gc walks workspace files:
sizes come from the index.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import typer

from forgespace.cli.app import cache_app, err_console, load_settings, out_console

if TYPE_CHECKING:
    from forgespace.cache.index import CacheIndex, EntryRecord, LeaseRecord
    from forgespace.cache.workspace import WorkspaceCache
    from forgespace.config import Settings

JSON_HELP = "Print one JSON document on stdout (shape in docs/operations.md)."


def _existing_cache(settings: Settings) -> bool:
    """Whether CACHE_DIR holds a forgespace cache. Read-only commands never create one: on a
    missing CACHE_DIR (or one without ``.forgespace/``) they report an empty cache and say so
    on stderr (exit 0); a CACHE_DIR that is not a directory is an error."""
    from forgespace.errors import CacheAccessError
    from forgespace.layout import META_DIRNAME

    root = settings.cache_dir
    for path, missing in (
        (root, f"CACHE_DIR {root} does not exist (nothing cached yet)"),
        (root / META_DIRNAME, f"CACHE_DIR {root} has no {META_DIRNAME}/ (nothing cached yet)"),
    ):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            err_console.print(f"note: {missing}", highlight=False)
            return False
        except NotADirectoryError:
            st = None
        except OSError as exc:
            raise CacheAccessError.from_os_error(exc, "read the cache directory") from exc
        if st is None or not stat.S_ISDIR(st.st_mode):
            what = "CACHE_DIR" if path == root else "the cache's bookkeeping directory"
            raise CacheAccessError(
                errno.ENOTDIR, f"{what} {path} is not a directory (it must be one)"
            )
    return True


def _index(settings: Settings) -> CacheIndex | None:
    """The index, read-only where the cache allows no more; None when there is no cache."""
    # status/ls only read the index: no need to build the whole engine.
    from forgespace.cache.index import CacheIndex
    from forgespace.layout import CacheLayout

    if not _existing_cache(settings):
        return None
    return CacheIndex(
        CacheLayout(settings.cache_dir), lease_ttl=settings.cache_lease_ttl, create=False
    )


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    stamp = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"{stamp} ({ago(ts)})"


def _iso(ts: float | None) -> str | None:
    """ISO-8601 (UTC, seconds) of an epoch time, for the ``*_iso`` JSON fields."""
    if not ts:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


_UNITS = (("week", 604800), ("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


def duration_words(seconds: float) -> str:
    """``3 minutes``, ``1 day``, ``2 weeks`` (the largest whole unit; seconds below a minute)."""
    for unit, size in _UNITS:
        if seconds >= size or unit == "second":
            n = int(seconds // size)
            return f"{n} {unit}{'' if n == 1 else 's'}"
    return f"{seconds:.0f} seconds"  # pragma: no cover


def ago(ts: float, now: float | None = None) -> str:
    """``3 minutes ago`` (``just now`` under a second; a future time says ``from now``)."""
    delta = (time.time() if now is None else now) - ts
    if abs(delta) < 1:
        return "just now"
    return f"{duration_words(abs(delta))} {'ago' if delta > 0 else 'from now'}"


def _age(seconds: float) -> str:
    return duration_words(seconds)


def _plain() -> bool:
    """Plain columns, full ids: stdout is not a terminal (a pipe, a file)."""
    return not out_console.is_terminal


def _bytes_cell(n: int) -> str:
    """Sizes for people on a terminal, exact byte counts for scripts."""
    return str(n) if _plain() else _size(n)


def _time_cell(ts: float | None) -> str:
    """An ISO time for scripts; the time and how long ago for people."""
    return (_iso(ts) or "-") if _plain() else _when(ts)


def _render(title: str, columns: list[tuple[str, str]], rows: list[list[str]]) -> None:
    """A table: rich on a terminal (ids never truncated), else plain space-aligned columns
    (header first, full values) that grep/awk/cut can read."""
    if _plain():
        widths = [max([len(c[0]), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
        lines = [[c[0].upper().replace(" ", "_") for c in columns], *rows]
        for cells in lines:
            out = [
                cell.rjust(w) if col[1] == "right" else cell.ljust(w)
                for cell, w, col in zip(cells, widths, columns, strict=True)
            ]
            print("  ".join(out).rstrip())
        return
    from rich.table import Table

    t = Table(title=title)
    for name, just in columns:
        # ids and keys are copied into other commands: never cut them
        t.add_column(name, justify=just, overflow="fold")  # type: ignore[arg-type]
    for r in rows:
        t.add_row(*r)
    out_console.print(t)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"  # pragma: no cover


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=False))


def _leases_by_key(leases: list[LeaseRecord]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for le in leases:
        for k in le.pins:
            out[k] += 1
    return out


def _entry_doc(e: EntryRecord, leases: int) -> dict[str, Any]:
    return {
        "key": e.key,
        "kind": e.kind,
        "mode": e.mode,
        "run_id": e.run_id,
        "bytes": e.bytes,
        "files": e.files,
        "created": e.created,
        "created_iso": _iso(e.created),
        "last_access": e.last_access,
        "last_access_iso": _iso(e.last_access),
        "live_leases": leases,
    }


# --- status -------------------------------------------------------------------------------
def status_doc(settings: Settings, index: CacheIndex | None) -> dict[str, Any]:
    """The document `cache status --json` prints (``index`` None: no cache yet, all zero)."""
    from forgespace.cache.blobstore import store_usage
    from forgespace.cache.index import KINDS, CacheSummary

    reclaimable = 0
    if index is None:
        summary = CacheSummary(0, 0, 0, None, dict.fromkeys(KINDS, 0), 0)
        counters: dict[str, int] = {}
    else:
        summary = index.summary()
        counters = index.counters()
        leased = index.leased_keys()
        reclaimable = sum(e.bytes for e in index.entries() if e.key not in leased)
    # what counts against CACHE_MAX_SIZE: the entries and the local blob store of incremental
    # targets (.forgespace/blobs, swept with the same TTL/LRU rules)
    blob_bytes = 0 if index is None else store_usage(settings.cache_dir)[0]
    total, oldest = summary.bytes + blob_bytes, summary.oldest_access
    return {
        "cache_dir": str(settings.cache_dir),
        "bytes": total,
        "entry_bytes": summary.bytes,
        "blob_bytes": blob_bytes,
        "limit_bytes": settings.cache_max_size,
        "used_ratio": round(total / settings.cache_max_size, 6)
        if settings.cache_max_size
        else None,
        "reclaimable_bytes": reclaimable,
        "entries": summary.entries,
        "entries_by_kind": summary.entries_by_kind,
        "targets": summary.targets,
        "live_leases": summary.live_leases,
        "hits": counters.get("hits", 0),
        "misses": counters.get("misses", 0),
        "downloads": counters.get("downloads", 0),
        "bytes_downloaded": counters.get("bytes_downloaded", 0),
        "evictions": {
            r: counters.get(f"evictions_{r}", 0)
            for r in ("ttl", "lru", "orphan", "leftover", "operator")
        },
        "counters": counters,
        "oldest_access": oldest,
        "oldest_access_iso": _iso(oldest),
        "oldest_access_age_seconds": None if oldest is None else round(time.time() - oldest, 3),
        "ttl_seconds": settings.cache_ttl,
        "lease_ttl_seconds": settings.cache_lease_ttl,
        "cleanup_interval_seconds": settings.cache_cleanup_interval,
    }


@cache_app.command("status")
def status(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Bytes used vs the limit, entries, leases, hits/misses/downloads, oldest access."""
    settings = load_settings()
    doc = status_doc(settings, _index(settings))
    if as_json:
        _print_json(doc)
        return
    ratio = doc["used_ratio"]
    k = doc["entries_by_kind"]
    rows = [
        (
            "used",
            f"{_size(doc['bytes'])} of {_size(doc['limit_bytes'])}"
            + (f" ({ratio * 100:.1f}%)" if ratio is not None else ""),
        ),
        ("blob store", f"{_size(doc['blob_bytes'])} (local packs of incremental targets)"),
        ("reclaimable", f"{_size(doc['reclaimable_bytes'])} (not leased by a live run)"),
        (
            "entries",
            f"{doc['entries']} ({k['shared']} shared, {k['cow-shared']} copy-on-write shared, "
            f"{k['run']} run) in {doc['targets']} target(s)",
        ),
        ("live leases", str(doc["live_leases"])),
        ("hits / misses", f"{doc['hits']} / {doc['misses']}"),
        ("downloads", f"{doc['downloads']} ({_size(doc['bytes_downloaded'])})"),
        ("evictions", ", ".join(f"{r} {n}" for r, n in doc["evictions"].items())),
        ("oldest access", _when(doc["oldest_access"])),
        (
            "policy",
            f"TTL {_age(settings.cache_ttl)}, lease TTL {_age(settings.cache_lease_ttl)}, "
            f"sweep every {_age(settings.cache_cleanup_interval)}",
        ),
    ]
    if _plain():
        print(f"cache dir: {doc['cache_dir']}")
        for what, value in rows:
            print(f"{what}: {value}")
        return
    from rich.table import Table

    t = Table(title=f"forgespace cache: {doc['cache_dir']}", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    for what, value in rows:
        t.add_row(what, value)
    out_console.print(t)


# --- ls -----------------------------------------------------------------------------------
def ls_doc(index: CacheIndex | None) -> dict[str, Any]:
    """The document `cache ls --json` prints: targets, most recently accessed first."""
    if index is None:
        return {"targets": []}
    entries = index.entries()
    per_key = _leases_by_key(index.live_leases())
    targets: dict[str, list[EntryRecord]] = defaultdict(list)
    for e in entries:
        targets[e.target_id].append(e)
    docs: list[dict[str, Any]] = []
    for tid, es in targets.items():
        docs.append(
            {
                "target_id": tid,
                "kinds": sorted({e.kind for e in es}),
                "bytes": sum(e.bytes for e in es),
                "files": sum(e.files for e in es),
                "last_access": max(e.last_access for e in es),
                "last_access_iso": _iso(max(e.last_access for e in es)),
                "live_leases": sum(per_key.get(e.key, 0) for e in es),
                "entries": [_entry_doc(e, per_key.get(e.key, 0)) for e in es],
            }
        )
    docs.sort(key=lambda d: (-d["last_access"], d["target_id"]))
    return {"targets": docs}


@cache_app.command("ls")
def ls(
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Target ids only, one a line (most recent first)."
    ),
) -> None:
    """Every cached target: kind, bytes, last access, live leases."""
    doc = ls_doc(_index(load_settings()))
    if as_json:
        _print_json(doc)
        return
    if quiet:
        for target in doc["targets"]:
            print(target["target_id"])
        return
    plain = _plain()
    rows: list[list[str]] = []
    for target in doc["targets"]:
        for i, e in enumerate(sorted(target["entries"], key=lambda x: -x["last_access"])):
            rows.append(
                [
                    # plain output repeats the id on every row (each row stands alone for grep)
                    target["target_id"] if i == 0 or plain else "",
                    e["key"].split("/", 1)[1] + ("" if e["kind"] != "run" or plain else " (run)"),
                    e["mode"],
                    _bytes_cell(e["bytes"]),
                    str(e["files"]),
                    (e["last_access_iso"] or "-") if plain else ago(e["last_access"]),
                    str(e["live_leases"]),
                ]
            )
    if not rows:
        err_console.print("the cache is empty")
        return
    _render(
        "cached targets (most recently accessed first)",
        [
            ("target", "left"),
            ("entry", "left"),
            ("mode", "left"),
            ("bytes", "right"),
            ("files", "right"),
            ("last access", "left"),
            ("leases", "right"),
        ],
        rows,
    )


def _gc_json(doc: dict[str, Any]) -> dict[str, Any]:
    """gc's JSON with ``last_access_iso`` beside each item's epoch ``last_access``."""
    for key in ("plan", "evicted"):
        for item in doc.get(key) or []:
            item["last_access_iso"] = _iso(item.get("last_access"))
    return doc


# --- gc -----------------------------------------------------------------------------------
@cache_app.command("gc")
def gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; delete nothing."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """TTL, then LRU down to CACHE_MAX_SIZE, then orphans and leftovers (leased entries stay)."""
    from forgespace.cache.workspace import WorkspaceCache

    report = WorkspaceCache(load_settings()).gc(dry_run=dry_run)
    if as_json:
        _print_json(_gc_json(report.to_dict()))
        return
    done = {p.key for p in report.evicted}
    skipped = {s.key: s.why for s in report.skipped}
    rows = [
        [
            p.key,
            p.kind,
            p.reason,
            _bytes_cell(p.bytes),
            _time_cell(p.last_access),
            "-" if dry_run else ("yes" if p.key in done else f"skipped:{skipped.get(p.key)}"),
        ]
        for p in report.plan
    ]
    if rows:
        _render(
            "gc plan (dry run: nothing deleted)" if dry_run else "gc",
            [(c, "right" if c == "bytes" else "left") for c in
             ("entry", "kind", "reason", "bytes", "last access", "done")],
            rows,
        )  # fmt: skip
    for key in report.adopted:
        out_console.print(f"indexed {key} (on disk, was missing from the index)", highlight=False)
    if not rows:
        within = report.total_before <= report.limit
        out_console.print(
            f"nothing to evict: {_size(report.total_before)} indexed, "
            + (
                f"within the limit ({_size(report.limit)}), no orphans or leftovers"
                if within
                else f"over the limit ({_size(report.limit)}) but live runs lease the rest"
            ),
            highlight=False,
        )
        return
    verb = "would free" if dry_run else "freed"
    freed = sum(p.bytes for p in report.plan) if dry_run else report.freed_bytes
    out_console.print(
        f"{verb} {_size(freed)}; indexed total {_size(report.total_before)} -> "
        f"{_size(report.total_after)} (limit {_size(report.limit)})",
        highlight=False,
    )


# --- prune / purge -----------------------------------------------------------------------
def _evict_entries(cache: Any, entries: list[EntryRecord]) -> tuple[list[EntryRecord], list[str]]:
    """Evict each unleased entry through eviction's own executor (per-target lock, lease
    re-checked inside it, rename into the trash); returns (evicted, why-not lines)."""
    from forgespace.cache.eviction import evict_entry

    evicted, kept = [], []
    for e in entries:
        if evict_entry(cache, e.key):
            evicted.append(e)
        else:
            kept.append(f"{e.key}: kept (leased or busy since the plan)")
    return evicted, kept


def _removal_doc(
    what: str, dry_run: bool, entries: list[EntryRecord], kept: list[str], **extra: Any
) -> dict[str, Any]:
    return {
        "command": what,
        "dry_run": dry_run,
        "entries": [
            {
                "key": e.key,
                "target_id": e.target_id,
                "kind": e.kind,
                "bytes": e.bytes,
                "last_access": e.last_access,
                "last_access_iso": _iso(e.last_access),
            }
            for e in entries
        ],
        "freed_bytes": 0 if dry_run else sum(e.bytes for e in entries),
        "would_free_bytes": sum(e.bytes for e in entries) if dry_run else 0,
        "kept": kept,
        **extra,
    }


def _print_removal(doc: dict[str, Any], verb: str) -> None:
    rows = [
        [e["target_id"], e["key"].split("/", 1)[1], e["kind"], _bytes_cell(e["bytes"]),
         _time_cell(e["last_access"])]
        for e in doc["entries"]
    ]  # fmt: skip
    if rows:
        _render(
            f"{doc['command']} (dry run: nothing deleted)" if doc["dry_run"] else doc["command"],
            [("target", "left"), ("entry", "left"), ("kind", "left"), ("bytes", "right"),
             ("last access", "left")],
            rows,
        )  # fmt: skip
    for line in doc["kept"]:
        err_console.print(line, highlight=False, markup=False)
    total = doc["would_free_bytes"] if doc["dry_run"] else doc["freed_bytes"]
    n = len(doc["entries"])
    out_console.print(
        f"{'would ' + verb if doc['dry_run'] else verb + 'd'} {n} entr{'y' if n == 1 else 'ies'}, "
        f"{'would free' if doc['dry_run'] else 'freed'} {_size(total)}",
        highlight=False,
    )


@cache_app.command("prune")
def prune(
    older_than: str = typer.Option(
        ...,
        "--older-than",
        help="Remove entries not accessed for this long: 2d, 12h, 90m, 1w, or seconds.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="List them; delete nothing."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Remove cached entries not accessed for --older-than (leased entries always stay)."""
    from forgespace.cache.workspace import WorkspaceCache
    from forgespace.config import parse_duration

    try:
        age = parse_duration(older_than, name="duration")
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--older-than") from None
    settings = load_settings()
    if not _existing_cache(settings):
        entries: list[EntryRecord] = []
        kept: list[str] = []
    else:
        cache = WorkspaceCache(settings)
        cutoff = time.time() - age
        leased = cache.index.leased_keys()
        old = [e for e in cache.index.entries() if e.last_access < cutoff]
        entries = [e for e in old if e.key not in leased]
        kept = [f"{e.key}: kept (leased by a live run)" for e in old if e.key in leased]
        if not dry_run:
            entries, busy = _evict_entries(cache, entries)
            kept += busy
    doc = _removal_doc("prune", dry_run, entries, kept, older_than_seconds=age)
    if as_json:
        _print_json(doc)
    else:
        _print_removal(doc, "remove")


@cache_app.command("purge")
def purge(
    force: bool = typer.Option(
        False,
        "--force",
        help="Also what live runs lease (ends their leases, as `cache evict --force`).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="List it; delete nothing."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Remove every cached target; leased entries stay unless --force."""
    from forgespace.cache.eviction import evict_target
    from forgespace.cache.index import scan_entries
    from forgespace.cache.workspace import WorkspaceCache

    settings = load_settings()
    entries: list[EntryRecord] = []
    kept: list[str] = []
    if _existing_cache(settings):
        cache = WorkspaceCache(settings)
        indexed = cache.index.entries()
        leased = cache.index.leased_keys()
        targets = sorted(
            {e.target_id for e in indexed}
            | {e.target_id for e in scan_entries(cache.layout, with_sizes=False)}
        )
        for tid in targets:
            mine = [e for e in indexed if e.target_id == tid]
            pinned = [e for e in mine if e.key in leased]
            if pinned and not force:
                # Only the unleased entries of a target some run still uses.
                why = "kept (leased by a live run; --force removes it)"
                kept += [f"{e.key}: {why}" for e in pinned]
                free = [e for e in mine if e.key not in leased]
                if dry_run:
                    entries += free
                else:
                    done, busy = _evict_entries(cache, free)
                    entries += done
                    kept += busy
                continue
            if dry_run:
                entries += mine
                continue
            gone = {p.key for p in evict_target(cache, tid, force=force)}
            entries += [e for e in mine if e.key in gone]
    doc = _removal_doc("purge", dry_run, entries, kept, force=force)
    if as_json:
        _print_json(doc)
    else:
        _print_removal(doc, "remove")


@cache_app.command("dir")
def cache_dir() -> None:
    """Print CACHE_DIR (whether or not it exists yet)."""
    print(load_settings().cache_dir)


# --- evict --------------------------------------------------------------------------------
@cache_app.command("evict")
def evict(
    target_id: str = typer.Argument(..., help="The target whose cached copies to remove."),
    force: bool = typer.Option(
        False, "--force", help="Also when live runs lease it (ends their leases)."
    ),
    timeout: float = typer.Option(
        30.0, "--timeout", help="Seconds to wait for a get_target of it in flight."
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Remove everything cached for TARGET_ID; refuses a leased target unless --force."""
    from forgespace.cache.eviction import evict_target
    from forgespace.cache.workspace import WorkspaceCache

    evicted = evict_target(WorkspaceCache(load_settings()), target_id, force=force, timeout=timeout)
    if as_json:
        _print_json(
            {
                "target_id": target_id,
                "evicted": [{"key": p.key, "kind": p.kind, "bytes": p.bytes} for p in evicted],
                "freed_bytes": sum(p.bytes for p in evicted),
            }
        )
        return
    if not evicted:
        err_console.print(f"nothing indexed for target {target_id}", highlight=False)
    for p in evicted:
        out_console.print(f"evicted {p.key} ({p.kind}, {_size(p.bytes)})", highlight=False)


# --- verify -------------------------------------------------------------------------------
def verify_doc(cache: WorkspaceCache | None, *, repair: bool) -> dict[str, Any]:
    """The document `cache verify --json` prints (forgespace.cache.verify holds the checks and
    the repair policy). ``cache`` None: there is no cache yet (consistent, nothing to check)."""
    from forgespace.cache.verify import VerifyReport, verify_cache

    report = VerifyReport() if cache is None else verify_cache(cache, repair=repair)
    return report.to_dict()


@cache_app.command("verify")
def verify(
    repair: bool = typer.Option(
        False,
        "--repair",
        help="Rebuild the index from disk and re-extract modified shared workspaces.",
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Check the index against the disk and shared workspaces against their manifests.

    Walks every shared workspace (unlike status/ls/gc). Exits 1 when something is wrong and
    was not repaired.
    """
    from forgespace.cache.workspace import WorkspaceCache

    settings = load_settings()
    if repair:
        doc = verify_doc(WorkspaceCache(settings), repair=True)
    elif _existing_cache(settings):
        doc = verify_doc(WorkspaceCache(settings, read_only=True), repair=False)
    else:
        doc = verify_doc(None, repair=False)
    if as_json:
        _print_json(doc)
    else:
        from rich.table import Table

        t = Table(title="cache verify")
        t.add_column("problem")
        t.add_column("where")
        for k in doc["missing_from_index"]:
            t.add_row("on disk, not in the index", k)
        for k in doc["missing_on_disk"]:
            t.add_row("in the index, not on disk", k)
        for line in doc["unsafe"]:
            t.add_row("planted where the cache expects its own entry", line)
        for tid, diffs in doc["modified"].items():
            for d in diffs[:20]:
                t.add_row(f"modified shared workspace of {tid}", d)
            if len(diffs) > 20:
                t.add_row(f"modified shared workspace of {tid}", f"... {len(diffs) - 20} more")
        if t.row_count:
            out_console.print(t)
        for r in doc["repaired"]:
            out_console.print(f"repaired: {r}", highlight=False)
        out_console.print(
            f"{doc['entries_indexed']} indexed, {doc['entries_on_disk']} on disk: "
            + ("consistent" if doc["ok"] else "problems found"),
            highlight=False,
        )
    if not doc["ok"] and not repair:
        # sys.exit, not typer.Exit: main() runs click with standalone_mode=False, which turns
        # typer.Exit into a return value that main() does not pass on.
        sys.exit(1)
