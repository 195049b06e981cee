"""Settings read from the environment, and the parsers for sizes and durations."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from forgespace.errors import ConfigError

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    # docker/k8s habits: one-letter SI suffixes (like kB/MB/GB/TB) and Ki/Mi/Gi/Ti (IEC).
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}
# The smallest CACHE_MAX_SIZE accepted: a smaller one is a unit forgotten (10 = 10 bytes).
MIN_CACHE_MAX_SIZE = 2**20
_DURATION_UNITS: dict[str, float] = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")

SIZE_FORMS = (
    "a byte count or a number with kB/MB/GB/TB or K/M/G/T (powers of 1000) or KiB/MiB/GiB/TiB "
    "or Ki/Mi/Gi/Ti (powers of 1024), e.g. 10GB, 10G, 1.5GiB, 10Gi, 500MB"
)
DURATION_FORMS = "seconds or a number with s, m, h, d or w, e.g. 90, 30m, 1.5h, 7d"


def parse_size(value: str | int, *, name: str = "size") -> int:
    """Parse ``10GB``, ``1.5GiB``, ``512`` ... into bytes (SI = 10^3n, IEC = 2^10n)."""
    if isinstance(value, bool):
        raise ConfigError(f"invalid {name} {value!r}: expected {SIZE_FORMS}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"invalid {name} {value!r}: must not be negative")
        return value
    m = _NUMBER_UNIT.match(str(value))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _SIZE_UNITS:
        raise ConfigError(f"invalid {name} {value!r}: expected {SIZE_FORMS}")
    # Decimal, not float: "2.01kB" must be 2010 bytes, not 2009.9999999999998 truncated.
    return int(Decimal(m.group(1)) * _SIZE_UNITS[unit])


def parse_duration(value: str | float | int, *, name: str = "duration") -> float:
    """Parse ``30m``, ``7d``, ``1.5h``, ``90`` ... into seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"invalid {name} {value!r}: expected {DURATION_FORMS}")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"invalid {name} {value!r}: must not be negative")
        return float(value)
    m = _NUMBER_UNIT.match(str(value))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _DURATION_UNITS:
        raise ConfigError(f"invalid {name} {value!r}: expected {DURATION_FORMS}")
    return float(Decimal(m.group(1)) * Decimal(_DURATION_UNITS[unit]))


def _cache_limit(value: str, *, name: str) -> int:
    """A cache size limit: ``parse_size``, and at least 1 MiB (a smaller limit is nearly always
    a forgotten unit, and would evict every unleased workspace at once)."""
    size = parse_size(value, name=name)
    if size < MIN_CACHE_MAX_SIZE:
        number = value.strip()
        hint = f" — did you mean {number}GB?" if number.replace(".", "", 1).isdigit() else ""
        raise ConfigError(
            f"invalid {name} {value!r}: {size} bytes is below the 1 MiB minimum{hint} "
            f"(expected {SIZE_FORMS})"
        )
    return size


def _parse_bool(value: str, *, name: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"invalid {name} {value!r}: expected true/false (also 1/0, yes/no, on/off)")


def _positive_int(value: str, *, name: str) -> int:
    v = value.strip()
    if not v.isdigit() or int(v) < 1:
        raise ConfigError(f"invalid {name} {value!r}: expected a whole number >= 1")
    return int(v)


def _choice(value: str, *, name: str, allowed: tuple[str, ...]) -> str:
    v = value.strip().lower()
    if v not in allowed:
        raise ConfigError(f"invalid {name} {value!r}: expected one of {', '.join(allowed)}")
    return v


def _locality_wait(value: str) -> float:
    """FORGESPACE_LOCALITY_WAIT: a duration, or ``off`` (= 0: no locality)."""
    if value.strip().lower() == "off":
        return 0.0
    try:
        return parse_duration(value, name="FORGESPACE_LOCALITY_WAIT")
    except ConfigError:
        raise ConfigError(
            f"invalid FORGESPACE_LOCALITY_WAIT {value!r}: expected off (or 0) to send runs to "
            f"any host, or how long to wait for a host holding the target: {DURATION_FORMS}"
        ) from None


COW_BACKENDS = ("copy", "overlay")
SANDBOX_MODES = ("auto", "bwrap", "none")
STORAGE_BACKENDS = ("local", "s3")
STORE_FORMATS = ("manifest", "archive")


