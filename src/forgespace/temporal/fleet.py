"""Fleet locality: each worker host advertises what it holds; runs go where their target is.

With several worker hosts on one task queue, a shared or copy-on-write run used to land on
whichever host polled first, so every host ended up downloading and storing every popular
target. Here each host *advertises* and each run *chooses*:

- **Advertisement** (``HostAd``): a small JSON document per host in the object store the fleet
  already shares, at result key ``fleet/{host_queue}.json`` (S3: in ``S3_RESULTS_BUCKET``;
  local backend: ``{STORAGE_DIR}/.results/fleet/``). It lists the targets whose shared
  (``{tid}/workspace``) or copy-on-write (``{tid}/shared``) workspace the host's cache holds,
  its activity slots and how many are busy, and when it was written. ``FleetAdvertiser``
  rewrites it every ``ADVERTISE_INTERVAL`` seconds and soon after an activity of the host
  queue starts or ends (a new download is advertised within about a second), and marks it
  ``stopped`` on a graceful shutdown.
  Why the object store rather than Temporal: every worker already holds its credentials and
  writes results there; one small PUT per change costs the Temporal cluster nothing (no
  workflow histories growing with every update, no visibility lag, no query that needs a
  worker to answer); a reader needs one LIST and one GET per host; and operators can read the
  fleet's state with any S3 client or ``forgespace fleet status`` without Temporal.
- **Choice** (``choose``, run by the ``forgespace_choose_host`` activity on the shared queue:
  workflow code does no I/O, so the choice arrives as an activity result and replays
  deterministically): among live hosts (advertisement fresher than ``STALE_AFTER`` and not
  stopped) prefer one that holds the target for the run's mode and has a free slot (the one
  with most free slots); else the busy holder; a target nobody holds goes to its rendezvous
  owner (the live host with the highest hash of target and queue, among those with a free
  slot), so concurrent first runs of a new target meet on one host instead of each
  downloading it.
- **Delay scheduling** (Zaharia et al., EuroSys 2010): the workflow starts its download on the
  chosen host's queue with a schedule-to-start timeout of ``FORGESPACE_LOCALITY_WAIT``
  (``Settings.locality_wait``, default 5 s). A busy holder that frees a slot in that time
  serves it; otherwise (still busy, or gone: its queue has no poller) nothing was taken
  there, and the run goes to any host through the shared queue, as without locality. So a
  stale advertisement costs at most the wait and one extra download, never a failed run.
  ``FORGESPACE_LOCALITY_WAIT=off`` (or ``0``) turns locality off: every run goes to any host.

Isolated runs download per run whatever the host, so they never ask.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from temporalio import activity
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

from forgespace.layout import IsolationMode, validate_id
from forgespace.temporal.api import CHOOSE_HOST_ACTIVITY, HostChoice

if TYPE_CHECKING:
    from forgespace.cache.workspace import WorkspaceCache
    from forgespace.config import Settings
    from forgespace.storage.base import Store

__all__ = [
    "ADVERTISE_INTERVAL",
    "ADVERTISE_PREFIX",
    "STALE_AFTER",
    "Candidate",
    "FleetActivities",
    "FleetAdvertiser",
    "FleetView",
    "HostAd",
    "SlotCountingInterceptor",
    "advertisement_key",
    "build_ad",
    "choose",
    "pick",
    "read_ads",
    "rendezvous_weight",
]

log = logging.getLogger(__name__)

ADVERTISE_PREFIX = "fleet/"
#: Seconds between two advertisements of an idle host.
ADVERTISE_INTERVAL = 5.0
#: An advertisement older than this is a host presumed gone (four missed rewrites).
STALE_AFTER = 4 * ADVERTISE_INTERVAL
#: How long one process reuses the fleet's advertisements before reading them again.
VIEW_TTL = 1.0
#: Smallest gap between two rewrites of a busy host's advertisement.
MIN_PUBLISH_GAP = 0.5
# Index entry kinds that make a host a holder, per run mode.
_KIND_OF_MODE = {
    IsolationMode.SHARED.value: "shared",
    IsolationMode.COPY_ON_WRITE.value: "cow-shared",
}


def advertisement_key(host_queue: str) -> str:
    """Result key of a host's advertisement: ``fleet/{host_queue}.json``."""
    return f"{ADVERTISE_PREFIX}{host_queue}.json"


