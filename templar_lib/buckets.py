"""Buckets: the object stores templar nodes meet in (DESIGN §3, §8).

A `Bucket` is a flat key -> bytes store with five operations. Implementations are chosen by URL:

    file:///abs/dir     LocalBucket: a directory; atomic writes (temp file + rename), keys cannot escape it
    s3://name[/prefix][?endpoint_url=...&region=...&profile=...]
                        S3Bucket on boto3 (AWS S3, Cloudflare R2, MinIO, SeaweedFS). Credentials come from boto3's
                        own chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a named profile, ...); the endpoint from
                        `endpoint_url` or AWS_ENDPOINT_URL. A single PUT per object is atomic on S3.

Errors are told apart: `ObjectMissing` (no such key), `BucketAccessDenied` (credentials refused),
`BucketUnreachable` (endpoint down or timing out after bounded retries), `ObjectTooLarge` (over `max_bytes`, checked
against Content-Length before the body is read and again while streaming it). Credentials never appear in a repr,
a log line or an error message.

Keys are plain names (`gradient-12-3.safetensors`, `data_7.parquet`), optionally with `/`-separated prefixes;
they never contain `..`, backslashes, control characters or a leading `/`.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat as stat_module
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qs, unquote, urlparse

from templar_lib.transport import DeadlinePassed, Guard, TransferRefused

_KEY = re.compile(r"^[A-Za-z0-9_.=-]+(/[A-Za-z0-9_.=-]+)*$")


class BucketError(Exception):
    """A bucket operation failed for a reason other than a missing key."""


class ObjectMissing(BucketError, KeyError):
    """The key does not exist in the bucket."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "object missing"


class ObjectTooLarge(BucketError):
    """The object is larger than the caller's `max_bytes`; nothing beyond the limit was read."""


class BucketAccessDenied(BucketError):
    """The store refused our credentials for this bucket or key."""


class BucketUnreachable(BucketError):
    """The endpoint could not be reached, or kept failing after the bounded retries."""


class BucketTimeout(BucketUnreachable):
    """The caller's deadline passed before the endpoint had answered in full."""


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    modified: datetime  # timezone-aware UTC: when the object was last written
    etag: str = ""  # the server's entity tag, where it has one (S3): tells apart two writes within one second


@runtime_checkable
class Bucket(Protocol):
    url: str

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str, max_bytes: int | None = None, deadline: float | None = None) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[str]: ...

    def delete(self, key: str) -> None: ...

    def stat(self, key: str, deadline: float | None = None) -> ObjectInfo: ...

    def abort(self) -> None:
        """Cut every read in flight (from another thread); deadlines are time.monotonic() values."""


def validate_key(key: str) -> str:
    """Return the key if it is a safe object name, else raise ValueError."""
    if not isinstance(key, str) or len(key) > 512 or not _KEY.match(key) or any(
            part in (".", "..") for part in key.split("/")):
        raise ValueError(f"invalid bucket key {key!r}")
    return key


class LocalBucket:
    """A directory used as a bucket. Writes go to a temporary file in the same directory, are fsynced, then
    renamed over the key, so a reader sees the old object or the new one, never a part.

    peer=True: the directory is a stranger's (a file:// commitment on a local network): only regular files inside it
    are read, opened without following a symlink and without blocking (a FIFO is refused, not waited on), and no
    refusal says anything about what the path points to."""

    def __init__(self, root: str | Path, *, peer: bool = False) -> None:
        self.root = Path(root).resolve()
        if not peer:  # a stranger's path is only read: never create directories where a commitment points
            self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()
        self.peer = peer

    def __repr__(self) -> str:
        return f"LocalBucket({self.url!r})"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put(self, key: str, data: bytes) -> None:
        self.put_file(key, lambda path: path.write_bytes(data))

    def put_file(self, key: str, write: Callable[[Path], None]) -> None:
        """Like put, for objects too large to hold in memory twice: write(path) fills a temporary file in place
        (e.g. safetensors' save_file), which is then fsynced and renamed over the key."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        os.close(descriptor)
        try:
            write(Path(temporary))
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def local_path(self, key: str) -> Path:
        """The file holding `key` (for memory-mapped reads); ObjectMissing when there is none."""
        path = self._path(key)
        if not path.is_file():
            raise ObjectMissing(f"{key}: no such object in {self.url}")
        return path

    def get(self, key: str, max_bytes: int | None = None, deadline: float | None = None) -> bytes:
        try:
            with self._open(key) as handle:
                if max_bytes is None:
                    return handle.read()
                data = handle.read(max_bytes + 1)
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectMissing(f"{key}: no such object in {self.url}") from None
        if len(data) > max_bytes:
            raise ObjectTooLarge(f"{key}: larger than the limit of {max_bytes} bytes")
        return data

    def _open(self, key: str):
        path = self._path(key)
        if not self.peer:
            return path.open("rb")
        self._inside(key, path)
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as error:
            if isinstance(error, FileNotFoundError):
                raise
            raise BucketAccessDenied(f"{key}: not a regular file inside {self.url}") from None
        if not stat_module.S_ISREG(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            raise BucketAccessDenied(f"{key}: not a regular file inside {self.url}")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")

    def _inside(self, key: str, path: Path) -> None:
        """A stranger's key must not lead out of its directory through a symlinked folder."""
        if not Path(os.path.realpath(path.parent)).is_relative_to(self.root):
            raise BucketAccessDenied(f"{key}: not a regular file inside {self.url}")

    def abort(self) -> None:
        """Nothing to cut: a local read does not wait on anyone."""

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

    def stat(self, key: str, deadline: float | None = None) -> ObjectInfo:
        path = self._path(key)
        if self.peer:
            self._inside(key, path)
        try:
            status = path.lstat() if self.peer else path.stat()
        except FileNotFoundError:
            raise ObjectMissing(f"{key}: no such object in {self.url}") from None
        if self.peer and not stat_module.S_ISREG(status.st_mode):
            raise BucketAccessDenied(f"{key}: not a regular file inside {self.url}")
        return ObjectInfo(size=status.st_size, modified=datetime.fromtimestamp(status.st_mtime, tz=timezone.utc))


