"""Object stores: local directory (embedded default) and S3/MinIO."""

from __future__ import annotations

from forgespace.config import Settings
from forgespace.storage.base import ObjectInfo, ProgressFn, Store, target_key

__all__ = ["ObjectInfo", "ProgressFn", "Store", "open_store", "target_key"]


def open_store(settings: Settings) -> Store:
    """The store ``settings.storage_backend`` names: LocalStore or S3Store."""
    if settings.storage_backend == "s3":
        from forgespace.storage.s3 import S3Store

        return S3Store.from_settings(settings)
    from forgespace.storage.local import LocalStore

    return LocalStore(settings.storage_dir, incremental=settings.store_format == "manifest")
