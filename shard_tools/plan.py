"""The build's settings, its work list (OUT/_plan/) and, once every image is encoded, the layout: which sample goes
to which split, shard and position.

The layout depends only on the CSV, the image contents and the settings (never on the number of workers or SLURM
slices), so every way of running a build writes the same bytes.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from shard_tools.encode import PIXEL_COLUMNS, Chunk, Encoded, chunk_size
from shard_tools.errors import UsageError
from shard_tools.fileio import write_json_atomic
from shard_tools.images import DEFAULT_MAX_PIXELS
from shard_tools.labels import Skipped, class_order
from shard_tools.manifest import SPLITS
from shard_tools.split import DEFAULT_MAX_DISTANCE, assign_splits, count_duplicate_groups, group_near_duplicates
from shard_tools.stats import PixelSums

PLAN_DIR = "_plan"


class BuildError(UsageError, ValueError):
    """A build that cannot start or finish; the message is one line saying what to do."""


@dataclass
class BuildSettings:
    """Everything that determines the output bytes (and nothing that does not, like the worker count)."""

    images: str
    labels: str
    val_fraction: float = 0.1
    seed: int = 0
    size: int = 256
    quality: int = 90
    shard_size: int = 1000
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    id_column: str | None = None
    label_column: str | None = None
    dup_distance: int = DEFAULT_MAX_DISTANCE

    def __post_init__(self):
        self.images, self.labels = os.fspath(self.images), os.fspath(self.labels)  # accept pathlib.Path too

    def check(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise BuildError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.size < 1 or self.shard_size < 1:
            raise BuildError("--size and --shard-size must be positive")
        if not 1 <= self.quality <= 100:
            raise BuildError(f"--quality must be in 1..100, got {self.quality}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise BuildError("--max-pixels must be positive")
        if not 0 <= self.dup_distance <= 63:
            raise BuildError("--dup-distance must be in 0..63")


@dataclass
class WorkList:
    """What `plan` decides before any image is opened: the rows to encode, in chunks, and the rows already skipped
    by the CSV checks. Saved as OUT/_plan/{plan.json,rows.csv} so SLURM array tasks can share it."""

    settings: BuildSettings
    folder: str  # OUT/_plan
    rows: pd.DataFrame  # row, id, label, path; in CSV order
    skipped: list[Skipped]
    total_rows: int

    @property
    def num_chunks(self) -> int:
        return math.ceil(len(self.rows) / chunk_size(self.total_rows))

    def chunks(self, with_rows: bool = True):
        """Every chunk, made one at a time as it is asked for: all at once would hold a tuple per row. Without rows
        (`with_rows=False`), for what needs only a chunk's files."""
        s, size = self.settings, chunk_size(self.total_rows)
        folder = os.path.join(self.folder, "chunks")
        for i in range(self.num_chunks):
            part = self.rows.iloc[i * size : (i + 1) * size] if with_rows else self.rows.iloc[:0]
            yield Chunk(i, list(zip(*(part[c].tolist() for c in ("row", "id", "label", "path")))), folder, s.size,
                        s.quality, s.max_pixels)

    def save(self) -> None:
        os.makedirs(os.path.join(self.folder, "chunks"), exist_ok=True)
        self.rows.to_csv(os.path.join(self.folder, "rows.csv"), index=False)
        meta = {"settings": asdict(self.settings), "total_rows": self.total_rows,
                "skipped": [{"row": s.row, "id": s.id, "reason": s.reason} for s in self.skipped]}
        write_json_atomic(os.path.join(self.folder, "plan.json"), meta)  # last: marks a complete work list

    @classmethod
    def load(cls, folder: str) -> "WorkList":
        folder = os.fspath(folder)
        try:
            with open(os.path.join(folder, "plan.json"), encoding="utf-8") as f:
                meta = json.load(f)
            rows = pd.read_csv(os.path.join(folder, "rows.csv"), dtype={"id": str, "label": str, "path": str},
                               keep_default_na=False)
        except (OSError, ValueError) as e:
            raise BuildError(f"no usable plan in {folder} ({e}); run `python -m shard_tools plan ...` first") from None
        return cls(BuildSettings(**meta["settings"]), folder, rows, [Skipped(**s) for s in meta["skipped"]],
                   meta["total_rows"])


@dataclass
class ShardTask:
    """One shard to pack: where each sample's stored bytes are, in order."""

    name: str
    split: str
    samples: list[tuple[int, str, str, int, int, int, int]]  # (row, id, label, class, chunk, offset, length)
    spool_folder: str


