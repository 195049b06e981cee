"""Fleet locality, simulated: where should a shared/copy-on-write run go?

A discrete-event simulation (pure Python, deterministic for a seed) of a worker fleet: hosts
with activity slots and a cache size limit (LRU over unleased entries), targets of Zipf
popularity and log-normal sizes, runs arriving as a Poisson stream. A run downloads its
target unless its host already holds it (one download per host and target, as the shared
and copy-on-write modes do; a second run on the host waits for that download). Policies:

- ``random``: any host with a free slot (what the shared task queue does without locality);
  when none is free, the run waits for the next free slot anywhere.
- ``prefer-holder``: always a host that holds the target (else the target's rendezvous owner),
  waiting there as long as it takes.
- ``holder-if-free``: ``forgespace.temporal.fleet.pick`` (the worker's real policy), taken only
  when the chosen host has a free slot right now, else any host (delay scheduling, wait 0).
- ``delay W``: the same choice, waiting up to W seconds in the chosen host's queue for a slot
  (``FORGESPACE_LOCALITY_WAIT``), then any host: what ``run_in_workspace`` does.

Reported per policy: downloads (and of them: cold = first ever, forced = no host held the
target any more because caches evicted it, misses = some host held it but the run went
elsewhere), bytes stored across the fleet at the end, makespan and queueing delay (arrival to
start) against random placement. Goals: downloads <= 1.2 x distinct targets + forced,
makespan <= 1.1 x random.

    .venv/bin/python bench/locality.py [--plot docs/locality.png]
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table

from forgespace.temporal.fleet import Candidate, pick

MB = 10**6
GB = 10**9


@dataclass(frozen=True)
class Config:
    hosts: int = 20
    slots: int = 32  # FORGESPACE_MAX_CONCURRENT_ACTIVITIES default
    targets: int = 500
    runs: int = 10_000
    zipf: float = 1.0
    load: float = 0.8  # offered work / fleet slots (without download time)
    cache_bytes: int = 25 * GB  # per host
    size_median: float = 300 * MB
    size_sigma: float = 1.0
    work_median: float = 60.0  # seconds of analysis per run
    work_sigma: float = 0.8
    bandwidth: float = 200 * MB  # bytes/s per host from the object store
    seed: int = 1


@dataclass
class Run:
    rid: int
    target: int
    arrival: float
    work: float
    start: float = -1.0
    waiting_at: int | None = None  # host whose queue it waits in (delay policies)


@dataclass
class Host:
    name: str
    slots: int
    limit: int
    free: int = 0
    queue: deque[Run] = field(default_factory=deque)
    cache: OrderedDict[int, int] = field(default_factory=OrderedDict)  # target -> bytes (LRU)
    ready_at: dict[int, float] = field(default_factory=dict)  # target -> download done
    pins: dict[int, int] = field(default_factory=dict)
    bytes: int = 0


@dataclass
class Result:
    policy: str
    downloads: int = 0
    cold: int = 0
    forced: int = 0
    misses: int = 0
    bytes_downloaded: int = 0
    stored_end: int = 0
    stored_peak: int = 0
    makespan: float = 0.0
    delays: list[float] = field(default_factory=list)
    distinct: int = 0

    def delay(self, q: float) -> float:
        xs = sorted(self.delays)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0

    @property
    def mean_delay(self) -> float:
        return sum(self.delays) / len(self.delays) if self.delays else 0.0


def workload(cfg: Config) -> tuple[list[int], list[Run]]:
    """Target sizes and the run stream (the same for every policy)."""
    rng = random.Random(cfg.seed)
    mu = math.log(cfg.size_median)
    sizes = [
        int(min(5 * GB, max(10 * MB, rng.lognormvariate(mu, cfg.size_sigma))))
        for _ in range(cfg.targets)
    ]
    weights = [1.0 / (k + 1) ** cfg.zipf for k in range(cfg.targets)]
    mean_work = cfg.work_median * math.exp(cfg.work_sigma**2 / 2)
    rate = cfg.load * cfg.hosts * cfg.slots / mean_work
    order = list(range(cfg.targets))
    rng.shuffle(order)  # popularity rank is unrelated to size
    t = 0.0
    runs = []
    for rid in range(cfg.runs):
        t += rng.expovariate(rate)
        target = order[rng.choices(range(cfg.targets), weights)[0]]
        work = rng.lognormvariate(math.log(cfg.work_median), cfg.work_sigma)
        runs.append(Run(rid, target, t, work))
    return sizes, runs


def simulate(cfg: Config, policy: str, wait: float = 0.0) -> Result:
    """Run the stream through the fleet under ``policy`` (see the module docstring)."""
    sizes, stream = workload(cfg)
    runs = [Run(r.rid, r.target, r.arrival, r.work) for r in stream]
    rng = random.Random(cfg.seed + 1)
    hosts = [Host(f"host-{i:02d}", cfg.slots, cfg.cache_bytes, cfg.slots) for i in range(cfg.hosts)]
    res = Result(policy if policy != "delay" else f"delay {wait:g}s")
    res.distinct = len({r.target for r in runs})
    anywhere: deque[Run] = deque()  # runs waiting for any free slot
    events: list[tuple[float, int, str, int, int]] = []  # (time, seq, kind, run, host)
    seq = 0
    ever: set[int] = set()
    stored = 0

    def push(t: float, kind: str, rid: int, h: int = -1) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, rid, h))

    def start(run: Run, h: int, now: float) -> None:
        nonlocal stored
        host = hosts[h]
        host.free -= 1
        run.start = now
        run.waiting_at = None
        res.delays.append(now - run.arrival)
        tid = run.target
        if tid in host.cache:
            host.cache.move_to_end(tid)
            begin = max(now, host.ready_at[tid])
        else:
            res.downloads += 1
            res.bytes_downloaded += sizes[tid]
            if tid not in ever:
                res.cold += 1
            elif not any(tid in o.cache for o in hosts):
                res.forced += 1
            else:
                res.misses += 1
            ever.add(tid)
            begin = now + sizes[tid] / cfg.bandwidth
            host.cache[tid] = sizes[tid]
            host.ready_at[tid] = begin
            host.bytes += sizes[tid]
            stored += sizes[tid]
            # LRU eviction of entries no running run leases.
            for old in list(host.cache):
                if host.bytes <= host.limit:
                    break
                if host.pins.get(old, 0) == 0 and old != tid:
                    host.bytes -= host.cache.pop(old)
                    stored -= sizes[old]
            res.stored_peak = max(res.stored_peak, stored)
        host.pins[tid] = host.pins.get(tid, 0) + 1
        push(begin + run.work, "finish", run.rid, h)

    def any_host(run: Run, now: float) -> None:
        free = [i for i, o in enumerate(hosts) if o.free > 0]
        if not free:
            anywhere.append(run)
        elif policy == "random":
            start(run, rng.choice(free), now)
        else:
            # After the wait: the chooser asked again without the busy host picks among
            # hosts with a free slot (a free holder, else the target's next rendezvous owner).
            cands = [Candidate(str(i), run.target in hosts[i].cache, hosts[i].free) for i in free]
            chosen = pick(str(run.target), cands)
            assert chosen is not None
            start(run, int(chosen[0].name), now)

    def preferred(run: Run, *, ignore_free: bool) -> int | None:
        cands = [Candidate(str(i), run.target in o.cache, o.free) for i, o in enumerate(hosts)]
        if ignore_free:
            holders = [c for c in cands if c.holds] or cands
            cands = [Candidate(c.name, c.holds, 1) for c in holders]
        chosen = pick(str(run.target), cands)
        return None if chosen is None else int(chosen[0].name)

    def arrive(run: Run, now: float) -> None:
        if policy == "random":
            any_host(run, now)
            return
        h = preferred(run, ignore_free=policy == "prefer-holder")
        assert h is not None
        if hosts[h].free > 0:
            start(run, h, now)
        elif policy == "prefer-holder" or wait > 0:
            run.waiting_at = h
            hosts[h].queue.append(run)
            if policy != "prefer-holder":
                push(now + wait, "timeout", run.rid)
        else:
            any_host(run, now)

    for run in runs:
        push(run.arrival, "arrive", run.rid)
    last = 0.0
    while events:
        now, _, kind, rid, h = heapq.heappop(events)
        run = runs[rid]
        if kind == "arrive":
            arrive(run, now)
        elif kind == "timeout":
            if run.start < 0 and run.waiting_at is not None:
                hosts[run.waiting_at].queue.remove(run)
                run.waiting_at = None
                any_host(run, now)
        else:  # finish: the slot goes to this host's own queue first, then to anyone waiting
            last = max(last, now)
            host = hosts[h]
            host.free += 1
            host.pins[run.target] -= 1
            nxt = host.queue.popleft() if host.queue else None
            if nxt is None and anywhere:
                nxt = anywhere.popleft()
            if nxt is not None:
                start(nxt, h, now)
    res.makespan = last - runs[0].arrival
    res.stored_end = stored
    return res


def run_all(cfg: Config, wait: float) -> list[Result]:
    return [
        simulate(cfg, "random"),
        simulate(cfg, "prefer-holder"),
        simulate(cfg, "holder-if-free"),
        simulate(cfg, "delay", wait),
    ]


def table(cfg: Config, results: list[Result]) -> str:
    base = results[0]
    rows = []
    for r in results:
        budget = 1.2 * r.distinct + r.forced
        rows.append(
            [
                r.policy,
                f"{r.downloads} ({r.cold}/{r.forced}/{r.misses})",
                f"{r.downloads / r.distinct:.2f}x",
                "yes" if r.downloads <= budget else "no",
                f"{r.stored_end / GB:.0f} GB",
                f"{r.makespan / base.makespan:.3f}x",
                f"{r.mean_delay:.1f} s",
                f"{r.delay(0.95):.1f} s",
            ]
        )
    return print_table(
        f"{cfg.runs} runs of {cfg.targets} Zipf({cfg.zipf}) targets on {cfg.hosts} hosts x "
        f"{cfg.slots} slots, load {cfg.load}, cache {cfg.cache_bytes / GB:.0f} GB per host "
        f"(distinct targets run: {base.distinct})",
        [
            "policy",
            "downloads (cold/forced/miss)",
            "vs distinct",
            "<= 1.2x distinct + forced",
            "stored at end",
            "makespan vs random",
            "mean queueing",
            "p95 queueing",
        ],
        rows,
    )


def plot(
    cfg: Config, results: list[Result], sweep: list[Result], waits: list[float], out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = [r.policy for r in results]
    ax = axes[0]
    ax.bar(names, [r.downloads for r in results], color="#4c72b0")
    distinct = results[0].distinct
    ax.axhline(1.2 * distinct, color="#c44e52", ls="--", label="1.2 x distinct targets")
    ax.set_ylabel("downloads")
    ax.set_title("Downloads per policy")
    ax.legend()
    ax.tick_params(axis="x", rotation=20)
    ax = axes[1]
    x = range(len(results))
    ax.bar([i - 0.2 for i in x], [r.mean_delay for r in results], width=0.4, label="mean")
    ax.bar([i + 0.2 for i in x], [r.delay(0.95) for r in results], width=0.4, label="p95")
    ax.set_xticks(list(x), names, rotation=20)
    ax.set_ylabel("queueing delay (s)")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_title("Queueing delay (arrival to start)")
    ax.legend()
    ax = axes[2]
    ax.plot(waits, [r.downloads for r in sweep], "o-", label="downloads")
    ax.set_xlabel("locality wait W (s)")
    ax.set_ylabel("downloads")
    ax2 = ax.twinx()
    ax2.plot(waits, [r.delay(0.95) for r in sweep], "s--", color="#dd8452", label="p95 queueing")
    ax2.set_ylabel("p95 queueing delay (s)")
    ax.set_title("Delay scheduling: the wait")
    ax.legend(loc="upper center")
    ax2.legend(loc="center right")
    fig.suptitle(
        f"{cfg.runs} runs, {cfg.targets} Zipf targets, {cfg.hosts} hosts x {cfg.slots} slots "
        f"(seed {cfg.seed}; bench/locality.py)"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"plot written to {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hosts", type=int, default=20)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--targets", type=int, default=500)
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--load", type=float, default=0.8)
    ap.add_argument("--cache-gb", type=float, default=25.0)
    ap.add_argument("--wait", type=float, default=5.0, help="delay scheduling wait (s)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--plot", type=Path, default=None, help="write the PNG here")
    a = ap.parse_args()
    cfg = Config(
        hosts=a.hosts,
        slots=a.slots,
        targets=a.targets,
        runs=a.runs,
        zipf=a.zipf,
        load=a.load,
        cache_bytes=int(a.cache_gb * GB),
        seed=a.seed,
    )
    results = run_all(cfg, a.wait)
    table(cfg, results)
    base, delay = results[0], results[-1]
    ok_dl = delay.downloads <= 1.2 * delay.distinct + delay.forced
    ok_ms = delay.makespan <= 1.1 * base.makespan
    print(
        f"goals for {delay.policy}: downloads {delay.downloads} <= 1.2 x {delay.distinct} + "
        f"{delay.forced} forced: {'met' if ok_dl else 'MISSED'}; makespan "
        f"{delay.makespan / base.makespan:.3f}x random <= 1.1x: {'met' if ok_ms else 'MISSED'}"
    )
    if a.plot is not None:
        waits = [0.0, 1.0, 3.0, 10.0, 30.0, 100.0]
        sweep = [simulate(cfg, "delay", w) if w else simulate(cfg, "holder-if-free") for w in waits]
        plot(cfg, results, sweep, waits, a.plot)


if __name__ == "__main__":
    main()
