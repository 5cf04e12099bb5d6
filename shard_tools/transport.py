"""Where bytes live: a local folder, http(s)://, s3:// or any other fsspec URL, behind one small interface.

    open_stream(url)  read_range(url, start, length)  read_bytes(url)  put_file(local, url)  delete(url)  exists(url)

- Local paths and file:// URLs are plain files.
- http(s) uses the standard library (urllib), with a socket timeout so a dead server is an error, never a hang.
  It is read-only.
- s3 uses boto3, which takes credentials, region and endpoint from the usual environment variables
  (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL or
  AWS_ENDPOINT_URL_S3 for S3-compatible stores such as MinIO or moto). Nothing here logs them, and `redact`
  strips credentials from any URL or message before it reaches a log, W&B config or checkpoint.
- any other scheme goes through fsspec (its backend package must be installed).

Failures are OSErrors: FileNotFoundError for a missing object and PermissionError for a refused one (neither is
worth retrying), ShardReadError for the rest (a retry may cure those).
"""
from __future__ import annotations

import base64
import contextlib
import http.client
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
from typing import BinaryIO
from urllib.parse import unquote, urlsplit, urlunsplit

from shard_tools.errors import ShardIntegrityError, ShardReadError
from shard_tools.fileio import atomic_write
from shard_tools.redaction import redact

log = logging.getLogger("shard_tools.transport")

class RangeUnsupported(ShardReadError):
    """The server sent the whole object for a Range request: read it sequentially instead."""


# Seconds for a connection and for each read: a server that stops answering is an error after this, not a hang.
TIMEOUT = float(os.environ.get("SHARD_TOOLS_TIMEOUT", "30"))


# --- locations -----------------------------------------------------------------------------------------------------
def is_url(location: str) -> bool:
    """True for URLs with a scheme (http, s3, ...); False for local paths and file:// URLs, which are local files."""
    return "://" in str(location) and not str(location).startswith("file://")


def local_path(location: str) -> str:
    return unquote(urlsplit(location).path) if location.startswith("file://") else location


def join(base: str, name: str) -> str:
    """`name` inside the folder or URL prefix `base`."""
    return f"{base.rstrip('/')}/{name}" if is_url(base) else os.path.join(local_path(base), name)


def basename(url: str) -> str:
    return urlsplit(url).path.rsplit("/", 1)[-1] or url


# --- one backend per kind of location ------------------------------------------------------------------------------
class _Local:
    def open(self, url: str, timeout: float) -> BinaryIO:
        return open(local_path(url), "rb")

    def read_range(self, url: str, start: int, length: int, timeout: float) -> bytes:
        with open(local_path(url), "rb") as f:
            return os.pread(f.fileno(), length, start)

    def put(self, local_file: str, url: str) -> None:
        path = local_path(url)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(local_file, "rb") as src, atomic_write(path) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    def delete(self, url: str) -> None:
        os.remove(local_path(url))


class _Http:
    def open(self, url: str, timeout: float, headers: dict | None = None) -> BinaryIO:
        parts = urlsplit(url)
        headers = dict(headers or {})
        if parts.username is not None:  # urllib does not take credentials from the URL itself: send Basic auth
            user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(user_pass).decode()
            url = urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
        try:
            return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise FileNotFoundError(f"{redact(url)}: not found (HTTP 404)") from None
            if e.code in (401, 403):
                raise PermissionError(f"{redact(url)}: access denied (HTTP {e.code})") from None
            raise ShardReadError(f"{redact(url)}: HTTP {e.code} {e.reason}") from None

    def read_range(self, url: str, start: int, length: int, timeout: float) -> bytes:
        with self.open(url, timeout, {"Range": f"bytes={start}-{start + length - 1}"}) as response:
            if response.status != 206:  # a server without Range support sends the whole object
                raise RangeUnsupported(f"{redact(url)}: the server ignores HTTP Range requests")
            return response.read()

    def put(self, local_file: str, url: str) -> None:
        raise ValueError(f"cannot write to {redact(url)}: HTTP is read-only here; copy the folder to the server")

    delete = put


