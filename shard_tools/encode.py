"""Step 1 of a build: every image is decoded exactly once, in chunks of CSV rows, by any number of workers.

A chunk's worker turns each file into its stored form (images.prepare), appends the bytes to the chunk's spool file
and records per row: perceptual hash, where the bytes are, exact pixel sums, or the reason it was skipped. The
chunk's index (JSON) is written last and atomically, so an index on disk means a complete chunk; a rerun (a requeued
SLURM task) skips complete chunks. Chunks depend only on the CSV, never on the worker or slice count.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from shard_tools.fileio import atomic_write
from shard_tools.images import SkipImage, prepare
from shard_tools.stats import PixelSums

MAX_CHUNK = 1024


@dataclass
class Chunk:
    index: int
    rows: list[tuple[int, str, str, str]]  # (row, id, label, path)
    folder: str  # OUT/_plan/chunks
    size: int
    quality: int
    max_pixels: int | None

    @property
    def spool_path(self) -> str:
        return spool_path(self.folder, self.index)

    @property
    def index_path(self) -> str:
        return os.path.join(self.folder, f"chunk-{self.index:06d}.json")

    def done(self) -> bool:
        return os.path.exists(self.index_path)


def spool_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"chunk-{index:06d}.bin")


def chunk_size(num_rows: int) -> int:
    """Rows per chunk (consecutive runs of rows): ~64 chunks or more so workers stay balanced, 4 to MAX_CHUNK rows."""
    return min(MAX_CHUNK, max(4, math.ceil(num_rows / 64)))


def encode_chunk(chunk: Chunk) -> list[dict]:
    """Prepare every image of the chunk; -> one record per row (see the module docstring)."""
    records = []
    with atomic_write(chunk.spool_path) as spool:
        for row, image_id, label, path in chunk.rows:
            try:
                image = prepare(path, chunk.size, chunk.quality, chunk.max_pixels)
            except SkipImage as e:
                records.append({"row": row, "id": image_id, "reason": str(e)})
                continue
            sums = PixelSums()
            sums.add_histogram(image.histogram)
            records.append({
                "row": row, "id": image_id, "label": label, "hash": f"{image.phash:016x}",
                "passthrough": image.passthrough, "chunk": chunk.index, "offset": spool.tell(),
                "length": len(image.data), "pixels": sums.to_dict(),
            })
            spool.write(image.data)
    # The index goes last and atomically: it marks the chunk complete. No fsync (unlike the manifest): a chunk lost
    # in a machine crash is just encoded again, and 60 fsyncs cost more than the encoding on a busy disk.
    with atomic_write(chunk.index_path, "w") as f:
        f.write(json.dumps(records))  # dumps uses the C encoder; dump(records, f) the pure-Python one
    return records


def read_chunk(chunk: Chunk) -> list[dict]:
    with open(chunk.index_path, encoding="utf-8") as f:
        return json.load(f)


PIXEL_COLUMNS = ("count", "sum_r", "sum_g", "sum_b", "square_r", "square_g", "square_b")


@dataclass
class Encoded:
    """Encode records as compact columns (numpy arrays, one entry per encoded row; a few dozen bytes a row instead
    of a dict of Python objects), plus the rows that could not be used: (row, id, reason)."""

    row: np.ndarray  # int64 CSV row
    hash: np.ndarray  # uint64 perceptual hash
    passthrough: np.ndarray  # bool
    chunk: np.ndarray  # int64, with offset and length: where the stored bytes are in the spool
    offset: np.ndarray
    length: np.ndarray
    pixels: np.ndarray  # int64 (n, 7): PIXEL_COLUMNS of the stored image (exact; per image far below 2^63)
    skipped: list[tuple[int, str, str]]

    @classmethod
    def from_records(cls, records: list[dict]) -> "Encoded":
        kept = [r for r in records if "reason" not in r]
        pixels = [[int(r["pixels"]["count"])] + [int(x) for x in r["pixels"]["sums"] + r["pixels"]["squares"]]
                  for r in kept]
        return cls(
            np.array([r["row"] for r in kept], dtype=np.int64),
            np.array([int(r["hash"], 16) for r in kept], dtype=np.uint64),
            np.array([r["passthrough"] for r in kept], dtype=bool),
            np.array([r["chunk"] for r in kept], dtype=np.int64),
            np.array([r["offset"] for r in kept], dtype=np.int64),
            np.array([r["length"] for r in kept], dtype=np.int64),
            np.array(pixels, dtype=np.int64).reshape(len(kept), len(PIXEL_COLUMNS)),
            [(r["row"], r["id"], r["reason"]) for r in records if "reason" in r],
        )

    @classmethod
    def concat(cls, parts: list["Encoded"]) -> "Encoded":
        arrays = {name: np.concatenate([getattr(p, name) for p in parts])
                  for name in ("row", "hash", "passthrough", "chunk", "offset", "length", "pixels")}
        return cls(**arrays, skipped=[s for p in parts for s in p.skipped])


def encode_chunk_columns(chunk: Chunk) -> Encoded:
    """Pool entry point: the chunk's records as columns, which cost the parent far less to receive and keep."""
    return Encoded.from_records(encode_chunk(chunk))
