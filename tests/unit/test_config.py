from __future__ import annotations

from pathlib import Path

import pytest

from forgespace import ForgespaceError, Settings, parse_duration, parse_size
from forgespace.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("512", 512),
        ("10GB", 10 * 10**9),
        ("10gb", 10 * 10**9),
        ("1.5GB", 1_500_000_000),
        ("1kB", 1000),
        ("1KB", 1000),
        ("2MB", 2_000_000),
        ("1TB", 10**12),
        ("1KiB", 1024),
        ("1kib", 1024),
        ("3MiB", 3 * 2**20),
        ("1.5GiB", int(1.5 * 2**30)),
        ("2TiB", 2 * 2**40),
        (" 7 GB ", 7 * 10**9),
        ("100B", 100),
        (4096, 4096),
        ("10G", 10 * 10**9),
        ("10g", 10 * 10**9),
        ("10Gi", 10 * 2**30),
        ("512Mi", 512 * 2**20),
        ("2k", 2000),
        ("1.5T", 1_500_000_000_000),
    ],
)
def test_parse_size_accepts_si_iec_decimals_and_bare_bytes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GB", "-1GB", "10XB", "ten", "1.2.3GB", "10 G B", "1e3"])
def test_parse_size_rejects_with_accepted_forms(bad):
    with pytest.raises(ConfigError) as info:
        parse_size(bad, name="CACHE_MAX_SIZE")
    msg = str(info.value)
    assert "CACHE_MAX_SIZE" in msg and repr(bad) in msg and "GiB" in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, ForgespaceError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90", 90.0),
        ("1.5", 1.5),
        ("30s", 30.0),
        ("30m", 1800.0),
        ("1.5h", 5400.0),
        ("7d", 604800.0),
        ("2w", 1209600.0),
        ("7D", 604800.0),
    ],
)
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize("bad", ["", "m", "-5m", "5y", "5 minutes", "abc"])
def test_parse_duration_rejects(bad):
    with pytest.raises(ConfigError, match="CACHE_TTL"):
        parse_duration(bad, name="CACHE_TTL")


@pytest.mark.parametrize(
    ("parse", "value", "needle"),
    [
        # A flag is not a number, though Python counts True as 1.
        (parse_size, True, "expected a byte count"),
        (parse_duration, False, "expected seconds or a number with s, m, h, d or w"),
        (parse_size, -1, "must not be negative"),
        (parse_duration, -0.5, "must not be negative"),
    ],
)
def test_numbers_from_python_callers_are_checked_too(parse, value, needle):
    with pytest.raises(ConfigError) as info:
        parse(value, name="LIMIT")
    assert f"invalid LIMIT {value!r}: " in str(info.value) and needle in str(info.value)


def test_numbers_from_python_callers_are_taken_as_they_are():
    assert parse_duration(90) == 90.0 and isinstance(parse_duration(90), float)
    assert parse_duration(1.5) == 1.5
    assert parse_size(0) == 0


def test_defaults_follow_xdg(tmp_path: Path):
    s = Settings.from_env(
        {"XDG_CACHE_HOME": str(tmp_path / "c"), "XDG_DATA_HOME": str(tmp_path / "d")}
    )
    assert s.cache_dir == tmp_path / "c" / "forgespace"
    assert s.storage_dir == tmp_path / "d" / "forgespace" / "store"
    assert s.cache_max_size == 10 * 10**9
    assert s.cache_ttl == 7 * 86400
    assert s.cache_cleanup_interval == 30 * 60
    assert s.cache_lease_ttl == 24 * 3600
    assert s.cow_backend == "copy"
    assert s.storage_backend == "local"
    assert (s.s3_region, s.s3_use_ssl) == ("us-east-1", False)


def test_defaults_without_xdg_use_home(tmp_path: Path):
    s = Settings.from_env({"HOME": str(tmp_path)})
    assert s.cache_dir == tmp_path / ".cache" / "forgespace"
    assert s.storage_dir == tmp_path / ".local" / "share" / "forgespace" / "store"