@dataclass(frozen=True)
class HostAd:
    """What one worker host tells the fleet (the JSON document at ``advertisement_key``).

    ``holds`` maps a run mode (``shared``, ``copy-on-write``) to the target ids whose workspace
    of that mode the host's cache holds. ``updated`` is the writer's wall clock (seconds).
    """

    host: str
    task_queue: str
    host_queue: str
    updated: float
    slots: int
    busy: int
    state: str = "serving"  # "serving" | "stopped"
    holds: dict[str, list[str]] = field(default_factory=dict)
    cache_bytes: int = 0
    limit_bytes: int = 0
    downloads: int = 0
    hits: int = 0
    bytes_downloaded: int = 0

    @property
    def free_slots(self) -> int:
        return max(0, self.slots - self.busy)

    def age(self, now: float) -> float:
        return max(0.0, now - self.updated)

    def live(self, now: float, stale_after: float = STALE_AFTER) -> bool:
        """Serving, and written recently enough to trust."""
        return self.state == "serving" and self.age(now) <= stale_after

    def holds_target(self, target_id: str, mode: str) -> bool:
        return target_id in self.holds.get(mode, ())

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> HostAd:
        """Parse an advertisement; ValueError naming what is wrong."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise TypeError("not a JSON object")
            holds = {str(m): [str(t) for t in ids] for m, ids in dict(doc["holds"]).items()}
            return cls(
                host=str(doc["host"]),
                task_queue=str(doc["task_queue"]),
                host_queue=str(doc["host_queue"]),
                updated=float(doc["updated"]),
                slots=int(doc["slots"]),
                busy=int(doc["busy"]),
                state=str(doc.get("state", "serving")),
                holds=holds,
                cache_bytes=int(doc.get("cache_bytes", 0)),
                limit_bytes=int(doc.get("limit_bytes", 0)),
                downloads=int(doc.get("downloads", 0)),
                hits=int(doc.get("hits", 0)),
                bytes_downloaded=int(doc.get("bytes_downloaded", 0)),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"not a forgespace host advertisement: {exc}") from exc


# --- the policy (pure: the simulation in bench/locality.py runs this very code) -------------
@dataclass(frozen=True)
class Candidate:
    """One host as the policy sees it: its name, whether it holds the target, free slots."""

    name: str
    holds: bool
    free: int


def rendezvous_weight(target_id: str, name: str) -> int:
    """Highest-random-weight hashing: the host with the largest weight for a target owns it.
    Every chooser computes the same owner, and a host leaving moves only its own targets."""
    digest = hashlib.sha256(f"{target_id}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def pick(target_id: str, candidates: Sequence[Candidate]) -> tuple[Candidate, str] | None:
    """The preferred host for a run of ``target_id`` and why, or None without candidates.

    Reasons: ``holder`` (holds it, has a free slot; the one with most free slots), ``holder-busy``
    (every holder is busy: worth a short wait), ``owner`` (nobody holds it: the rendezvous owner
    among hosts with a free slot), ``owner-busy`` (nobody holds it and every host is busy).
    """
    if not candidates:
        return None
    holders = [c for c in candidates if c.holds]
    pool = holders or list(candidates)
    free = [c for c in pool if c.free > 0]
    if holders:
        if free:
            best = max(free, key=lambda c: (c.free, rendezvous_weight(target_id, c.name)))
            return best, "holder"
        return max(holders, key=lambda c: rendezvous_weight(target_id, c.name)), "holder-busy"
    best = max(free or pool, key=lambda c: rendezvous_weight(target_id, c.name))
    return best, "owner" if free else "owner-busy"


def choose(
    ads: Sequence[HostAd],
    target_id: str,
    mode: str,
    now: float,
    *,
    stale_after: float = STALE_AFTER,
) -> tuple[HostAd, str] | None:
    """``pick`` over the live advertisements (None when no host is live)."""
    live = {a.host_queue: a for a in ads if a.live(now, stale_after)}
    chosen = pick(
        target_id,
        [Candidate(q, a.holds_target(target_id, mode), a.free_slots) for q, a in live.items()],
    )
    if chosen is None:
        return None
    return live[chosen[0].name], chosen[1]


# --- advertising -----------------------------------------------------------------------------
def build_ad(
    cache: WorkspaceCache,
    *,
    host: str,
    task_queue: str,
    host_queue: str,
    slots: int,
    busy: int,
    state: str = "serving",
    now: float | None = None,
) -> HostAd:
    """This host's advertisement, read from its cache index (no file walk)."""
    holds: dict[str, list[str]] = {mode: [] for mode in _KIND_OF_MODE}
    total = 0
    for e in cache.index.entries():
        total += e.bytes
        for mode, kind in _KIND_OF_MODE.items():
            if e.kind == kind:
                holds[mode].append(e.target_id)
    counters = cache.index.counters()
    return HostAd(
        host=host,
        task_queue=task_queue,
        host_queue=host_queue,
        updated=time.time() if now is None else now,
        slots=slots,
        busy=busy,
        state=state,
        holds={m: sorted(set(ids)) for m, ids in holds.items()},
        cache_bytes=total,
        limit_bytes=cache.settings.cache_max_size,
        downloads=counters.get("downloads", 0),
        hits=counters.get("hits", 0),
        bytes_downloaded=counters.get("bytes_downloaded", 0),
    )


