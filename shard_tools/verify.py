"""Check a built dataset against its manifest: every shard's bytes, sha256 and samples, every image decodes, and
every sample index gives the shard's samples. Works wherever the trainer reads: a local folder, http(s)://, s3://
(through shard_tools.transport)."""
from __future__ import annotations

import hashlib
import itertools
import json

import torch
from torchvision.io import decode_jpeg  # the trainer's decoder (libjpeg-turbo), so "decodes" means the same thing
from webdataset.tariterators import group_by_keys, tar_file_expander

from shard_tools.errors import one_line
from shard_tools.fileio import HashingStream
from shard_tools.indexed_reader import iter_indexed_samples, read_index
from shard_tools.manifest import Manifest, ManifestError, ShardInfo
from shard_tools.redaction import redact
from shard_tools.transport import basename, open_stream


def verify_dataset(location: str) -> list[str]:
    """Problems found, one line each (empty = OK). Decodes with torchvision, as the trainer does."""
    try:
        manifest = Manifest.read(location)
    except ManifestError as e:
        return [str(e)]
    problems, keys = [], set()
    for split_name, split in manifest.splits.items():
        counts = [0] * manifest.num_classes
        for shard, url in zip(split.shards, manifest.shard_urls(split_name)):
            try:
                reader = HashingStream(open_stream(url), basename(url))
            except FileNotFoundError:
                problems.append(f"{shard.name}: missing")
                continue
            except OSError as e:  # refused, unreachable: one line, then the next shard
                problems.append(f"{shard.name}: cannot be opened ({redact(str(e))})")
                continue
            n, complete, seen = 0, True, []
            try:
                for sample in group_by_keys(tar_file_expander([dict(url=url, stream=reader)])):
                    n += 1
                    seen.append(fingerprint(sample))
                    problem = _check_sample(sample, manifest, keys)
                    if problem:
                        problems.append(f"{shard.name}: sample {sample.get('__key__')}: {problem}")
                    else:
                        counts[int(sample["cls"])] += 1
                reader.drain()  # the sha256 and size cover the tar's padding after its end marker too
            except Exception as e:  # a broken tar stream or a dropped connection: report it, go on
                detail = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
                problems.append(f"{shard.name}: unreadable after {n} samples ({type(e).__name__}: "
                                f"{redact(detail)})")
                complete = _drain(reader)
            finally:
                reader.close()
            if complete and reader.bytes != shard.bytes:
                problems.append(f"{shard.name}: {reader.bytes} bytes, manifest says {shard.bytes}")
            if complete and reader.hexdigest() != shard.sha256:
                problems.append(f"{shard.name}: sha256 differs from the manifest (corrupted or replaced)")
            if n != shard.num_samples:
                problems.append(f"{shard.name}: {n} samples, manifest says {shard.num_samples}")
            if shard.index and (problem := _check_index(url, shard, seen)):
                problems.append(problem)
        if not problems and counts != split.class_counts:
            problems.append(f"split '{split_name}': class counts {counts}, manifest says {split.class_counts}")
    return problems


def fingerprint(sample: dict) -> dict:
    """A sample's key and a digest of each of its files: enough to compare it with the same sample read by index."""
    return {k: v if k == "__key__" else hashlib.sha256(v).digest() for k, v in sample.items()
            if k == "__key__" or isinstance(v, bytes)}


def _check_index(url: str, shard: ShardInfo, seen: list[dict]) -> str | None:
    """The shard's index, read as the trainer reads it, must give exactly the samples the sequential pass read."""
    try:
        index = read_index(url, shard)
        indexed = iter_indexed_samples(url, index, start=0, stop=len(index), shard_bytes=shard.bytes,
                                       on_error="fail", retries=0)
        for a, b in itertools.zip_longest(indexed, seen):
            if a is None or b is None or any(fingerprint(a).get(k) != b.get(k) for k in index.members + ["__key__"]):
                return f"{shard.index}: does not match the samples of {shard.name}; rebuild the dataset"
    except Exception as e:  # an unreadable index or shard: report it and go on
        return f"{shard.index}: {redact(one_line(e))}"
    return None


def _drain(reader: HashingStream) -> bool:
    """Read a broken shard to its end, so that its size and sha256 can still be compared; False if the stream
    itself fails (the shard is then reported as unreadable only)."""
    try:
        reader.drain()
        return True
    except Exception:
        return False


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
