"""Buckets: the object stores templar nodes meet in (DESIGN §3, §8).

A `Bucket` is a flat key -> bytes store with five operations. Implementations are chosen by URL:

    file:///abs/dir     LocalBucket: a directory; atomic writes (temp file + rename), keys cannot escape it

Keys are plain names (`gradient-12-3.safetensors`, `data_7.parquet`), optionally with `/`-separated prefixes;
they never contain `..`, backslashes, control characters or a leading `/`.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

_KEY = re.compile(r"^[A-Za-z0-9_.=-]+(/[A-Za-z0-9_.=-]+)*$")


class BucketError(Exception):
    """A bucket operation failed for a reason other than a missing key."""


class ObjectMissing(BucketError, KeyError):
    """The key does not exist in the bucket."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "object missing"


class ObjectTooLarge(BucketError):
    """The object is larger than the caller's `max_bytes`; nothing beyond the limit was read."""


@runtime_checkable
class Bucket(Protocol):
    url: str

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str, max_bytes: int | None = None) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[str]: ...

    def delete(self, key: str) -> None: ...


def validate_key(key: str) -> str:
    """Return the key if it is a safe object name, else raise ValueError."""
    if not isinstance(key, str) or len(key) > 512 or not _KEY.match(key) or any(
            part in (".", "..") for part in key.split("/")):
        raise ValueError(f"invalid bucket key {key!r}")
    return key


class LocalBucket:
    """A directory used as a bucket. Writes go to a temporary file in the same directory, are fsynced, then
    renamed over the key, so a reader sees the old object or the new one, never a part."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalBucket({self.url!r})"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with path.open("rb") as handle:
                if max_bytes is None:
                    return handle.read()
                data = handle.read(max_bytes + 1)
        except FileNotFoundError:
            raise ObjectMissing(f"{key}: no such object in {self.url}") from None
        except IsADirectoryError:
            raise ObjectMissing(f"{key}: no such object in {self.url}") from None
        if len(data) > max_bytes:
            raise ObjectTooLarge(f"{key}: larger than the limit of {max_bytes} bytes")
        return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        keys = []
        for path in self.root.rglob("*"):
            if path.is_file() and not path.name.startswith(".tmp-"):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def open_bucket(url: str) -> Bucket:
    """A bucket from its URL: `file:///abs/dir` (a plain path is accepted too)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalBucket(unquote(parsed.path))
    if parsed.scheme == "" and url:
        return LocalBucket(url)
    raise ValueError(f"unsupported bucket URL scheme {parsed.scheme!r} in {url!r} (supported: file://)")
