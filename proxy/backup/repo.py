"""Where backups live: a directory or an S3-compatible bucket, behind one small interface.

Objects are written as streams (a backup is never held whole in memory or on local disk): a
directory repository writes a hidden temporary file and renames it on close, so a reader never
sees half an object; an S3 repository uploads parts of `PART_SIZE` as they fill (multipart
upload) and completes the upload on close, or aborts it, so a failed backup leaves nothing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import urlparse

PART_SIZE = 16 << 20  # S3's minimum is 5 MiB; 16 MiB parts keep a 1 TiB backup under the 10,000-part cap
READ_SIZE = 1 << 20


class RepoError(Exception):
    """One line for the operator: what is wrong with the repository or an object in it."""


class Writer:
    """A stream into one object; `close()` makes it visible, `abort()` leaves nothing."""

    def write(self, data: bytes) -> int:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class Repository:
    url: str

    def open_write(self, key: str) -> Writer:
        raise NotImplementedError

    def open_read(self, key: str) -> BinaryIO:
        raise NotImplementedError

    def keys(self, prefix: str = "") -> list[str]:
        raise NotImplementedError

    def sizes(self, prefix: str = "") -> dict[str, int]:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> None:
        w = self.open_write(key)
        try:
            w.write(data)
        except BaseException:
            w.abort()
            raise
        w.close()

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    def exists(self, key: str) -> bool:
        return key in self.sizes(key)


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise RepoError(f"invalid object name {key!r}")
    return key


# ---- a directory ---------------------------------------------------------------------------------

class _FileWriter(Writer):
    """A full disk or a lost mount is a RepoError naming the object (ENOSPC, EIO...), never a
    traceback; abort() leaves neither the partial file nor the directories made for it."""

    def __init__(self, repo: "FileRepository", key: str, path: Path):
        self.repo, self.key, self.path = repo, key, path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        self.f = open(self.tmp, "wb")

    def _error(self, e: OSError) -> RepoError:
        return RepoError(f"cannot write {self.repo.url}/{self.key}: {e.strerror or e}")

    def write(self, data: bytes) -> int:
        try:
            self.f.write(data)
        except OSError as e:
            raise self._error(e) from None
        return len(data)

    def close(self) -> None:
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise self._error(e) from None

    def abort(self) -> None:
        try:
            self.f.close()  # (flushes: may fail again on a full disk)
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)
        self.repo.prune(self.path.parent)


class FileRepository(Repository):
    def __init__(self, path: str):
        self.root = Path(path)
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def open_write(self, key: str) -> Writer:
        try:
            return _FileWriter(self, key, self._path(key))
        except OSError as e:
            raise RepoError(f"cannot write {self.url}/{key}: {e.strerror}") from None

    def open_read(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise RepoError(f"object {key} is missing from {self.url}") from None
        except OSError as e:
            raise RepoError(f"cannot read {self.url}/{key}: {e.strerror}") from None

    def _walk(self, prefix: str) -> Iterator[tuple[str, int]]:
        base = self.root
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith("."):
                    continue  # an object still being written
                full = Path(dirpath) / name
                key = full.relative_to(base).as_posix()
                if key.startswith(prefix):
                    yield key, full.stat().st_size

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k, _ in self._walk(prefix))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        return dict(self._walk(prefix))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        self.prune(self._path(key).parent)

    def prune(self, parent: Path) -> None:
        """Remove `parent` and its parents up to the root while they are empty."""
        while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
            shutil.rmtree(parent, ignore_errors=True)
            parent = parent.parent


# ---- an S3-compatible bucket ---------------------------------------------------------------------

class _S3Writer(Writer):
    """botocore's errors (an unreachable endpoint, a quota, a denied PUT) become one RepoError."""

    def __init__(self, repo: "S3Repository", key: str):
        self.repo, self.name = repo, key
        self.client, self.bucket, self.key = repo.client, repo.bucket, repo.object_key(key)
        self.buf = bytearray()
        self.parts: list[dict] = []
        self.upload_id: str | None = None

    def _flush_part(self) -> None:
        try:
            self._upload_part()
        except Exception as e:  # noqa: BLE001 - botocore's errors, turned into one line
            raise self.repo.error(e, self.name, "write") from None

    def _upload_part(self) -> None:
        if self.upload_id is None:
            self.upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key)["UploadId"]
        n = len(self.parts) + 1
        r = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=n,
                                    Body=bytes(self.buf))
        self.parts.append({"PartNumber": n, "ETag": r["ETag"]})
        self.buf.clear()

    def write(self, data: bytes) -> int:
        self.buf += data
        if len(self.buf) >= PART_SIZE:
            self._flush_part()
        return len(data)

    def close(self) -> None:
        if self.upload_id is None:  # small object: one PUT
            try:
                self.client.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self.buf))
            except Exception as e:  # noqa: BLE001
                raise self.repo.error(e, self.name, "write") from None
            return
        if self.buf:
            self._flush_part()
        try:
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                                  MultipartUpload={"Parts": self.parts})
        except Exception as e:  # noqa: BLE001
            self.abort()
            raise self.repo.error(e, self.name, "write") from None

    def abort(self) -> None:
        if self.upload_id is not None:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
            except Exception:  # noqa: BLE001 - best effort; the bucket's lifecycle rule cleans up the rest
                pass