def test_from_env_reads_every_variable(tmp_path: Path):
    s = Settings.from_env(
        {
            "CACHE_DIR": str(tmp_path / "cache"),
            "STORAGE_DIR": str(tmp_path / "store"),
            "CACHE_MAX_SIZE": "1.5GiB",
            "CACHE_TTL": "1s",
            "CACHE_CLEANUP_INTERVAL": "5m",
            "CACHE_LEASE_TTL": "2h",
            "CACHE_COW_BACKEND": "overlay",
            "STORAGE_BACKEND": "s3",
            "S3_ENDPOINT": "http://127.0.0.1:9000",
            "S3_ACCESS_KEY": "ak",
            "S3_SECRET_KEY": "sk",
            "S3_BUCKET": "bucket",
            "S3_REGION": "eu-west-1",
            "S3_USE_SSL": "true",
        }
    )
    assert s.cache_dir == tmp_path / "cache"
    assert s.cache_max_size == int(1.5 * 2**30)
    assert (s.cache_ttl, s.cache_cleanup_interval, s.cache_lease_ttl) == (1.0, 300.0, 7200.0)
    assert (s.cow_backend, s.storage_backend) == ("overlay", "s3")
    assert (s.s3_endpoint, s.s3_access_key, s.s3_secret_key) == (
        "http://127.0.0.1:9000",
        "ak",
        "sk",
    )
    assert (s.s3_bucket, s.s3_region, s.s3_use_ssl) == ("bucket", "eu-west-1", True)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CACHE_MAX_SIZE", "lots"),
        ("CACHE_TTL", "forever"),
        ("CACHE_CLEANUP_INTERVAL", "-1m"),
        ("CACHE_LEASE_TTL", "1y"),
        ("CACHE_COW_BACKEND", "reflink"),
        ("STORAGE_BACKEND", "gcs"),
        ("S3_USE_SSL", "maybe"),
        ("FORGESPACE_MAX_CONCURRENT_ACTIVITIES", "0"),
        ("FORGESPACE_MAX_CONCURRENT_ACTIVITIES", "many"),
    ],
)
def test_invalid_variable_names_variable_value_and_forms(var, value):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value})
    assert var in str(info.value) and repr(value) in str(info.value)
    assert "expected" in str(info.value)


def test_forgespace_process_variables_are_settings(tmp_path: Path):
    s = Settings.from_env({"HOME": str(tmp_path)})
    assert (s.max_concurrent_activities, s.temporal_bin, s.log_level) == (32, None, "INFO")
    s = Settings.from_env(
        {
            "HOME": str(tmp_path),
            "FORGESPACE_MAX_CONCURRENT_ACTIVITIES": "4",
            "FORGESPACE_TEMPORAL_BIN": "/opt/temporal",
            "FORGESPACE_LOG_LEVEL": "debug",
        }
    )
    assert (s.max_concurrent_activities, s.temporal_bin, s.log_level) == (
        4,
        "/opt/temporal",
        "DEBUG",
    )


@pytest.mark.parametrize(
    ("value", "hint"),
    [("10", "did you mean 10GB?"), ("0", "did you mean 0GB?"), ("512KiB", ""), ("1000kB", "")],
)
def test_cache_max_size_below_one_mib_is_refused_with_a_hint(value: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"CACHE_MAX_SIZE": value})
    msg = str(info.value)
    assert "CACHE_MAX_SIZE" in msg and repr(value) in msg and "1 MiB minimum" in msg
    assert hint in msg
    assert Settings.from_env({"CACHE_MAX_SIZE": "1MiB"}).cache_max_size == 2**20
    assert Settings.from_env({"CACHE_MAX_SIZE": "10Gi"}).cache_max_size == 10 * 2**30
