"""Reading samples [start, stop) of a shard through its sample index: ranged reads of exactly those samples' bytes
(pread, HTTP Range, ranged S3 GETs, fsspec cat_file), merged into large contiguous reads, cut apart by offset.

A reader that starts mid-shard reads nothing before its first sample, so every byte read is used (read
amplification 1.00x at any number of ranks x workers), and no tar header is parsed. The retry / skip / fail policy
and the skip counter are shard_reader's. Shards without an index (version 1 manifests), indexes that cannot be
read, and servers that ignore Range requests use shard_reader's sequential path instead.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Iterator
from urllib.parse import urlsplit

from shard_tools import transport
from shard_tools.errors import ShardIntegrityError, ShardReadError
from shard_tools.manifest import ShardInfo
from shard_tools.redaction import redact
from shard_tools.shard_index import BadIndex, ShardIndex
from shard_tools.shard_reader import iter_shard_samples, retrying
from shard_tools.transport import TIMEOUT, basename

log = logging.getLogger("shard_tools.indexed_reader")

# Bytes per ranged read: large enough to amortise object-storage latency, small enough to start streaming quickly.
CHUNK_BYTES = 8 << 20


def index_url(shard_url: str, shard: ShardInfo) -> str:
    """The index lies next to its shard."""
    return shard_url[: len(shard_url) - len(shard.name)] + shard.index


def read_index(shard_url: str, shard: ShardInfo, *, timeout: float = TIMEOUT) -> ShardIndex:
    """Load and check a shard's index against the manifest (sha256, sample count, size). Raises
    ShardIntegrityError when it does not match, OSError when it cannot be read."""
    url = index_url(shard_url, shard)
    blob = transport.read_bytes(url, timeout=timeout)
    if hashlib.sha256(blob).hexdigest() != shard.index_sha256:
        raise ShardIntegrityError(f"index {redact(url)}: sha256 differs from the manifest; rebuild or re-upload the "
                                  "dataset")
    try:
        index = ShardIndex.from_bytes(blob, basename(url))
    except BadIndex as e:
        raise ShardIntegrityError(str(e)) from None
    if len(index) != shard.num_samples or int(index.starts[-1]) > shard.bytes:
        raise ShardIntegrityError(f"index {redact(url)}: {len(index)} samples, the manifest says {shard.num_samples}")
    return index


def iter_indexed_samples(url: str, index: ShardIndex, *, start: int, stop: int, shard_bytes: int, retries: int = 3,
                         backoff: float = 0.5, on_error: str = "skip", verify_sha256: str | None = None,
                         skip_counter=None, timeout: float = TIMEOUT, chunk_bytes: int = CHUNK_BYTES
                         ) -> Iterator[dict]:
    """The samples [start, stop) of shard `url`, each exactly once, read by `index` in chunks of about
    `chunk_bytes`. A failed read is retried from the first sample not yet yielded. `verify_sha256` is checked only
    for a read of the whole shard (the bytes after the last sample, the tar's end blocks, are then read too).
    Raises transport.RangeUnsupported before yielding anything when the server ignores Range requests."""
    position = [start]  # the next sample to yield
    hasher = hashlib.sha256() if verify_sha256 and start == 0 and stop == len(index) else None

    def read_once() -> Iterator[dict]:
        while position[0] < stop:
            first = position[0]
            end = index.chunk_end(first, stop, chunk_bytes)
            offset, length = int(index.starts[first]), int(index.starts[end] - index.starts[first])
            blob = transport.read_range(url, offset, length, timeout=timeout)
            if len(blob) != length:
                raise ShardReadError(f"{basename(url)}: got {len(blob)} of {length} bytes at {offset}: truncated")
            if hasher is not None:
                hasher.update(blob)  # chunks are whole and consecutive, so a retry never hashes a byte twice
            for sample in index.samples(blob, first, end, url):
                yield sample
                position[0] += 1
        if hasher is not None:
            tail_start = int(index.starts[-1])
            hasher.update(transport.read_range(url, tail_start, shard_bytes - tail_start, timeout=timeout))
            if hasher.hexdigest() != verify_sha256:
                raise ShardIntegrityError(
                    f"shard {basename(url)}: sha256 mismatch (manifest {verify_sha256[:12]}..., read "
                    f"{hasher.hexdigest()[:12]}...); it changed after the manifest was written, rebuild or re-upload "
                    "the dataset")

    yield from retrying(url, read_once, lambda: stop - position[0], retries=retries, backoff=backoff,
                        on_error=on_error, skip_counter=skip_counter)


class RangeReader:
    """Samples [start, stop) of a manifest's shard: by index when the shard has one and its server honours Range,
    sequentially otherwise. Keeps each index it loads (one per shard and process) and remembers servers that ignore
    Range requests, so each costs one wasted request per process."""

    def __init__(self, *, on_error: str = "fail", verify: bool = False, skip_counter=None, retries: int = 3,
                 backoff: float = 0.5, timeout: float = TIMEOUT, use_index: bool = True):
        self.policy = dict(on_error=on_error, skip_counter=skip_counter, retries=retries, backoff=backoff,
                           timeout=timeout)
        self.verify, self.use_index = verify, use_index
        self.indexes: dict[str, ShardIndex | None] = {}
        self.sequential_hosts: set[str] = set()

    def __call__(self, url: str, shard: ShardInfo, start: int, stop: int) -> Iterator[dict]:
        whole = start == 0 and stop == shard.num_samples
        digest = shard.sha256 if self.verify and whole else None
        index = self.index(url, shard)
        if index is not None:
            produced = 0
            try:
                for sample in iter_indexed_samples(url, index, start=start, stop=stop, shard_bytes=shard.bytes,
                                                   verify_sha256=digest, **self.policy):
                    yield sample
                    produced += 1
                return
            except transport.RangeUnsupported:
                host = urlsplit(url).netloc
                log.warning("%s ignores HTTP Range requests: reading its shards sequentially", redact(host))
                self.sequential_hosts.add(host)
                start, digest = start + produced, (digest if produced == 0 else None)
        yield from iter_shard_samples(url, start=start, stop=stop, verify_sha256=digest, **self.policy)

    def index(self, url: str, shard: ShardInfo) -> ShardIndex | None:
        if not (self.use_index and shard.index) or urlsplit(url).netloc in self.sequential_hosts:
            return None
        if url not in self.indexes:
            try:
                self.indexes[url] = read_index(url, shard, timeout=self.policy["timeout"])
            except ShardIntegrityError:
                raise
            except OSError as e:  # the shard itself may still be readable
                log.warning("index of %s unreadable (%s): reading the shard sequentially", redact(url),
                            redact(str(e)))
                self.indexes[url] = None
        return self.indexes[url]