def read_ads(store: Store, task_queue: str | None = None) -> list[HostAd]:
    """Every advertisement in the store (of hosts polling ``task_queue``, when given).

    One that cannot be read or parsed is skipped with a warning: a broken document never
    stops a choice (its host is simply not preferred)."""
    prefix = f"{ADVERTISE_PREFIX}{task_queue}@" if task_queue else ADVERTISE_PREFIX
    ads: list[HostAd] = []
    for key in store.result_keys(prefix):
        if not key.endswith(".json"):
            continue
        try:
            ad = HostAd.from_json(store.get_result(key))
        except FileNotFoundError:
            continue  # removed between the list and the read
        except ValueError as exc:
            log.warning("skipping host advertisement %s: %s", key, exc)
            continue
        if task_queue is None or ad.task_queue == task_queue:
            ads.append(ad)
    return ads


class FleetAdvertiser:
    """Keeps this host's advertisement current (see the module docstring).

    ``started``/``finished`` are called on the worker's event loop by
    ``SlotCountingInterceptor`` around every activity of the host queue.
    """

    def __init__(
        self,
        cache: WorkspaceCache,
        store: Store,
        *,
        host: str,
        task_queue: str,
        host_queue: str,
        slots: int,
        interval: float = ADVERTISE_INTERVAL,
    ) -> None:
        self.cache = cache
        self.store = store
        self.host = host
        self.task_queue = task_queue
        self.host_queue = host_queue
        self.slots = slots
        self.interval = interval
        self.busy = 0
        self._dirty = asyncio.Event()
        self._warned = False

    def started(self) -> None:
        self.busy += 1
        self._dirty.set()

    def finished(self) -> None:
        self.busy = max(0, self.busy - 1)
        self._dirty.set()

    def publish(self, state: str = "serving") -> HostAd:
        """Build and write the advertisement now (blocking: call from a thread)."""
        ad = build_ad(
            self.cache,
            host=self.host,
            task_queue=self.task_queue,
            host_queue=self.host_queue,
            slots=self.slots,
            busy=self.busy if state == "serving" else 0,
            state=state,
        )
        self.store.put_result(advertisement_key(self.host_queue), ad.to_json())
        return ad

    async def _publish(self, state: str = "serving") -> None:
        try:
            await asyncio.to_thread(self.publish, state)
            self._warned = False
        except Exception as exc:
            # Without an advertisement runs still work (they go to any host): warn once.
            if not self._warned:
                log.warning("cannot publish this host's fleet advertisement: %s", exc)
                self._warned = True

    async def run(self, stop: asyncio.Event) -> None:
        """Advertise until ``stop`` is set, then advertise ``stopped``."""
        try:
            while not stop.is_set():
                self._dirty.clear()
                await self._publish()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._dirty.wait(), timeout=self.interval)
                # Coalesce a burst of activity starts and ends into one rewrite.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=MIN_PUBLISH_GAP)
        finally:
            await self._publish("stopped")


