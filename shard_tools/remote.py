"""Where bytes live: a local folder, http(s)://, s3:// or any other fsspec URL.

Reading streams: a shard is read front to back through one open stream, never copied to local disk first.
- http(s) uses the standard library (urllib), with a socket timeout so a dead server is an error, never a hang.
- s3 uses boto3, which takes credentials, region and endpoint from the usual environment variables
  (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL or
  AWS_ENDPOINT_URL_S3 for S3-compatible stores such as MinIO or moto). Nothing here logs them, and `redact`
  strips credentials from any URL or message before it reaches a log, W&B config or checkpoint.
- any other scheme goes through fsspec (its backend package must be installed).

`iter_shard_samples` turns one shard into webdataset samples with retries: a failed download is re-opened and the
samples already yielded are skipped, so a consumer sees every sample of [start, stop) exactly once or, after the
last retry, the shard is skipped with a warning (on_error="skip") or the error is raised (on_error="fail").
`resilient_tarfile_to_samples` is the same as a webdataset pipeline stage, a drop-in for `wds.tarfile_to_samples()`.

`upload_dataset` copies a finished dataset folder to object storage, manifest.json last.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import http.client
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from typing import BinaryIO, Iterable, Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

from shard_tools.manifest import MANIFEST_NAME, Manifest, ManifestError, dataset_root, join_location

log = logging.getLogger(__name__)

# Seconds for a connection and for each read: a server that stops answering is an error after this, not a hang.
TIMEOUT = float(os.environ.get("SHARD_TOOLS_TIMEOUT", "30"))


class ShardReadError(OSError):
    """A shard could not be read completely (after all retries, when raised by iter_shard_samples)."""


def error_line(e: BaseException) -> str:
    """The reason of a ShardReadError in one line. Raised in a DataLoader worker, its message carries the worker's
    traceback: the reason is the last line, after the exception's qualified name."""
    return re.sub(r"^[\w.]+Error: ", "", str(e).strip().splitlines()[-1])


def damaged_sample(key: str, url: str | None, error: BaseException) -> ShardReadError:
    """The error for a sample whose JPEG does not decode: which sample, where, why, and what to run."""
    reason = (str(error).strip().splitlines() or [""])[-1].split(", ")[-1]  # torchvision prefixes its source line
    where = f" of {redact(url)}" if url else ""
    return ShardReadError(f"sample {key}{where} cannot be decoded ({reason}): the shard is damaged; "
                          "`python -m shard_tools verify DATA` checks every shard, then rebuild or re-upload it")


class ShardIntegrityError(ShardReadError):
    """A shard's bytes do not match the sha256 recorded in the manifest."""


# --- locations -----------------------------------------------------------------------------------------------------
def is_remote(location: str) -> bool:
    """True for URLs with a scheme (http, s3, ...), False for local paths and file:// URLs."""
    return "://" in location and not location.startswith("file://")


def local_path(location: str) -> str:
    return unquote(urlsplit(location).path) if location.startswith("file://") else location


_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def redact(text: str) -> str:
    """Hide credentials in a URL or any text holding URLs (log lines, error messages, configs):
    userinfo (`https://user:pass@host`), every query-string value (presigned URLs carry signatures there), and
    the literal values of the AWS credential variables should they appear."""
    text = re.sub(r"(\b[a-zA-Z][\w+.-]*://)[^/\s@]+@", r"\1***@", str(text))
    text = re.sub(r"([?&][^=&\s#]+=)[^&\s#'\"]*", r"\1***", text)
    for name in _SECRET_ENV:
        secret = os.environ.get(name)
        if secret and len(secret) >= 8:
            text = text.replace(secret, "***")
    return text


# --- opening streams -----------------------------------------------------------------------------------------------
def open_stream(url: str, *, timeout: float = TIMEOUT) -> BinaryIO:
    """Open `url` for streaming binary reads. A missing object is FileNotFoundError, a refused one PermissionError
    (neither is worth retrying); everything else that goes wrong is an OSError or, mid-read, a transport error."""
    if not is_remote(url):
        return open(local_path(url), "rb")
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https"):
        return _open_http(url, timeout)
    if scheme == "s3":
        return _open_s3(url, timeout)
    import fsspec

    return fsspec.open(url, "rb").open()