@dataclass(frozen=True)
class Settings:
    """Everything forgespace reads from the environment, parsed and validated once."""

    cache_dir: Path
    storage_dir: Path
    cache_max_size: int = 10 * 10**9
    cache_ttl: float = 7 * 86400.0
    cache_cleanup_interval: float = 30 * 60.0
    cache_lease_ttl: float = 24 * 3600.0
    cache_lock_timeout: float = 30 * 60.0
    cow_backend: str = "copy"
    sandbox: str = "auto"
    storage_backend: str = "local"
    s3_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_bucket: str = "targets"
    s3_results_bucket: str = "results"
    s3_region: str = "us-east-1"
    s3_use_ssl: bool = False
    #: `forgespace store prune` removes targets not uploaded for this long (FuzzForge documents
    #: 7 days for targets and 30 for results) and results older than ``store_result_ttl``.
    store_target_ttl: float = 7 * 86400.0
    store_result_ttl: float = 30 * 86400.0
    #: the local store's temp files of dead uploads are removed by prune only after this long
    store_temp_grace: float = 3600.0
    #: STORE_FORMAT: how `upload_target` stores a directory: ``manifest`` (a manifest at
    #: ``{id}/target`` plus content-addressed blob packs: a new version sends and fetches only
    #: what changed) or ``archive`` (a tar.gz at ``{id}/target``, for clients that read the
    #: store themselves). Both formats are read whatever this says.
    store_format: str = "manifest"
    temporal_address: str | None = None
    temporal_namespace: str = "default"
    # FORGESPACE_MAX_CONCURRENT_ACTIVITIES, FORGESPACE_TEMPORAL_BIN, FORGESPACE_LOG_LEVEL
    max_concurrent_activities: int = 32
    temporal_bin: str | None = None
    log_level: str = "INFO"
    #: mTLS client certificate and key (PEM files, both or neither) and the CA that signed the
    #: server's certificate (PEM; unset = the system's roots). Any of them turns TLS on.
    temporal_tls_cert: Path | None = None
    temporal_tls_key: Path | None = None
    temporal_tls_ca: Path | None = None
    #: Temporal Cloud API key (sent as a bearer token; implies TLS). Never shown in a repr.
    temporal_api_key: str | None = field(default=None, repr=False)
    #: FORGESPACE_LOCALITY_WAIT: how long a shared/copy-on-write run waits for a busy host that
    #: holds its target before going to any host (delay scheduling); 0 = locality off.
    locality_wait: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default ``os.environ``); unset variables take defaults.

        Raises ConfigError naming the variable, its value and the accepted forms.
        """
        e = dict(os.environ if env is None else env)

        def get(name: str) -> str | None:
            v = e.get(name)
            return v if v not in (None, "") else None

        kw: dict[str, Any] = _directories(e, get)
        kw.update(_parsed_settings(get))
        kw.update(_string_settings(get))
        kw.update(_tls_files(get))
        if (v := get("FORGESPACE_LOCALITY_WAIT")) is not None:
            kw["locality_wait"] = _locality_wait(v)
        if (v := get("TEMPORAL_API_KEY")) is not None:
            kw["temporal_api_key"] = v.strip()
        return cls(**kw)

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests and the CLI use this)."""
        return replace(self, **changes)


#: Variables read as a size / a duration, and the Settings field each sets.
_SIZE_VARS = {"CACHE_MAX_SIZE": "cache_max_size"}
_DURATION_VARS = {
    "CACHE_TTL": "cache_ttl",
    "CACHE_CLEANUP_INTERVAL": "cache_cleanup_interval",
    "CACHE_LEASE_TTL": "cache_lease_ttl",
    "CACHE_LOCK_TIMEOUT": "cache_lock_timeout",
    "STORE_TARGET_TTL": "store_target_ttl",
    "STORE_RESULT_TTL": "store_result_ttl",
    "STORE_TEMP_GRACE": "store_temp_grace",
}
#: Variables taken as they are.
_PLAIN_VARS = {
    "S3_ENDPOINT": "s3_endpoint",
    "S3_ACCESS_KEY": "s3_access_key",
    "S3_SECRET_KEY": "s3_secret_key",
    "S3_BUCKET": "s3_bucket",
    "S3_RESULTS_BUCKET": "s3_results_bucket",
    "S3_REGION": "s3_region",
    "TEMPORAL_ADDRESS": "temporal_address",
    "TEMPORAL_NAMESPACE": "temporal_namespace",
}
_TLS_FILE_VARS = {
    "TEMPORAL_TLS_CERT": "temporal_tls_cert",
    "TEMPORAL_TLS_KEY": "temporal_tls_key",
    "TEMPORAL_TLS_CA": "temporal_tls_ca",
}

