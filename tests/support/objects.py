"""Objects put into a store behind forgespace's back, as other clients (or damage) would."""

from __future__ import annotations

import contextlib

import boto3

from forgespace.config import Settings
from forgespace.storage import target_key


def s3_client(settings: Settings):  # type: ignore[no-untyped-def]
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        aws_access_key_id=settings.s3_access_key,
        aws_secret_access_key=settings.s3_secret_key,
        region_name=settings.s3_region,
        config=boto3.session.Config(s3={"addressing_style": "path"}),
    )


def put_foreign(settings: Settings, target_id: str, data: bytes) -> None:
    """Put an object the way another client would: no forgespace metadata at all."""
    if settings.storage_backend == "s3":
        client = s3_client(settings)
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=settings.s3_bucket)
        client.put_object(Bucket=settings.s3_bucket, Key=target_key(target_id), Body=data)
    else:
        obj = settings.storage_dir / target_key(target_id)
        obj.parent.mkdir(parents=True, exist_ok=True)
        obj.write_bytes(data)


def overwrite_keeping_metadata(settings: Settings, target_id: str, data: bytes) -> None:
    """Replace an uploaded object's bytes but keep the sha256 forgespace recorded."""
    if settings.storage_backend == "s3":
        client = s3_client(settings)
        key = target_key(target_id)
        meta = client.head_object(Bucket=settings.s3_bucket, Key=key)["Metadata"]
        client.put_object(Bucket=settings.s3_bucket, Key=key, Body=data, Metadata=meta)
    else:
        (settings.storage_dir / target_key(target_id)).write_bytes(data)