def _open_http(url: str, timeout: float) -> BinaryIO:
    parts = urlsplit(url)
    headers = {}
    if parts.username is not None:  # urllib does not take credentials from the URL itself: send them as Basic auth
        user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(user_pass).decode()
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        url = urlunsplit(parts._replace(netloc=host))
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise FileNotFoundError(f"{redact(url)}: not found (HTTP 404)") from None
        if e.code in (401, 403):
            raise PermissionError(f"{redact(url)}: access denied (HTTP {e.code})") from None
        raise ShardReadError(f"{redact(url)}: HTTP {e.code} {e.reason}") from None


def _s3_client(timeout: float | None = None):
    """A fresh client per call: cheap after the first (~5 ms), picks up the current environment, and is safe in
    forked DataLoader workers (boto3 clients must not cross a fork)."""
    import boto3
    from botocore.config import Config

    if timeout is None:
        return boto3.client("s3")
    # Our own retry loop is the only one: botocore's would multiply the time before a dead endpoint is reported.
    return boto3.client(
        "s3", config=Config(connect_timeout=timeout, read_timeout=timeout, retries={"total_max_attempts": 1})
    )


def _split_s3(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.netloc, parts.path.lstrip("/")


@contextlib.contextmanager
def _s3_errors(url: str):
    """botocore's and boto3's exceptions as the OSErrors the rest of the package handles."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except NoCredentialsError:
        raise PermissionError(
            f"{redact(url)}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(and AWS_ENDPOINT_URL for an S3-compatible store)"
        ) from None
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "NoSuchBucket", "404"):
            raise FileNotFoundError(f"{redact(url)}: not found ({code})") from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise PermissionError(f"{redact(url)}: access denied ({code})") from None
        raise ShardReadError(f"{redact(url)}: {code or redact(str(e))}") from None
    except (BotoCoreError, Boto3Error) as e:
        raise ShardReadError(f"{redact(url)}: {redact(str(e))}") from None


def _open_s3(url: str, timeout: float) -> BinaryIO:
    bucket, key = _split_s3(url)
    with _s3_errors(url):
        return _s3_client(timeout).get_object(Bucket=bucket, Key=key)["Body"]


def _transient_errors() -> tuple[type[BaseException], ...]:
    """What a retry may cure: network and server errors, and truncated data."""
    errors: tuple[type[BaseException], ...] = (OSError, http.client.HTTPException, tarfile.TarError, EOFError)
    try:
        from botocore.exceptions import BotoCoreError

        errors += (BotoCoreError,)
    except ImportError:
        pass
    return errors


def _permanent(e: BaseException) -> bool:
    return isinstance(e, (FileNotFoundError, PermissionError, ShardIntegrityError))


def read_bytes(url: str, *, retries: int = 3, backoff: float = 0.5, timeout: float = TIMEOUT) -> bytes:
    """The whole content of a small object (the manifest), retried on transient errors. Every failure is an OSError
    (FileNotFoundError when it is not there), so callers need no client-specific exceptions."""
    for attempt in range(retries + 1):
        try:
            with open_stream(url, timeout=timeout) as f:
                return f.read()
        except _transient_errors() as e:
            if _permanent(e) or (attempt == retries and isinstance(e, OSError)):
                raise
            if attempt == retries:
                raise ShardReadError(f"{redact(url)}: {redact(str(e))}") from None
            log.warning("reading %s failed (%s), retrying", redact(url), redact(str(e)))
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


def register_gopen_schemes() -> None:
    """Let plain webdataset (`wds.WebDataset("s3://...")`, `wds.tarfile_to_samples()`) open s3:// through boto3.
    http(s) keeps webdataset's own curl opener."""
    from webdataset.gopen import gopen_schemes

    def gopen_s3(url, mode="rb", bufsize=8192, **kw):
        if mode[0] != "r":
            raise ValueError(f"{mode}: shard_tools opens s3:// for reading only; use upload_dataset to write")
        return open_stream(url)

    gopen_schemes["s3"] = gopen_s3


# --- reading shards ------------------------------------------------------------------------------------------------
class _HashingReader:
    """Passes reads through, counting and (when asked) hashing the bytes on the way; tarfile only calls read()."""

    def __init__(self, stream: BinaryIO, name: str, hashing: bool):
        self.stream, self.name, self.bytes = stream, name, 0
        self.sha256 = hashlib.sha256() if hashing else None

    def __repr__(self) -> str:  # webdataset puts the stream into its error messages
        return self.name

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if self.sha256 is not None:
            self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        """Read to EOF: tarfile stops at the end-of-archive marker, before the padding that the sha256 covers."""
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.stream.close()


def _count_skip(counter) -> None:
    if counter is None:
        return
    if hasattr(counter, "get_lock"):  # multiprocessing.Value: shared with the DataLoader worker processes
        with counter.get_lock():
            counter.value += 1
    else:
        counter.value += 1


def shard_name(url: str) -> str:
    return urlsplit(url).path.rsplit("/", 1)[-1] or url


def iter_shard_samples(
    url: str,
    *,
    start: int = 0,
    stop: int | None = None,
    retries: int = 3,
    backoff: float = 0.5,
    on_error: str = "skip",
    verify_sha256: str | None = None,
    skip_counter=None,
    timeout: float = TIMEOUT,
) -> Iterator[dict]:
    """Yield the webdataset samples [start, stop) of one shard (`__key__`, `__url__`, and one bytes entry per
    file extension, e.g. `jpg`, `cls`, `json`), each exactly once.

    - A failed read (refused connection, HTTP 5xx, connection dropped mid-stream, timeout, truncated tar) is
      retried `retries` times with exponential backoff; the retry re-opens the shard and skips the samples already
      yielded. Pass `stop` (the manifest's sample count for a whole shard): a shard that ends early is then a
      truncated download too. A missing or forbidden shard is not retried.
    - After the last retry: on_error="fail" raises ShardReadError; "skip" logs a warning naming the shard and how
      many samples were lost, adds 1 to `skip_counter` (anything with `.value`; a `multiprocessing.Value("i", 0)`
      made before the DataLoader is shared by its workers) and returns.
    - `verify_sha256`: the hex digest from the manifest. The bytes are hashed while streaming and compared at EOF;
      a mismatch raises ShardIntegrityError whatever `on_error` says (the data is wrong, not unavailable). It is
      checked only when this call reads the shard to its end (stop is None or the shard's sample count): a slice
      that stops early reads a prefix and cannot be verified.
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', not {on_error!r}")
    from webdataset.tariterators import group_by_keys, tar_file_expander

    position = 0  # samples of this shard consumed so far (yielded, or skipped because they precede `start`)
    for attempt in range(retries + 1):
        reader = None
        try:
            reader = _HashingReader(open_stream(url, timeout=timeout), shard_name(url), verify_sha256 is not None)
            streams = [dict(url=url, stream=reader)]
            for index, sample in enumerate(group_by_keys(tar_file_expander(streams))):
                if index < position:
                    continue  # already yielded before a retry
                if stop is not None and index >= stop:
                    return
                position = index + 1
                if index >= start:
                    yield sample
            if stop is not None and position < stop:
                raise ShardReadError(f"{shard_name(url)}: ended after {position} samples, expected {stop}")
            if verify_sha256 is not None:
                reader.drain()
                digest = reader.sha256.hexdigest()
                if digest != verify_sha256:
                    raise ShardIntegrityError(
                        f"shard {shard_name(url)}: sha256 mismatch (manifest {verify_sha256[:12]}..., read "
                        f"{digest[:12]}... over {reader.bytes} bytes); it changed after the manifest was written, "
                        "rebuild or re-upload the dataset"
                    )
            return
        except _transient_errors() as e:
            if isinstance(e, ShardIntegrityError):
                raise
            # webdataset appends the stream and URL to exception args: keep the message, not the tuple
            detail = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
            message = redact(f"{type(e).__name__}: {detail}")
            if attempt < retries and not _permanent(e):
                log.warning("shard %s: %s; retry %d/%d", shard_name(url), message, attempt + 1, retries)
                time.sleep(backoff * 2**attempt)
                continue
            lost = (stop - max(position, start)) if stop is not None else "the remaining"
            if on_error == "fail":
                raise ShardReadError(f"shard {redact(url)}: {message} (after {attempt} retries)") from None
            log.warning(
                "skipping shard %s after %d retries (%s): %s samples lost", redact(url), attempt, message, lost
            )
            _count_skip(skip_counter)
            return
        finally:
            if reader is not None:
                reader.close()


def _resilient_samples(src: Iterable[dict], verify: bool = False, **kw) -> Iterator[dict]:
    for item in src:
        yield from iter_shard_samples(
            item["url"],
            start=item.get("start", 0),
            stop=item.get("stop", item.get("num_samples")),
            verify_sha256=item.get("sha256") if verify else None,
            **kw,
        )


def resilient_tarfile_to_samples(*, verify: bool = False, **kw):
    """A webdataset pipeline stage, the retrying counterpart of `wds.tarfile_to_samples()`: takes one
    dict(url=..., start=0, stop=None | num_samples=..., sha256=...) per shard and yields its samples through
    `iter_shard_samples` (keyword arguments are passed on; `verify=True` checks each dict's sha256)."""
    return functools.partial(_resilient_samples, verify=verify, **kw)


# --- upload --------------------------------------------------------------------------------------------------------
def _put(local_file: str, dest_url: str) -> None:
    """Copy one file to dest_url; the object appears whole or not at all (S3 PUT; temp name + rename elsewhere)."""
    if urlsplit(dest_url).scheme == "s3":
        bucket, key = _split_s3(dest_url)
        with _s3_errors(dest_url):
            _s3_client().upload_file(local_file, bucket, key)
        return
    if not is_remote(dest_url):
        path = local_path(dest_url)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
        os.close(fd)
        shutil.copyfile(local_file, tmp)
        os.replace(tmp, path)
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(dest_url)
    fs.put_file(local_file, path + ".partial")
    fs.mv(path + ".partial", path)


def _exists(url: str) -> bool:
    try:
        open_stream(url).close()
        return True
    except FileNotFoundError:
        return False


def _delete(url: str) -> None:
    if urlsplit(url).scheme == "s3":
        bucket, key = _split_s3(url)
        with _s3_errors(url):
            _s3_client().delete_object(Bucket=bucket, Key=key)
    elif not is_remote(url):
        os.remove(local_path(url))
    else:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        fs.rm(path)


def upload_dataset(local_dir: str, dest: str, *, overwrite: bool = False) -> list[str]:
    """Copy a finished dataset folder to `dest` (s3://bucket/prefix, a folder, or another writable fsspec URL):
    the shards first, then the other files (_info json, skipped.csv), manifest.json last, so a reader that finds the
    manifest finds every shard it names. With `overwrite`, the old manifest is deleted before anything is replaced.
    Returns the file names in upload order."""
    manifest = Manifest.read(local_dir)  # a folder without a valid manifest is an unfinished build: refuse it
    shards = [sh for split in manifest.splits.values() for sh in split.shards]
    for sh in shards:
        path = os.path.join(local_dir, sh.name)
        if not os.path.isfile(path) or os.path.getsize(path) != sh.bytes:
            raise ManifestError(f"{path}: missing or not the {sh.bytes} bytes the manifest records; rebuild it")
    names = [sh.name for sh in shards]
    others = sorted(  # _info json files, skipped.csv, ...
        f
        for f in os.listdir(local_dir)
        if os.path.isfile(os.path.join(local_dir, f)) and f not in names + [MANIFEST_NAME] and not f.startswith(".")
    )
    if urlsplit(dest).scheme in ("http", "https"):
        raise ValueError(f"cannot upload to {redact(dest)}: HTTP is read-only here; copy the folder to the server")
    root = dataset_root(dest)
    if not urlsplit(root).scheme and os.path.realpath(root) == os.path.realpath(local_dir):
        # --overwrite would delete the one manifest before copying it onto itself
        raise ValueError(f"{root} is the dataset being uploaded: give another destination")
    manifest_url = join_location(root, MANIFEST_NAME)
    if _exists(manifest_url):
        if not overwrite:
            raise FileExistsError(f"{redact(root)} already holds a dataset ({MANIFEST_NAME}); pass --overwrite")
        _delete(manifest_url)  # readers stop seeing the old dataset before its shards are replaced
    order = names + others + [MANIFEST_NAME]
    for name in order:
        _put(os.path.join(local_dir, name), join_location(root, name))
        log.info("uploaded %s", name)
    return order
