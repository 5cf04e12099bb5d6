"""The manifest: the one contract between `shard_tools` (writer) and `distributed_train` (reader).

`OUT/manifest.json` describes a finished dataset: class names in index order, per split its shards (name, sample
count, byte size, sha256) and per-class counts, and the training split's exact per-channel mean/std on the 0-1 scale.
It is written last and atomically, so a reader never sees a manifest that points at incomplete shards.

Bump `VERSION` whenever a field changes meaning; `Manifest.from_dict` refuses versions it does not know.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from shard_tools import transport
from shard_tools.errors import UsageError
from shard_tools.fileio import write_json_atomic
from shard_tools.redaction import redact

FORMAT = "shard_tools.manifest"
VERSION = 2  # 2: shards may list a sample index (ShardInfo.index); version 1 manifests are still read
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")


class ManifestError(UsageError, ValueError):
    """A manifest that is missing, unreadable or inconsistent: the message says which and what to do."""


@dataclass
class ShardInfo:
    name: str  # file name relative to the dataset folder/URL, e.g. "train-000000.tar"
    num_samples: int
    bytes: int
    sha256: str
    index: str = ""  # the shard's sample index next to it (shard_index.py), "" when there is none
    index_sha256: str = ""


@dataclass
class SplitInfo:
    num_samples: int
    class_counts: list[int]  # index = class index
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass
class ChannelStats:
    """Per-channel (R, G, B) mean and std over every pixel of the stored training images, on the 0-1 scale."""

    mean: list[float]
    std: list[float]
    pixels: int  # pixels per channel the statistics were computed over


@dataclass
class Manifest:
    classes: list[str]
    splits: dict[str, SplitInfo]
    stats: ChannelStats
    image_size: int  # shorter side of stored images is at most this
    duplicate_groups: int  # groups of >= 2 near-duplicate images (kept within one split)
    source: dict = field(default_factory=dict)  # provenance: rows, written, skipped, seed, val_fraction, ...
    version: int = VERSION
    format: str = FORMAT
    root: str = field(default="", repr=False, compare=False)  # the folder or URL it was read from; not stored

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ManifestError(f"the dataset has no '{name}' split (it has: {', '.join(self.splits) or 'none'})")
        return self.splits[name]

    # --- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        del d["root"]
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a shard_tools manifest (no \"format\": \"{FORMAT}\")")
        if d.get("version") not in READABLE_VERSIONS:
            raise ManifestError(
                f"{where}: manifest version {d.get('version')} is not supported by this version of the package "
                f"(it reads {' and '.join(map(str, READABLE_VERSIONS))}); "
                "rebuild the shards with `python -m shard_tools build` or upgrade the package"
            )
        try:
            m = cls(
                classes=list(d["classes"]),
                splits={
                    k: SplitInfo(
                        num_samples=int(s["num_samples"]),
                        class_counts=[int(c) for c in s["class_counts"]],
                        shards=[ShardInfo(**sh) for sh in s["shards"]],
                    )
                    for k, s in d["splits"].items()
                },
                stats=ChannelStats(**d["stats"]),
                image_size=int(d["image_size"]),
                duplicate_groups=int(d["duplicate_groups"]),
                source=dict(d.get("source", {})),
                version=int(d["version"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        m.validate(where)
        return m

    def validate(self, where: str = "manifest") -> None:
        """Internal consistency: every count adds up, stats are sane. Raises ManifestError."""
        problems = []
        if not self.classes or len(set(self.classes)) != len(self.classes):
            problems.append("class names must be non-empty and unique")
        for name, s in self.splits.items():
            if len(s.class_counts) != len(self.classes):
                problems.append(f"split '{name}': {len(s.class_counts)} class counts for {len(self.classes)} classes")
            if sum(s.class_counts) != s.num_samples:
                problems.append(f"split '{name}': class counts sum to {sum(s.class_counts)}, not {s.num_samples}")
            if sum(sh.num_samples for sh in s.shards) != s.num_samples:
                problems.append(f"split '{name}': shard sample counts do not add up to {s.num_samples}")
            names = [sh.name for sh in s.shards] + [sh.index for sh in s.shards if sh.index]
            if len(set(names)) != len(names):
                problems.append(f"split '{name}': duplicate shard or index names")
            if any("/" in n or n.startswith(".") for n in names):
                problems.append(f"split '{name}': shard names must be plain file names")
        if "train" not in self.splits:
            problems.append("there is no 'train' split")
        if len(self.stats.mean) != 3 or len(self.stats.std) != 3:
            problems.append("stats need 3 channels (RGB)")
        elif not all(0.0 <= m <= 1.0 for m in self.stats.mean) or not all(0.0 < s <= 1.0 for s in self.stats.std):
            problems.append(f"stats out of range for 0-1 pixels: mean={self.stats.mean} std={self.stats.std}")
        if problems:
            raise ManifestError(f"{where}: invalid manifest: " + "; ".join(problems))

    # --- files ---------------------------------------------------------------------------------------------------
    def write(self, out_dir: str) -> str:
        """Validate, then write `out_dir/manifest.json` atomically (temp file + rename in the same folder)."""
        self.validate(os.path.join(out_dir, MANIFEST_NAME))
        path = os.path.join(out_dir, MANIFEST_NAME)
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def read(cls, location: str) -> "Manifest":
        """Read and validate the manifest of a dataset folder or URL (or a path to manifest.json itself)."""
        path = manifest_location(os.fspath(location))
        try:
            text = transport.read_bytes(path).decode("utf-8")
        except FileNotFoundError:
            raise ManifestError(
                f"no manifest at {redact(path)}: point --data at a folder made by `python -m shard_tools "
                "build`") from None
        except OSError as e:
            raise ManifestError(f"cannot read {redact(path)}: {redact(str(e))}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not valid JSON ({e}); "
                                "the build may have been interrupted, rebuild it") from None
        manifest = cls.from_dict(d, where=path)
        manifest.root = dataset_root(os.fspath(location))
        return manifest

    def shard_url(self, shard: ShardInfo) -> str:
        """Where a shard of this dataset is: next to the manifest it was read from."""
        return transport.join(self.root, shard.name)

    def shard_urls(self, split: str) -> list[str]:
        """Full path/URL of each shard of `split`, in manifest order."""
        return [self.shard_url(sh) for sh in self.split(split).shards]


def dataset_root(location: str) -> str:
    """The dataset folder/URL, given either it or its manifest.json."""
    loc = location.rstrip("/")
    return loc[: -len(MANIFEST_NAME) - 1] if loc.endswith("/" + MANIFEST_NAME) or loc == MANIFEST_NAME else loc


def manifest_location(location: str) -> str:
    return transport.join(dataset_root(location), MANIFEST_NAME)
