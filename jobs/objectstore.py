"""What pyarrow.fs cannot do on an object store: create an object only if it is absent or
replace it only if it is unchanged (S3 `If-None-Match: *` / `If-Match: <etag>`), and abort the
incomplete multipart uploads a killed writer leaves (S3 keeps and bills them, PHI-derived bytes
included, until aborted).

S3 only, through boto3 where it is installed, configured from the same URI pyarrow reads
(`s3://[key:secret@]bucket/path?endpoint_override=host:port&scheme=http&region=...`). Every
function returns None where no such primitive is at hand (another store, no boto3): callers
fall back and say so. No Ray here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass(frozen=True)
class S3Object:
    client: Any
    bucket: str
    key: str


def s3_object(uri: str) -> S3Object | None:
    """The bucket and key of an s3:// URI with a boto3 client for its endpoint; None for other
    paths, or when boto3 is not installed."""
    parts = urlsplit(uri)
    if parts.scheme != "s3":
        return None
    client = _client(parts.username, parts.password, parts.query)
    return None if client is None else S3Object(client, parts.hostname or "", parts.path[1:])


@functools.cache
def _client(user: str | None, password: str | None, query: str) -> Any:
    try:
        import boto3
    except ImportError:
        return None
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    kwargs: dict[str, Any] = {"region_name": options.get("region")}
    if endpoint := options.get("endpoint_override"):
        scheme = options.get("scheme", "https")
        kwargs["endpoint_url"] = endpoint if "://" in endpoint else f"{scheme}://{endpoint}"
    if user:
        kwargs["aws_access_key_id"] = unquote(user)
        kwargs["aws_secret_access_key"] = unquote(password or "")
    return boto3.client("s3", **kwargs)


def _precondition_failed(error: Exception) -> bool:
    code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict")


def create_if_absent(uri: str, data: bytes) -> str | None:
    """Write `data` at `uri` unless an object is there: its new ETag when written, "" when
    another writer's object was there first; None where the store offers no such create."""
    return _put(uri, data, IfNoneMatch="*")


def _put(uri: str, data: bytes, **condition: str) -> str | None:
    target = s3_object(uri)
    if target is None:
        return None
    try:
        put = target.client.put_object(Bucket=target.bucket, Key=target.key, Body=data,
                                       **condition)  # fmt: skip
    except Exception as e:
        if _precondition_failed(e) or "NoSuchKey" in str(e):
            return ""
        raise OSError(f"{uri}: cannot write: {e}") from None
    return put["ETag"]


def read_with_tag(uri: str) -> tuple[bytes, str] | None:
    """The object's bytes and its ETag (b"", "" when absent); None where not available."""
    target = s3_object(uri)
    if target is None:
        return None
    try:
        got = target.client.get_object(Bucket=target.bucket, Key=target.key)
    except target.client.exceptions.NoSuchKey:
        return b"", ""
    return got["Body"].read(), got["ETag"]


def replace_if_unchanged(uri: str, data: bytes, tag: str) -> str | None:
    """Overwrite the object at `uri` only if its ETag is still `tag` (no other writer came in
    between): the new ETag when written, "" when it changed or is gone; None where not
    available."""
    return _put(uri, data, IfMatch=tag)


def abort_uploads(prefix_uri: str) -> int | None:
    """Abort every incomplete multipart upload under `prefix_uri` (a dir): how many; None
    where the store has no such uploads to list."""
    target = s3_object(prefix_uri)
    if target is None:
        return None
    prefix = target.key.rstrip("/") + "/"
    aborted = 0
    pages = target.client.get_paginator("list_multipart_uploads")
    for page in pages.paginate(Bucket=target.bucket, Prefix=prefix):
        for upload in page.get("Uploads", []):
            target.client.abort_multipart_upload(
                Bucket=target.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
            aborted += 1
    return aborted
