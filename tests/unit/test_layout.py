from __future__ import annotations

from pathlib import Path

import pytest

from forgespace import ForgespaceError, IsolationMode
from forgespace.errors import InvalidIdError, InvalidModeError
from forgespace.layout import CacheLayout, is_valid_id, validate_id


@pytest.mark.parametrize("mode", ["isolated", "shared", "copy-on-write"])
def test_modes_accept_exactly_three_values(mode):
    assert IsolationMode.parse(mode).value == mode
    assert IsolationMode.parse(IsolationMode(mode)) is IsolationMode(mode)


@pytest.mark.parametrize("bad", ["isolate", "Shared", "copy_on_write", "cow", "", "ISOLATED"])
def test_unknown_mode_names_value_and_allowed(bad):
    with pytest.raises(InvalidModeError) as info:
        IsolationMode.parse(bad)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ForgespaceError)
    assert repr(bad) in str(info.value)
    for allowed in ("isolated", "shared", "copy-on-write"):
        assert allowed in str(info.value)


@pytest.mark.parametrize("good", ["a", "0", "abc-DEF_1.2", "x" * 128, "run-1", "9f1c2e"])
def test_valid_ids(good):
    assert validate_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ".hidden",
        "-x",
        "_x",
        "a/b",
        "a\\b",
        "..",
        ".",
        "x" * 129,
        "a b",
        "shared",
        "workspace",
        "target",
        ".forgespace",
        "é",
        "a\nb",
        None,
        5,
    ],
)
def test_invalid_ids(bad):
    with pytest.raises(InvalidIdError) as info:
        validate_id(bad, "run_id")
    assert isinstance(info.value, ValueError) and "run_id" in str(info.value)


def test_paths_follow_the_seed_layout(tmp_path: Path):
    L = CacheLayout(tmp_path)
    assert L.run_target("t", "r") == tmp_path / "t" / "r" / "target"
    assert L.run_workspace("t", "r") == tmp_path / "t" / "r" / "workspace"
    assert L.shared_target("t") == tmp_path / "t" / "target"
    assert L.shared_workspace("t") == tmp_path / "t" / "workspace"
    assert L.cow_shared_target("t") == tmp_path / "t" / "shared" / "target"
    assert L.cow_shared_workspace("t") == tmp_path / "t" / "shared" / "workspace"
    assert L.meta_dir == tmp_path / ".forgespace"
    assert L.workspace_paths(IsolationMode.SHARED, "t", None) == (
        L.shared_target("t"),
        L.shared_workspace("t"),
    )
    assert L.workspace_paths(IsolationMode.ISOLATED, "t", "r")[1] == L.run_workspace("t", "r")
    with pytest.raises(InvalidIdError):
        L.workspace_paths(IsolationMode.COPY_ON_WRITE, "t", None)


@pytest.mark.parametrize("bad", ["abc\n", "abc\x00", "a\tb", "abc\r", "\nabc", "abc\x7f", "a\x1bb"])
def test_ids_with_control_characters_are_refused_by_repr(bad):
    # "$" matches before a final newline: the whole string must match, not just a prefix.
    with pytest.raises(InvalidIdError) as info:
        validate_id(bad)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ForgespaceError)
    assert repr(bad) in str(info.value) and "control character" in str(info.value)
    assert "\n" not in str(info.value) and "\x00" not in str(info.value)
    assert not is_valid_id(bad)


def test_scans_skip_directories_whose_name_only_prefix_matches(tmp_path: Path):
    from forgespace.cache.index import scan_entries

    # "t1\n" passed the old prefix match; a scan must not turn it into an entry
    (tmp_path / "t1\n" / "workspace").mkdir(parents=True)
    (tmp_path / "t2" / "workspace").mkdir(parents=True)
    assert [e.key for e in scan_entries(CacheLayout(tmp_path), with_sizes=False)] == [
        "t2/workspace"
    ]