class _S3Reader:
    """The body of a GET as a file-like object (read(n) until b"")."""

    def __init__(self, body):
        self.body = body

    def read(self, n: int = -1) -> bytes:
        return self.body.read(None if n is None or n < 0 else n)

    def close(self) -> None:
        self.body.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class S3Repository(Repository):
    """s3://bucket/prefix on AWS S3, MinIO, Ceph RGW or any server speaking the S3 API (boto3).

    Credentials and region come from the config, else boto3's usual places (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, ~/.aws, an instance role)."""

    def __init__(self, url: str, *, endpoint: str = "", region: str = "", access_key: str = "",
                 secret_key: str = ""):
        import boto3
        from botocore.config import Config as BotoConfig

        u = urlparse(url)
        if not u.netloc:
            raise RepoError(f"repository {url!r}: expected s3://BUCKET[/PREFIX]")
        self.url = url.rstrip("/")
        self.bucket = u.netloc
        self.prefix = u.path.strip("/")
        kw = {}
        if endpoint:
            kw["endpoint_url"] = endpoint
        if region:
            kw["region_name"] = region
        if access_key:
            kw["aws_access_key_id"] = access_key
            kw["aws_secret_access_key"] = secret_key
        self.client = boto3.client("s3", config=BotoConfig(retries={"max_attempts": 5, "mode": "standard"}), **kw)

    def object_key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def error(self, e: Exception, key: str, doing: str) -> RepoError:
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404"):
            return RepoError(f"object {key} is missing from {self.url}")
        if code == "NoSuchBucket":
            return RepoError(f"bucket {self.bucket} does not exist (at {self.client.meta.endpoint_url})")
        return RepoError(f"cannot {doing} {self.url}/{key}: {code or type(e).__name__}: {e}")

    def open_write(self, key: str) -> Writer:
        return _S3Writer(self, key)

    def open_read(self, key: str) -> BinaryIO:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))
        except Exception as e:  # noqa: BLE001 - botocore's errors, turned into one line
            raise self.error(e, key, "read") from None
        return _S3Reader(r["Body"])  # type: ignore[return-value]

    def sizes(self, prefix: str = "") -> dict[str, int]:
        full = (self.prefix + "/" if self.prefix else "") + prefix
        out: dict[str, int] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix) + 1:] if self.prefix else obj["Key"]
                    out[key] = obj["Size"]
        except Exception as e:  # noqa: BLE001
            raise self.error(e, prefix or "(list)", "list") from None
        return out

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(self.sizes(prefix))

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))
        except Exception as e:  # noqa: BLE001
            raise self.error(e, key, "delete") from None


def open_repository(url: str, **s3) -> Repository:
    """`file:///path`, a plain absolute path, or `s3://bucket/prefix`."""
    if url.startswith("s3://"):
        return S3Repository(url, **s3)
    path = urlparse(url).path if url.startswith("file://") else url
    if not path.startswith("/"):
        raise RepoError(f"repository {url!r}: expected file:///ABSOLUTE/PATH, /ABSOLUTE/PATH or s3://BUCKET/PREFIX")
    return FileRepository(path)