class _S3:
    @staticmethod
    def client(timeout: float | None = None):
        """A fresh client per call: cheap after the first, picks up the current environment, and is safe in forked
        DataLoader workers (boto3 clients must not cross a fork)."""
        import boto3
        from botocore.config import Config

        if timeout is None:
            return boto3.client("s3")
        # Our own retry loop is the only one: botocore's would multiply the time before a dead endpoint is reported.
        return boto3.client("s3", config=Config(connect_timeout=timeout, read_timeout=timeout,
                                                retries={"total_max_attempts": 1}))

    @staticmethod
    def split(url: str) -> tuple[str, str]:
        parts = urlsplit(url)
        return parts.netloc, parts.path.lstrip("/")

    def open(self, url: str, timeout: float, **range_kw) -> BinaryIO:
        bucket, key = self.split(url)
        with s3_errors(url):
            return self.client(timeout).get_object(Bucket=bucket, Key=key, **range_kw)["Body"]

    def read_range(self, url: str, start: int, length: int, timeout: float) -> bytes:
        with s3_errors(url), self.open(url, timeout, Range=f"bytes={start}-{start + length - 1}") as body:
            return body.read()

    def put(self, local_file: str, url: str) -> None:
        bucket, key = self.split(url)
        with s3_errors(url):
            self.client().upload_file(local_file, bucket, key)  # a PUT: the object appears whole or not at all

    def delete(self, url: str) -> None:
        bucket, key = self.split(url)
        with s3_errors(url):
            self.client().delete_object(Bucket=bucket, Key=key)


class _Fsspec:
    def open(self, url: str, timeout: float) -> BinaryIO:
        import fsspec

        return fsspec.open(url, "rb").open()

    def read_range(self, url: str, start: int, length: int, timeout: float) -> bytes:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        return fs.cat_file(path, start=start, end=start + length)

    def put(self, local_file: str, url: str) -> None:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        fs.put_file(local_file, path + ".partial")
        fs.mv(path + ".partial", path)

    def delete(self, url: str) -> None:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        fs.rm(path)


def _backend(url: str):
    """The one place that decides how a location is reached."""
    if not is_url(url):
        return _Local()
    return {"http": _Http, "https": _Http, "s3": _S3}.get(urlsplit(url).scheme, _Fsspec)()


@contextlib.contextmanager
def s3_errors(url: str):
    """botocore's and boto3's exceptions as the OSErrors the rest of the package handles."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except NoCredentialsError:
        raise PermissionError(f"{redact(url)}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                              "(and AWS_ENDPOINT_URL for an S3-compatible store)") from None
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "NoSuchBucket", "404"):
            raise FileNotFoundError(f"{redact(url)}: not found ({code})") from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise PermissionError(f"{redact(url)}: access denied ({code})") from None
        raise ShardReadError(f"{redact(url)}: {code or redact(str(e))}") from None
    except (BotoCoreError, Boto3Error) as e:
        raise ShardReadError(f"{redact(url)}: {redact(str(e))}") from None


# --- the interface -------------------------------------------------------------------------------------------------
def open_stream(url: str, *, timeout: float = TIMEOUT) -> BinaryIO:
    """Open `url` for streaming binary reads."""
    return _backend(url).open(url, timeout)


def read_range(url: str, start: int, length: int, *, timeout: float = TIMEOUT) -> bytes:
    """`length` bytes of `url` from byte `start`: pread, an HTTP Range request or a ranged S3 GET."""
    return _backend(url).read_range(url, start, length, timeout)


def put_file(local_file: str, url: str) -> None:
    """Copy one local file to `url`; the copy appears whole or not at all."""
    _backend(url).put(local_file, url)


def delete(url: str) -> None:
    _backend(url).delete(url)


def exists(url: str) -> bool:
    try:
        open_stream(url).close()
        return True
    except FileNotFoundError:
        return False


def transient_errors() -> tuple[type[BaseException], ...]:
    """What a retry may cure: network and server errors, and truncated data."""
    errors: tuple[type[BaseException], ...] = (OSError, http.client.HTTPException, tarfile.TarError, EOFError)
    try:
        from botocore.exceptions import BotoCoreError

        errors += (BotoCoreError,)
    except ImportError:
        pass
    return errors


def permanent(e: BaseException) -> bool:
    """Failures a retry cannot cure."""
    return isinstance(e, (FileNotFoundError, PermissionError, ShardIntegrityError))


def read_bytes(url: str, *, retries: int = 3, backoff: float = 0.5, timeout: float = TIMEOUT) -> bytes:
    """The whole content of a small object (the manifest), retried on transient errors. Every failure is an OSError
    (FileNotFoundError when it is not there), so callers need no client-specific exceptions."""
    for attempt in range(retries + 1):
        try:
            with open_stream(url, timeout=timeout) as f:
                return f.read()
        except transient_errors() as e:
            if permanent(e) or (attempt == retries and isinstance(e, OSError)):
                raise
            if attempt == retries:
                raise ShardReadError(f"{redact(url)}: {redact(str(e))}") from None
            log.warning("reading %s failed (%s), retrying", redact(url), redact(str(e)))
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")
