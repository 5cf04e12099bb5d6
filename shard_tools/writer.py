"""Step 3 of a build: pack one shard from the spooled bytes with webdataset's TarWriter (no image work left).

The shard is written under a hidden temporary name and renamed into place when complete, so a shard file with its
final name is always whole. The worker returns the shard's byte size and sha256 for the manifest, hashed on the way
to the disk. Next to it goes the shard's sample index (shard_index.py), recorded from the offsets TarWriter wrote.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile

import webdataset as wds

from shard_tools.encode import spool_path
from shard_tools.fileio import HashingStream, atomic_write
from shard_tools.plan import ShardTask
from shard_tools.shard_index import IndexRecorder, index_name


def sample_key(row: int) -> str:
    """The CSV row, zero-padded: unique, dot-free (webdataset splits keys at the first dot) and sortable."""
    return f"{row:09d}"


def write_shard(task: ShardTask, out: str) -> tuple[str, int, str]:
    """-> (name, bytes, sha256)."""
    spools: dict[int, int] = {}  # chunk -> open file descriptor
    try:
        # mtime=0: identical inputs give byte-identical shards (same sha256) whenever and wherever they are built.
        # encoder=False: every value is already the bytes to store (webdataset's encoder would only re-check that).
        with atomic_write(os.path.join(out, task.name)) as f:
            shard = HashingStream(f)  # the shard's sha256 without reading it back
            with wds.TarWriter(shard, mtime=0.0, encoder=False) as sink:
                # TarWriter documents USTAR as its default format but does not hand it to tarfile (PAX is used);
                # plain USTAR headers are all a 9-digit key needs, and a third cheaper to write.
                sink.tarstream.format = tarfile.USTAR_FORMAT
                recorder = IndexRecorder(sink.tarstream)
                for row, image_id, label, cls, chunk, offset, length in task.samples:
                    if chunk not in spools:
                        spools[chunk] = os.open(spool_path(task.spool_folder, chunk), os.O_RDONLY)
                    sink.write({
                        "__key__": sample_key(row),
                        "jpg": os.pread(spools[chunk], length, offset),
                        "cls": str(cls).encode(),
                        "json": json.dumps({"id": image_id, "label": label, "row": row}, ensure_ascii=False).encode(),
                    })
    finally:
        for fd in spools.values():
            os.close(fd)
    with atomic_write(os.path.join(out, index_name(task.name))) as f:
        f.write(recorder.index().to_bytes())
    return task.name, shard.bytes, shard.hexdigest()


def index_fields(out: str, shard_name: str) -> dict:
    """The manifest's entry for the index written next to shard `shard_name`: its file name and sha256."""
    name = index_name(shard_name)
    with open(os.path.join(out, name), "rb") as f:
        return {"index": name, "index_sha256": hashlib.sha256(f.read()).hexdigest()}


def write_shard_job(args: tuple[ShardTask, str]) -> tuple[str, int, str]:
    """Pool entry point (one picklable argument)."""
    return write_shard(*args)
