"""Check a built dataset against its manifest: every shard's bytes, sha256 and samples, every image decodes, and
every sample index gives the shard's samples."""
from __future__ import annotations

import itertools
import json
import os

import torch
import webdataset as wds
from torchvision.io import decode_jpeg  # the trainer's decoder (libjpeg-turbo), so "decodes" means the same thing

from shard_tools.errors import one_line
from shard_tools.fileio import file_sha256
from shard_tools.indexed_reader import iter_indexed_samples, read_index
from shard_tools.manifest import Manifest, ManifestError, ShardInfo


def verify_dataset(location: str) -> list[str]:
    """Problems found, one line each (empty = OK). Decodes with torchvision, as the trainer does."""
    try:
        manifest = Manifest.read(location)
    except ManifestError as e:
        return [str(e)]
    problems, keys = [], set()
    for split_name, split in manifest.splits.items():
        counts = [0] * manifest.num_classes
        for shard in split.shards:
            path = manifest.shard_url(shard)
            if not os.path.isfile(path):
                problems.append(f"{shard.name}: missing")
                continue
            if os.path.getsize(path) != shard.bytes:
                problems.append(f"{shard.name}: {os.path.getsize(path)} bytes, manifest says {shard.bytes}")
            if file_sha256(path) != shard.sha256:
                problems.append(f"{shard.name}: sha256 differs from the manifest (corrupted or replaced)")
            n = 0
            try:
                for sample in wds.WebDataset(path, shardshuffle=False, empty_check=False):
                    n += 1
                    problem = _check_sample(sample, manifest, keys)
                    if problem:
                        problems.append(f"{shard.name}: sample {sample.get('__key__')}: {problem}")
                    else:
                        counts[int(sample["cls"])] += 1
            except Exception as e:  # a broken tar stream: report it and go on with the next shard
                problems.append(f"{shard.name}: unreadable after {n} samples ({type(e).__name__}: {e})")
            if n != shard.num_samples:
                problems.append(f"{shard.name}: {n} samples, manifest says {shard.num_samples}")
            if shard.index and (problem := _check_index(path, shard)):
                problems.append(problem)
        if not problems and counts != split.class_counts:
            problems.append(f"split '{split_name}': class counts {counts}, manifest says {split.class_counts}")
    return problems


def _check_index(path: str, shard: ShardInfo) -> str | None:
    """The shard's index, read as the trainer reads it, must give exactly the samples webdataset reads."""
    try:
        index = read_index(path, shard)
        indexed = iter_indexed_samples(path, index, start=0, stop=len(index), shard_bytes=shard.bytes,
                                       on_error="fail", retries=0)
        plain = wds.WebDataset(path, shardshuffle=False, empty_check=False)
        for a, b in itertools.zip_longest(indexed, plain):
            if a is None or b is None or any(a[k] != b.get(k) for k in index.members + ["__key__"]):
                return f"{shard.index}: does not match the samples of {shard.name}; rebuild the dataset"
    except Exception as e:  # an unreadable index or tar: report it and go on
        return f"{shard.index}: {one_line(e)}"
    return None


def _check_sample(sample: dict, manifest: Manifest, keys: set) -> str | None:
    missing = [k for k in ("jpg", "cls", "json") if k not in sample]
    if missing:
        return f"no {', '.join(missing)}"
    key = sample["__key__"]
    if key in keys:
        return "key appears twice in the dataset"
    keys.add(key)
    try:
        cls = int(sample["cls"])
    except ValueError:
        return f"cls is not an integer: {sample['cls'][:20]!r}"
    if not 0 <= cls < manifest.num_classes:
        return f"class index {cls} outside 0..{manifest.num_classes - 1}"
    try:
        meta = json.loads(sample["json"])
    except ValueError:
        return "json does not parse"
    if meta.get("label") != manifest.classes[cls]:
        return f"label {meta.get('label')!r} does not match class {cls} ({manifest.classes[cls]!r})"
    try:
        image = decode_jpeg(torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8))
    except RuntimeError as e:
        return f"jpg does not decode: {one_line(e)}"
    if image.shape[0] != 3:
        return f"image has {image.shape[0]} channels, expected 3 (RGB)"
    if min(image.shape[1:]) > manifest.image_size:
        return f"shorter side {min(image.shape[1:])} > image_size {manifest.image_size}"
    return None
