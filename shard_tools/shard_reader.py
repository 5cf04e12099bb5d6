"""Reading one shard as webdataset samples, with retries that resume where the failure happened.

`iter_shard_samples` yields the samples [start, stop) of a shard exactly once: a failed download is re-opened and the
samples already yielded are skipped; after the last retry the shard is skipped with a warning (on_error="skip") or
the error is raised (on_error="fail"). `resilient_tarfile_to_samples` is the same as a webdataset pipeline stage, a
drop-in for `wds.tarfile_to_samples()`.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Callable, Iterable, Iterator

from shard_tools import transport
from shard_tools.errors import ShardIntegrityError, ShardReadError
from shard_tools.fileio import HashingStream
from shard_tools.redaction import redact
from shard_tools.transport import TIMEOUT, basename

log = logging.getLogger("shard_tools.shard_reader")


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
    done = [0]  # samples of this shard consumed so far (yielded, or passed over because they precede `start`)
    yield from retrying(url, lambda: _read_once(url, start, stop, done, verify_sha256, timeout),
                        lambda: (stop - max(done[0], start)) if stop is not None else "the remaining",
                        retries=retries, backoff=backoff, on_error=on_error, skip_counter=skip_counter)


def retrying(url: str, read_once: Callable[[], Iterator[dict]], lost: Callable[[], object], *, retries: int,
             backoff: float, on_error: str, skip_counter) -> Iterator[dict]:
    """The one retry policy of every shard reader: call `read_once()` (which resumes after what it already yielded)
    until it finishes, at most `retries` more times after transient errors; then skip (warn, count) or raise.
    `lost()` says how many samples a skip loses."""
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', not {on_error!r}")
    for attempt in range(retries + 1):
        try:
            yield from read_once()
            return
        except transport.transient_errors() as e:
            if isinstance(e, (ShardIntegrityError, transport.RangeUnsupported)):
                raise
            message = _describe(e)
            if attempt < retries and not transport.permanent(e):
                log.warning("shard %s: %s; retry %d/%d", basename(url), message, attempt + 1, retries)
                time.sleep(backoff * 2**attempt)
                continue
            if on_error == "fail":
                raise ShardReadError(f"shard {redact(url)}: {message} (after {attempt} retries)") from None
            log.warning("skipping shard %s after %d retries (%s): %s samples lost", redact(url), attempt, message,
                        lost())
            count_skip(skip_counter)
            return


def _read_once(url: str, start: int, stop: int | None, done: list[int], verify_sha256: str | None,
               timeout: float) -> Iterator[dict]:
    """One pass over the shard from its first byte, yielding the samples not yet consumed (`done[0]` counts them)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    reader = HashingStream(transport.open_stream(url, timeout=timeout), basename(url), verify_sha256 is not None)
    try:
        for index, sample in enumerate(group_by_keys(tar_file_expander([dict(url=url, stream=reader)]))):
            if index < done[0]:
                continue  # already yielded before a retry
            if stop is not None and index >= stop:
                return
            done[0] = index + 1
            if index >= start:
                yield sample
        if stop is not None and done[0] < stop:
            raise ShardReadError(f"{basename(url)}: ended after {done[0]} samples, expected {stop}")
        if verify_sha256 is not None:
            reader.drain()
            if reader.hexdigest() != verify_sha256:
                raise ShardIntegrityError(
                    f"shard {basename(url)}: sha256 mismatch (manifest {verify_sha256[:12]}..., read "
                    f"{reader.hexdigest()[:12]}... over {reader.bytes} bytes); it changed after the manifest was "
                    "written, rebuild or re-upload the dataset")
    finally:
        reader.close()


def _describe(e: BaseException) -> str:
    # webdataset appends the stream and URL to exception args: keep the message, not the tuple
    detail = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    return redact(f"{type(e).__name__}: {detail}")


def count_skip(counter) -> None:
    if counter is None:
        return
    if hasattr(counter, "get_lock"):  # multiprocessing.Value: shared with the DataLoader worker processes
        with counter.get_lock():
            counter.value += 1
    else:
        counter.value += 1


def _resilient_samples(src: Iterable[dict], verify: bool = False, **kw) -> Iterator[dict]:
    for item in src:
        yield from iter_shard_samples(item["url"], start=item.get("start", 0),
                                      stop=item.get("stop", item.get("num_samples")),
                                      verify_sha256=item.get("sha256") if verify else None, **kw)


def resilient_tarfile_to_samples(*, verify: bool = False, **kw):
    """A webdataset pipeline stage, the retrying counterpart of `wds.tarfile_to_samples()`: takes one
    dict(url=..., start=0, stop=None | num_samples=..., sha256=...) per shard and yields its samples through
    `iter_shard_samples` (keyword arguments are passed on; `verify=True` checks each dict's sha256)."""
    return functools.partial(_resilient_samples, verify=verify, **kw)


def register_gopen_schemes() -> None:
    """Let plain webdataset (`wds.WebDataset("s3://...")`, `wds.tarfile_to_samples()`) open s3:// through boto3.
    http(s) keeps webdataset's own curl opener."""
    from webdataset.gopen import gopen_schemes

    def gopen_s3(url, mode="rb", bufsize=8192, **kw):
        if mode[0] != "r":
            raise ValueError(f"{mode}: shard_tools opens s3:// for reading only; use upload_dataset to write")
        return transport.open_stream(url)

    gopen_schemes["s3"] = gopen_s3
