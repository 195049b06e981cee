"""Ages and durations as the cache commands print them: words, not "1.3m"."""

from __future__ import annotations

import pytest

from forgespace.cli.cache_cmds import ago, duration_words

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (0.4, "just now"),
        (1, "1 second ago"),
        (59, "59 seconds ago"),
        (60, "1 minute ago"),
        (3 * 60 + 50, "3 minutes ago"),
        (7200, "2 hours ago"),
        (86400 * 3, "3 days ago"),
        (604800 * 2 + 5, "2 weeks ago"),
        (-120, "2 minutes from now"),  # a clock that moved backwards: still readable
    ],
)
def test_ago_uses_whole_units_in_words(seconds: float, words: str) -> None:
    assert ago(NOW - seconds, now=NOW) == words


@pytest.mark.parametrize(
    ("seconds", "words"),
    [(1800, "30 minutes"), (86400, "1 day"), (604800, "1 week"), (5, "5 seconds")],
)
def test_policy_durations(seconds: float, words: str) -> None:
    assert duration_words(seconds) == words
