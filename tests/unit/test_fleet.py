"""Fleet locality without a server: the choice policy, advertisements, the setting, the store's
result listing that carries them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from forgespace.config import Settings
from forgespace.errors import ConfigError
from forgespace.storage.local import LocalStore
from forgespace.temporal.fleet import (
    STALE_AFTER,
    Candidate,
    HostAd,
    advertisement_key,
    choose,
    pick,
    read_ads,
    rendezvous_weight,
)


def ad(
    queue: str, *, holds: Sequence[str] = (), busy: int = 0, age: float = 0.0, **kw: Any
) -> HostAd:
    return HostAd(
        host=queue.split("@")[1],
        task_queue="q",
        host_queue=queue,
        updated=1000.0 - age,
        slots=4,
        busy=busy,
        holds={"shared": list(holds), "copy-on-write": []},
        **kw,
    )


def test_a_holder_with_a_free_slot_wins_over_hosts_that_would_download() -> None:
    cands = [Candidate("a", False, 4), Candidate("b", True, 1), Candidate("c", False, 4)]
    assert pick("t1", cands) == (cands[1], "holder")


def test_among_free_holders_the_least_busy_wins() -> None:
    cands = [Candidate("a", True, 1), Candidate("b", True, 3)]
    assert pick("t1", cands) == (cands[1], "holder")


def test_busy_holders_are_still_preferred_so_the_run_waits_for_one() -> None:
    cands = [Candidate("a", True, 0), Candidate("b", False, 4)]
    assert pick("t1", cands) == (cands[0], "holder-busy")


def test_an_unheld_target_goes_to_its_rendezvous_owner_whoever_asks() -> None:
    names = [f"h{i}" for i in range(10)]
    owner = max(names, key=lambda n: rendezvous_weight("t9", n))
    # Same owner in any order of candidates, so concurrent first runs meet on one host.
    for order in (names, list(reversed(names))):
        chosen = pick("t9", [Candidate(n, False, 2) for n in order])
        assert chosen is not None
        assert chosen == (Candidate(owner, False, 2), "owner")
    # A busy owner hands the target to the next host in the target's own ranking.
    cands = [Candidate(n, False, 0 if n == owner else 2) for n in names]
    second = max((n for n in names if n != owner), key=lambda n: rendezvous_weight("t9", n))
    assert pick("t9", cands) == (Candidate(second, False, 2), "owner")
    assert pick("t9", [Candidate(n, False, 0) for n in names]) == (
        Candidate(owner, False, 0),
        "owner-busy",
    )
    assert pick("t9", []) is None


def test_stale_and_stopped_hosts_are_never_chosen() -> None:
    ads = [
        ad("q@old", holds=["t"], age=STALE_AFTER + 1),
        ad("q@gone", holds=["t"], state="stopped"),
        ad("q@live"),
    ]
    chosen = choose(ads, "t", "shared", now=1000.0)
    assert chosen is not None and chosen[0].host_queue == "q@live"
    assert chosen[1] == "owner"
    assert choose(ads[:2], "t", "shared", now=1000.0) is None


def test_holding_counts_per_mode() -> None:
    a = ad("q@a", holds=["t"])
    assert a.holds_target("t", "shared")
    assert not a.holds_target("t", "copy-on-write")
    assert choose([a, ad("q@b")], "t", "copy-on-write", 1000.0) is not None


def test_advertisements_round_trip_and_broken_ones_are_skipped(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    a = ad("q@a", holds=["t1", "t2"], busy=1)
    store.put_result(advertisement_key(a.host_queue), a.to_json())
    store.put_result(advertisement_key("q@broken"), b"{not json")
    store.put_result(advertisement_key("other@c"), ad("other@c").to_json())
    assert read_ads(store, "q") == [a]
    assert a.free_slots == 3
    assert {x.host_queue for x in read_ads(store)} == {"q@a", "other@c"}
    with pytest.raises(ValueError, match="not a forgespace host advertisement"):
        HostAd.from_json(b'{"host": "x"}')


def test_local_store_lists_results_in_one_folder(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    assert store.result_keys("fleet/") == []  # nothing stored yet: empty, no error
    store.put_result("fleet/a.json", b"1")
    store.put_result("fleet/b.json", b"2")
    store.put_result("fleet/sub/c.json", b"3")
    store.put_result("wf-1/results.json", b"4")
    assert store.result_keys("fleet/") == ["fleet/a.json", "fleet/b.json"]
    assert store.result_keys("fleet/a") == ["fleet/a.json"]
    assert store.get_result("fleet/b.json") == b"2"
    with pytest.raises(FileNotFoundError):
        store.get_result("fleet/zzz.json")
    with pytest.raises(ValueError, match="invalid result key"):
        store.get_result("../escape")


@pytest.mark.parametrize(
    ("value", "seconds"), [("5s", 5.0), ("30", 30.0), ("1.5m", 90.0), ("off", 0.0), ("0", 0.0)]
)
def test_locality_wait_setting(value: str, seconds: float) -> None:
    s = Settings.from_env({"FORGESPACE_LOCALITY_WAIT": value, "HOME": "/nonexistent"})
    assert s.locality_wait == seconds


def test_locality_wait_default_and_bad_value() -> None:
    assert Settings.from_env({"HOME": "/nonexistent"}).locality_wait == 5.0
    with pytest.raises(ConfigError, match=r"FORGESPACE_LOCALITY_WAIT 'soon'.*off"):
        Settings.from_env({"FORGESPACE_LOCALITY_WAIT": "soon", "HOME": "/nonexistent"})


def test_reading_ads_skips_what_is_not_one_of_the_queues_advertisements(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LocalStore(tmp_path / "store")
    a = ad("q@a")
    store.put_result(advertisement_key(a.host_queue), a.to_json())
    store.put_result("fleet/q@notes.txt", b"not an advertisement")  # no .json: not read
    store.put_result(advertisement_key("q@list"), b"[1, 2]")
    # Filed under the queue's prefix, but the host says it polls another queue.
    other = dataclasses.replace(a, host="m", host_queue="q@moved", task_queue="qq")
    store.put_result(advertisement_key(other.host_queue), other.to_json())
    assert read_ads(store, "q") == [a]
    assert "skipping host advertisement fleet/q@list.json" in caplog.text
    assert "not a JSON object" in caplog.text
    assert "q@notes" not in caplog.text


def test_choose_host_says_why_it_has_no_preference(tmp_path: Path) -> None:
    import asyncio
    import time

    from forgespace.temporal.fleet import FleetActivities, FleetView

    store = LocalStore(tmp_path / "store")
    settings = Settings.from_env(
        {"CACHE_DIR": str(tmp_path / "cache"), "STORAGE_DIR": str(tmp_path / "store")}
    )
    acts = FleetActivities(FleetView(store, "q", ttl=0), settings, host_queue="q@me")

    def choose_host(tid: str, mode: str, exclude: list[str] | None = None) -> Any:
        return asyncio.run(acts.choose_host(tid, mode, exclude))

    iso = choose_host("t1", "isolated")
    assert (iso.task_queue, iso.reason, iso.fallback_queue) == (
        None,
        "isolated runs download per run",
        "q@me",
    )
    assert choose_host("t1", "shared").reason == "no live host advertised"
    now = time.time()
    for host_queue, busy in (("q@busy", 1), ("q@free", 0)):
        holder = HostAd(
            host=host_queue.split("@")[1], task_queue="q", host_queue=host_queue, updated=now,
            slots=1, busy=busy, holds={"shared": ["t1"], "copy-on-write": []},
        )  # fmt: skip
        store.put_result(advertisement_key(host_queue), holder.to_json())
    best = choose_host("t1", "shared")
    assert (best.task_queue, best.reason, best.wait_seconds) == ("q@free", "holder", 5.0)
    # The free holder did not start it in time: the run has waited once, so a busy one is
    # not worth another wait.
    again = choose_host("t1", "shared", ["q@free"])
    assert (again.task_queue, again.reason) == (None, "every other host is busy")