class S3Bucket:
    """A bucket on an S3-compatible store, through boto3.

    Retries: botocore's "standard" mode (exponential backoff with jitter on throttling, 5xx, connection errors and
    timeouts), `max_attempts` in total; every request has connect/read timeouts. `prefix` scopes all keys.

    guard: a peer's bucket (an endpoint a stranger runs) is read through a transport.Guard: its address checked at
    connect time, a minimum transfer rate, a deadline per call (`deadline=` of get and stat), and `abort()`.
    """

    def __init__(self, name: str, *, prefix: str = "", endpoint_url: str | None = None, region: str | None = None,
                 profile: str | None = None, credentials: tuple[str, str] | None = None, client=None,
                 max_attempts: int = 4, connect_timeout: float = 5.0, read_timeout: float = 30.0,
                 guard: Guard | None = None) -> None:
        self.name = name
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        query = f"?endpoint_url={self.endpoint_url}" if self.endpoint_url else ""
        self.url = f"s3://{name}/{self.prefix}{query}"
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(retries={"total_max_attempts": max_attempts, "mode": "standard"},
                            connect_timeout=connect_timeout, read_timeout=read_timeout,
                            signature_version="s3v4", s3={"addressing_style": "path"})
            if credentials is not None or guard is not None:
                # a peer's bucket: its published read-only keys, or no signature at all (our own credentials are
                # never sent to a stranger's endpoint); one shared session's loaded service model serves every
                # peer's client (a validator opens one per uid)
                if credentials is None:
                    from botocore import UNSIGNED

                    config = config.merge(Config(signature_version=UNSIGNED))
                session = _peer_session()
                with _PEER_SESSION_LOCK:  # a botocore session is not thread-safe (reports are read off-thread)
                    client = session.create_client(
                        "s3", endpoint_url=self.endpoint_url, region_name=region or "auto", config=config,
                        aws_access_key_id=credentials[0] if credentials else None,
                        aws_secret_access_key=credentials[1] if credentials else None)
            else:  # boto3's own chain: environment, named profile, instance role
                session = boto3.session.Session(profile_name=profile) if profile else boto3.session.Session()
                client = session.client("s3", endpoint_url=self.endpoint_url, region_name=region or "auto",
                                        config=config)
        self._client = client
        self.guard = guard
        if guard is not None:
            guard.attach(client)

    def __repr__(self) -> str:
        return f"S3Bucket({self.url!r})"

    def _key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    @contextlib.contextmanager
    def _errors(self, key: str):
        """Translate botocore failures into the bucket errors, naming the key but never credentials."""
        from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

        try:
            yield
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":  # a 404 too: told apart first, a mistyped bucket is not a missing file
                raise BucketError(f"{key}: bucket {self.name!r} does not exist at the endpoint") from None
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                raise ObjectMissing(f"{key}: no such object in {self.url}") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden") \
                    or status == 403:
                raise BucketAccessDenied(f"{key}: access denied by {self.url} ({code})") from None
            raise BucketUnreachable(f"{key}: {self.url} answered {code or status}") from None
        except DeadlinePassed:
            raise BucketTimeout(f"{key}: no answer by the deadline") from None
        except TransferRefused as error:
            raise BucketUnreachable(f"{key}: {error}") from None
        except (ConnectionError, HTTPClientError) as error:
            raise BucketUnreachable(f"{key}: cannot reach {self.url} ({type(error).__name__})") from None
        except BotoCoreError as error:
            raise BucketUnreachable(f"{key}: request to {self.url} failed ({type(error).__name__})") from None

    def put(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self._client.put_object(Bucket=self.name, Key=self._key(key), Body=bytes(data))

    def _until(self, deadline: float | None):
        return self.guard.until(deadline) if self.guard is not None else contextlib.nullcontext()

    def abort(self) -> None:
        """Cut every transfer in flight (a guarded peer's bucket only)."""
        if self.guard is not None:
            self.guard.abort()

    def get(self, key: str, max_bytes: int | None = None, deadline: float | None = None) -> bytes:
        with self._errors(key), self._until(deadline):
            response = self._client.get_object(Bucket=self.name, Key=self._key(key))
            body = response["Body"]
            try:
                declared = response.get("ContentLength")
                if max_bytes is not None and declared is not None and declared > max_bytes:
                    raise ObjectTooLarge(f"{key}: {declared} bytes, larger than the limit of {max_bytes}")
                data = bytearray()
                for part in body.iter_chunks(chunk_size=1 << 20):
                    data += part
                    if max_bytes is not None and len(data) > max_bytes:
                        raise ObjectTooLarge(f"{key}: larger than the limit of {max_bytes} bytes")
            finally:
                body.close()
            return bytes(data)

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectMissing:
            return False
        return True

    def stat(self, key: str, deadline: float | None = None) -> ObjectInfo:
        with self._errors(key), self._until(deadline):
            response = self._client.head_object(Bucket=self.name, Key=self._key(key))
        size, modified = response.get("ContentLength"), response.get("LastModified")
        if not isinstance(size, int) or size < 0 or not isinstance(modified, datetime):  # a stranger's endpoint
            raise BucketUnreachable(f"{key}: {self.url} answered without a valid size and time")
        return ObjectInfo(size=size, modified=modified, etag=str(response.get("ETag", ""))[:200])

    def list(self, prefix: str = "") -> list[str]:
        keys = []
        with self._errors(prefix or "(list)"):
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.name, Prefix=self.prefix + prefix):
                keys.extend(item["Key"][len(self.prefix):] for item in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        with self._errors(key):
            self._client.delete_object(Bucket=self.name, Key=self._key(key))


@dataclass(frozen=True)
class Buckets:
    """A node's own three buckets (DESIGN §3): where it writes gradients, reads dataset pages, and where the
    aggregator publishes aggregations and checkpoints."""

    gradients: Bucket
    dataset: Bucket
    aggregator: Bucket

    @classmethod
    def from_urls(cls, *, gradients: str, dataset: str, aggregator: str) -> Buckets:
        return cls(open_bucket(gradients), open_bucket(dataset), open_bucket(aggregator))

    @classmethod
    def local(cls, home: str | Path) -> Buckets:
        """The embedded default: three directories under `home` (e.g. .templar/)."""
        home = Path(home)
        return cls(LocalBucket(home / "gradients"), LocalBucket(home / "dataset"), LocalBucket(home / "aggregator"))


_PEER_SESSION = None
_PEER_SESSION_LOCK = threading.Lock()


def _peer_session():
    """One botocore session for the clients made with explicit credentials (its credential chain is never used)."""
    global _PEER_SESSION
    with _PEER_SESSION_LOCK:
        if _PEER_SESSION is None:
            import botocore.session

            _PEER_SESSION = botocore.session.get_session()
        return _PEER_SESSION


def open_bucket(url: str, *, client=None, credentials: tuple[str, str] | None = None,
                guard: Guard | None = None, peer: bool = False) -> Bucket:
    """A bucket from its URL: `file:///abs/dir` (a plain path too) or `s3://name[/prefix][?endpoint_url=..&region=..
    &profile=..]`. For s3://, `client` is an existing boto3 S3 client (e.g. from dagster-aws S3Resource) and
    `credentials` an explicit (access key id, secret) pair; by default boto3's credential chain is used."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalBucket(unquote(parsed.path), peer=peer)
    if parsed.scheme == "" and url:
        return LocalBucket(url, peer=peer)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"s3 bucket URL without a bucket name: {url!r}")
        options = {name: values[-1] for name, values in parse_qs(parsed.query).items()}
        unknown = set(options) - {"endpoint_url", "region", "profile"}
        if unknown:
            raise ValueError(f"unknown s3 bucket URL option(s) {sorted(unknown)}")
        return S3Bucket(parsed.netloc, prefix=unquote(parsed.path), endpoint_url=options.get("endpoint_url"),
                        region=options.get("region"), profile=options.get("profile"), credentials=credentials,
                        client=client, guard=guard)
    raise ValueError(f"unsupported bucket URL scheme {parsed.scheme!r} (supported: file://, s3://)")