class SlotCountingInterceptor(Interceptor):
    """Counts the host queue's running activities for the advertisement's free slots."""

    def __init__(self, advertiser: FleetAdvertiser) -> None:
        self.advertiser = advertiser

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Counting(next, self.advertiser)


class _Counting(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, advertiser: FleetAdvertiser) -> None:
        super().__init__(next)
        self._advertiser = advertiser

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        self._advertiser.started()
        try:
            return await self.next.execute_activity(input)
        finally:
            self._advertiser.finished()


# --- choosing (the activity) ----------------------------------------------------------------
class FleetView:
    """The fleet's advertisements as one process sees them, re-read at most every ``ttl``."""

    def __init__(self, store: Store, task_queue: str, ttl: float = VIEW_TTL) -> None:
        self.store = store
        self.task_queue = task_queue
        self.ttl = ttl
        self._lock = threading.Lock()
        self._ads: list[HostAd] = []
        self._read_at = float("-inf")

    def ads(self) -> list[HostAd]:
        """Blocking (store I/O): call from a thread."""
        with self._lock:
            if time.monotonic() - self._read_at >= self.ttl:
                self._ads = read_ads(self.store, self.task_queue)
                self._read_at = time.monotonic()
            return list(self._ads)


class FleetActivities:
    """The ``forgespace_choose_host`` activity of one worker process (runs on the shared queue)."""

    def __init__(self, view: FleetView, settings: Settings, *, host_queue: str) -> None:
        self.view = view
        self.settings = settings
        self.host_queue = host_queue

    def activities(self) -> list[Any]:
        return [self.choose_host]

    @activity.defn(name=CHOOSE_HOST_ACTIVITY)
    async def choose_host(
        self, target_id: str, workspace_isolation: str, exclude: list[str] | None = None
    ) -> HostChoice:
        """Where a run of ``target_id`` in ``workspace_isolation`` mode should download.

        ``exclude``: host queues already tried that did not start the download within the
        wait; with any, only a host advertising a free slot is preferred (the run has waited
        once already). ``task_queue`` None means no preference (locality off, an isolated run,
        no live host advertised, or the advertisements could not be read): use
        ``fallback_queue``, this worker's own host queue, as the shared queue's first poller
        would have given it.
        """

        def none(reason: str) -> HostChoice:
            return HostChoice(None, None, 0.0, reason, self.host_queue)

        try:
            validate_id(target_id, "target_id")
            mode = IsolationMode.parse(workspace_isolation).value
        except ValueError as exc:
            # The download itself reports bad input (as a non-retryable error), as before.
            return none(f"invalid request: {exc}")
        wait = self.settings.locality_wait

        if wait <= 0:
            return none("locality off")
        if mode == IsolationMode.ISOLATED.value:
            return none("isolated runs download per run")
        try:
            ads = await asyncio.to_thread(self.view.ads)
        except Exception as exc:  # the store is down: place the run anywhere, never fail it
            log.warning("fleet advertisements unreadable (%s): run goes to any host", exc)
            return none(f"advertisements unreadable: {exc}")
        skip = set(exclude or ())
        chosen = choose([a for a in ads if a.host_queue not in skip], target_id, mode, time.time())
        if chosen is None:
            return none("no live host advertised")
        ad, reason = chosen
        if skip and reason.endswith("-busy"):
            return none("every other host is busy")
        return HostChoice(ad.host_queue, ad.host, wait, reason, self.host_queue)
