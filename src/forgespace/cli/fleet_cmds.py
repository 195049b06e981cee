"""`forgespace fleet status`: which worker host holds what, free slots, downloads saved.

Reads the hosts' advertisements from the object store the fleet shares (the same documents
the workers choose hosts with; see ``forgespace.temporal.fleet``), so it needs the store's
settings (STORAGE_BACKEND, S3_*) and nothing else: no Temporal connection, no cache.
``--json`` prints one document on stdout (shape in docs/operations.md).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from forgespace.cli.app import app, load_settings, out_console

if TYPE_CHECKING:
    from rich.table import Table

    from forgespace.temporal.fleet import HostAd

fleet_app = typer.Typer(help="See the worker fleet: who holds which targets.", no_args_is_help=True)
app.add_typer(fleet_app, name="fleet")


def _host_doc(ad: HostAd, now: float) -> dict[str, Any]:
    return {
        "host": ad.host,
        "host_queue": ad.host_queue,
        "task_queue": ad.task_queue,
        "state": ad.state,
        "live": ad.live(now),
        "age_seconds": round(ad.age(now), 3),
        "slots": ad.slots,
        "busy": ad.busy,
        "free_slots": ad.free_slots if ad.live(now) else 0,
        "holds": ad.holds,
        "cache_bytes": ad.cache_bytes,
        "limit_bytes": ad.limit_bytes,
        "downloads": ad.downloads,
        "hits": ad.hits,
        "bytes_downloaded": ad.bytes_downloaded,
    }


def fleet_doc(ads: list[HostAd], now: float) -> dict[str, Any]:
    """The document `fleet status --json` prints."""
    hosts = [_host_doc(a, now) for a in sorted(ads, key=lambda a: (a.task_queue, a.host))]
    held: dict[str, dict[str, list[str]]] = {}
    for h in hosts:
        if not h["live"]:
            continue
        for mode, ids in h["holds"].items():
            for tid in ids:
                held.setdefault(tid, {}).setdefault(mode, []).append(h["host"])
    copies = sum(len(hs) for modes in held.values() for hs in modes.values())
    return {
        "hosts": hosts,
        "targets": held,
        "totals": {
            "hosts": len(hosts),
            "live_hosts": sum(1 for h in hosts if h["live"]),
            "free_slots": sum(h["free_slots"] for h in hosts),
            "targets": len(held),
            "copies": copies,
            "downloads": sum(h["downloads"] for h in hosts),
            # Every cache hit on a host is a download that did not happen.
            "downloads_saved": sum(h["hits"] for h in hosts),
        },
    }


@fleet_app.command("status")
def status(
    task_queue: Annotated[
        str | None,
        typer.Option("--task-queue", help="Only the hosts polling this shared task queue."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
) -> None:
    """Each host's state, free slots, cache use and targets held, from its advertisement."""
    from forgespace.extras import require_extra

    require_extra("temporal", "forgespace fleet status")
    from forgespace.storage import open_store
    from forgespace.temporal.fleet import read_ads

    settings = load_settings()
    now = time.time()
    doc = fleet_doc(read_ads(open_store(settings), task_queue), now)
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    if not doc["hosts"]:
        out_console.print(
            "no host has advertised yet (workers write fleet/<host queue>.json to the store "
            "every few seconds; are they using this store?)"
        )
        return
    out_console.print(_hosts_table(doc["hosts"]))
    out_console.print(_targets_table(doc["targets"]))
    tot = doc["totals"]
    out_console.print(
        f"{tot['live_hosts']} of {tot['hosts']} host(s) live, {tot['free_slots']} free slot(s); "
        f"{tot['targets']} target(s) in {tot['copies']} cop(ies); "
        f"{tot['downloads']} download(s), {tot['downloads_saved']} saved by cache hits"
    )


def _hosts_table(hosts: list[dict[str, Any]]) -> Table:
    """One row per host of ``fleet_doc``'s ``hosts``."""
    from rich.table import Table

    from forgespace.cli.cache_cmds import _age, _size

    t = Table(title="forgespace fleet")
    for col in ("host", "task queue", "state", "seen", "free slots", "held", "cache", "downloads"):
        t.add_column(col)
    t.add_column("hits (downloads saved)")
    for h in hosts:
        held = sum(len(ids) for ids in h["holds"].values())
        state = h["state"] if h["live"] or h["state"] != "serving" else "stale"
        t.add_row(
            h["host"],
            h["task_queue"],
            state,
            f"{_age(h['age_seconds'])} ago",
            f"{h['free_slots']}/{h['slots']}",
            str(held),
            f"{_size(h['cache_bytes'])} of {_size(h['limit_bytes'])}",
            str(h["downloads"]),
            str(h["hits"]),
        )
    return t


def _targets_table(targets: dict[str, dict[str, list[str]]]) -> Table:
    """Which live hosts hold each target, per mode (``fleet_doc``'s ``targets``)."""
    from rich.table import Table

    tt = Table(title="targets held by live hosts")
    tt.add_column("target")
    tt.add_column("shared on")
    tt.add_column("copy-on-write on")
    for tid, modes in sorted(targets.items()):
        tt.add_row(
            tid,
            ", ".join(modes.get("shared", [])) or "-",
            ", ".join(modes.get("copy-on-write", [])) or "-",
        )
    return tt