#: Reads one variable of the environment; unset and empty are both None.
_Getter = Callable[[str], str | None]


def _directories(e: Mapping[str, str], get: _Getter) -> dict[str, Any]:
    """CACHE_DIR and STORAGE_DIR, defaulting under the XDG directories."""
    home = Path(e.get("HOME") or Path.home())
    xdg_cache = Path(e.get("XDG_CACHE_HOME") or home / ".cache")
    xdg_data = Path(e.get("XDG_DATA_HOME") or home / ".local" / "share")
    return {
        "cache_dir": Path(get("CACHE_DIR") or xdg_cache / "forgespace").expanduser(),
        "storage_dir": Path(get("STORAGE_DIR") or xdg_data / "forgespace" / "store").expanduser(),
    }


def _parsed_settings(get: _Getter) -> dict[str, Any]:
    """The sizes, durations, choices and flags: each checked, a ConfigError otherwise."""
    kw: dict[str, Any] = {}
    for var, name in _SIZE_VARS.items():
        if (v := get(var)) is not None:
            kw[name] = _cache_limit(v, name=var)
    for var, name in _DURATION_VARS.items():
        if (v := get(var)) is not None:
            kw[name] = parse_duration(v, name=var)
    if (v := get("CACHE_COW_BACKEND")) is not None:
        kw["cow_backend"] = _choice(v, name="CACHE_COW_BACKEND", allowed=COW_BACKENDS)
    if (v := get("FORGESPACE_SANDBOX")) is not None:
        kw["sandbox"] = _choice(v, name="FORGESPACE_SANDBOX", allowed=SANDBOX_MODES)
    if (v := get("STORAGE_BACKEND")) is not None:
        kw["storage_backend"] = _choice(v, name="STORAGE_BACKEND", allowed=STORAGE_BACKENDS)
    if (v := get("STORE_FORMAT")) is not None:
        kw["store_format"] = _choice(v, name="STORE_FORMAT", allowed=STORE_FORMATS)
    if (v := get("S3_USE_SSL")) is not None:
        kw["s3_use_ssl"] = _parse_bool(v, name="S3_USE_SSL")
    return kw


def _string_settings(get: _Getter) -> dict[str, Any]:
    """The plain strings, and the worker's variables (with FuzzForge's names as aliases)."""
    kw: dict[str, Any] = {}
    for var, name in _PLAIN_VARS.items():
        if (v := get(var)) is not None:
            kw[name] = v
    # MAX_CONCURRENT_ACTIVITIES and LOG_LEVEL: FuzzForge's worker variables, as aliases.
    for var in ("FORGESPACE_MAX_CONCURRENT_ACTIVITIES", "MAX_CONCURRENT_ACTIVITIES"):
        if (v := get(var)) is not None:
            kw["max_concurrent_activities"] = _positive_int(v, name=var)
            break
    kw["temporal_bin"] = get("FORGESPACE_TEMPORAL_BIN")
    level = get("FORGESPACE_LOG_LEVEL") or get("LOG_LEVEL") or "INFO"
    kw["log_level"] = level.strip().upper()
    return kw


def _tls_files(get: _Getter) -> dict[str, Any]:
    """The Temporal TLS files; a certificate without its key (or the reverse) is refused."""
    kw: dict[str, Any] = {}
    for var, name in _TLS_FILE_VARS.items():
        if (v := get(var)) is not None:
            kw[name] = Path(v).expanduser()
    if ("temporal_tls_cert" in kw) != ("temporal_tls_key" in kw):
        given, missing = (
            ("TEMPORAL_TLS_CERT", "TEMPORAL_TLS_KEY")
            if "temporal_tls_cert" in kw
            else ("TEMPORAL_TLS_KEY", "TEMPORAL_TLS_CERT")
        )
        raise ConfigError(
            f"{given} is set but {missing} is not: a client certificate needs its key "
            "(set both PEM files for mTLS, or neither)"
        )
    return kw