@dataclass
class Layout:
    classes: list[str]
    samples: pd.DataFrame  # one row per sample, in split/shard/position order
    skipped: list[Skipped]
    duplicate_groups: int
    duplicate_images: int

    def shard_tasks(self, spool_folder: str):
        """Every shard's task, biggest first (so no worker is left alone with a big one at the end), made one at a
        time as the pool asks for them: all of them at once would hold a Python tuple per sample."""
        positions = self.samples.groupby("shard", sort=False).indices
        sizes = {name: len(p) for name, p in positions.items()}
        for name in sorted(sizes, key=lambda name: -sizes[name]):
            part = self.samples.iloc[positions[name]]
            cols = [part[c].tolist() for c in ("row", "id", "label", "cls", "chunk", "offset", "length")]
            yield ShardTask(name, part["split"].iloc[0], list(zip(*cols)), spool_folder)

    def pixel_sums(self, split: str) -> PixelSums:
        """Exact sums over every stored pixel of a split (integer addition: order does not matter)."""
        columns = self.samples.loc[self.samples["split"] == split, list(PIXEL_COLUMNS)].to_numpy()
        count, *rest = (exact_sum(columns[:, j]) for j in range(len(PIXEL_COLUMNS)))
        return PixelSums(count, rest[:3], rest[3:])


def exact_sum(values: np.ndarray) -> int:
    """Sum of non-negative int64 values as an exact Python int: high and low 32 bits are summed apart, so the total
    may pass 2^63 without overflow (each half sums to below 2^63 for up to 2^31 values)."""
    values = values.astype(np.uint64)
    return (int((values >> np.uint64(32)).sum()) << 32) + int((values & np.uint64(0xFFFFFFFF)).sum())


def hex_hashes(hashes: np.ndarray) -> np.ndarray:
    """uint64 hashes -> 16-digit hex strings, column-wise (a format call per row costs seconds at millions)."""
    raw = np.ascontiguousarray(hashes, dtype=">u8").view(np.uint8).reshape(-1, 8)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    text = np.stack([digits[raw >> 4], digits[raw & 15]], axis=2).reshape(len(hashes), 16)
    return np.ascontiguousarray(text).view("S16").ravel().astype(str)


def shard_codes(n: int, shard_size: int) -> np.ndarray:
    """Shard number of each of `n` consecutive samples: ceil(n / shard_size) shards of equal size (within one)."""
    return np.arange(n) * math.ceil(n / shard_size) // max(n, 1)


def make_layout(settings: BuildSettings, rows: pd.DataFrame, encoded: Encoded, skipped: list[Skipped]) -> Layout:
    """From the plan's rows and every row's encode result: group near-duplicates, split, shuffle within each split,
    cut into shards."""
    skipped = sorted(skipped + [Skipped(*s) for s in encoded.skipped], key=lambda s: s.row)
    if len(encoded.row) == 0:
        first = skipped[0]
        raise BuildError(f"no image in {settings.images} could be read "
                         f"(row {first.row}, id '{first.id}': {first.reason})")
    by_row = np.argsort(encoded.row, kind="stable")  # encoded positions in CSV order
    plan_pos = np.searchsorted(rows["row"].to_numpy(), encoded.row[by_row])
    labels = rows["label"].to_numpy()[plan_pos]
    classes = class_order(pd.unique(labels))  # from the rows that survived, so every class has samples
    cls = pd.Categorical(labels, categories=classes).codes.astype(np.int64)
    del labels
    groups = group_near_duplicates(encoded.hash[by_row], settings.dup_distance)
    is_val = assign_splits(cls, groups, len(classes), settings.val_fraction, settings.seed)
    # Sample order inside a split is a seeded shuffle, so each shard is a random mix of classes. The table is built
    # once, in that order, with split and shard as categories: a table in CSV order reordered afterwards, and a
    # string per sample for its split and shard, held several hundred bytes a row at the parent's memory peak.
    rng = np.random.default_rng([settings.seed, 1])
    order, shard, names = [], [], []
    for split in SPLITS:
        members = np.flatnonzero(is_val == (split == "val"))
        order.append(members[rng.permutation(len(members))])
        codes = shard_codes(len(members), settings.shard_size)
        shard.append(codes + len(names))
        names += [f"{split}-{i:06d}.tar" for i in range(codes[-1] + 1 if len(codes) else 0)]
    order = np.concatenate(order)  # table position -> position in CSV order
    at = by_row[order]  # -> position in `encoded`
    pixels = encoded.pixels[at]
    samples = pd.DataFrame({  # copy=False: numpy's gathers are already new arrays, and pandas would copy them again
        "row": encoded.row[at], "id": rows["id"].to_numpy()[plan_pos[order]],
        "label": pd.Categorical.from_codes(cls[order], classes), "hash": encoded.hash[at],
        "passthrough": encoded.passthrough[at], "chunk": encoded.chunk[at], "offset": encoded.offset[at],
        "length": encoded.length[at],
        **{name: pixels[:, j] for j, name in enumerate(PIXEL_COLUMNS)},
        "cls": cls[order], "group": encoded.row[by_row][groups[order]],  # a group is named by its first CSV row
        "split": pd.Categorical.from_codes(is_val[order].astype(np.int8), list(SPLITS)),
        "shard": pd.Categorical.from_codes(np.concatenate(shard), names),
    }, copy=False)
    n_groups, n_images = count_duplicate_groups(groups)
    return Layout(classes, samples, skipped, n_groups, n_images)
