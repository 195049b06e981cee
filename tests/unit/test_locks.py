"""Per-target flock helper and owner tokens: across processes, threads, and after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from forgespace.cache.locks import flock
from forgespace.cache.staging import (
    OwnerToken,
    owner_is_dead,
    parse_staging_name,
    remove_dead_owner,
    staging_name,
)
from forgespace.errors import LockTimeoutError

HOLD = """
import sys, time
from pathlib import Path
from forgespace.cache.locks import flock
with flock(Path(sys.argv[1]), exclusive=sys.argv[2] == "ex", what="target T", purpose="test"):
    print("HELD", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def _holder(lock: Path, mode: str = "ex", seconds: float = 30) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock), mode, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "HELD"
    return p


def test_timeout_names_target_and_holder_process(tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "T.lock"
    p = _holder(lock)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockTimeoutError) as ei, flock(lock, timeout=0.3, what="target T"):
            pass
        assert 0.25 <= time.monotonic() - t0 < 3
        msg = str(ei.value)
        assert "target T" in msg and f"pid {p.pid}" in msg and "0.3s" in msg
        assert ei.value.lock_path == str(lock)
        # shared waiters are refused by an exclusive holder as well
        with pytest.raises(LockTimeoutError), flock(lock, exclusive=False, timeout=0.1):
            pass
    finally:
        p.kill()
        p.wait()


def test_non_blocking_fails_at_once_and_lock_freed_when_holder_killed(tmp_path: Path) -> None:
    lock = tmp_path / "T.lock"
    p = _holder(lock)
    t0 = time.monotonic()
    with pytest.raises(LockTimeoutError), flock(lock, blocking=False, what="target T"):
        pass
    # A blocking call would wait for the holder (30 s): far below that means it did not wait.
    assert time.monotonic() - t0 < 10
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    # the kernel released the dead holder's lock; the stale holder text is harmless
    with flock(lock, timeout=2):
        pass
    assert lock.exists(), "lock files are never deleted"
    assert lock.read_text() == "", "holder info is cleared on release"


def test_shared_holders_coexist_and_block_exclusive(tmp_path: Path) -> None:
    lock = tmp_path / "T.lock"
    p = _holder(lock, "sh")
    try:
        with flock(lock, exclusive=False, timeout=1):
            pass  # a second shared holder gets in
        with pytest.raises(LockTimeoutError) as ei, flock(lock, timeout=0.2, what="target T"):
            pass
        assert "shared holders" in str(ei.value)
    finally:
        p.kill()
        p.wait()


def test_threads_of_one_process_exclude_each_other(tmp_path: Path) -> None:
    lock = tmp_path / "T.lock"
    inside = 0
    overlaps = 0
    guard = threading.Lock()

    def worker() -> None:
        nonlocal inside, overlaps
        for _ in range(20):
            with flock(lock, timeout=10):
                with guard:
                    inside += 1
                    overlaps += inside > 1
                time.sleep(0.001)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == 0


OWNER = """
import sys, time
from pathlib import Path
from forgespace.cache.staging import OwnerToken
print(OwnerToken.for_dir(Path(sys.argv[1])).token, flush=True)
time.sleep(30)
"""


def test_owner_token_alive_then_dead_after_sigkill(tmp_path: Path) -> None:
    owners = tmp_path / "owners"
    p = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(owners)], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None
    token = p.stdout.readline().strip()
    assert token.startswith(f"{p.pid}-")
    assert not owner_is_dead(owners, token)
    remove_dead_owner(owners, token)
    assert (owners / f"{token}.lock").exists(), "a live owner's lock is never removed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert owner_is_dead(owners, token)
    remove_dead_owner(owners, token)
    assert not (owners / f"{token}.lock").exists()
    assert owner_is_dead(owners, "no-such-token")
    mine = OwnerToken.for_dir(owners)
    assert not owner_is_dead(owners, mine.token)
    assert OwnerToken.for_dir(owners) is mine


def test_staging_names_round_trip_even_with_dotted_ids() -> None:
    name = staging_name("my.target-1", "run-r.2", "123-abcdefabcdef", "0a1b2c3d")
    assert parse_staging_name(name) == ("my.target-1", "run-r.2", "123-abcdefabcdef")
    assert parse_staging_name("random-dir") is None
    assert parse_staging_name("a~b~c") is None


def test_a_wait_that_timed_out_never_keeps_the_lock(tmp_path: Path) -> None:
    """A waiter that gave up leaves a blocked helper behind (locks._Grant): once the holder
    releases, that helper must hand the lock straight back, never keep it."""
    lock = tmp_path / "T.lock"
    p = _holder(lock, seconds=0.5)
    with pytest.raises(LockTimeoutError), flock(lock, timeout=0.05, what="target T"):
        pass
    p.wait(30)
    # the holder is gone: the lock is free within the helper's hand-back, then stays free
    with flock(lock, timeout=10, what="target T"):
        pass
    with flock(lock, blocking=False, what="target T"):
        pass


def test_blocked_waiters_of_every_mode_get_the_lock_when_it_is_released(tmp_path: Path) -> None:
    lock = tmp_path / "T.lock"
    p = _holder(lock, seconds=0.3)
    got: list[str] = []

    def wait(mode: str) -> None:
        with flock(lock, exclusive=mode == "ex", timeout=30, what="target T"):
            got.append(mode)

    threads = [threading.Thread(target=wait, args=(m,)) for m in ("sh", "sh", "ex")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    p.wait(30)
    assert sorted(got) == ["ex", "sh", "sh"]
