"""Check a built dataset against its manifest: every shard's bytes, sha256 and samples, every image decodes.
Works wherever the trainer reads: a local folder, http(s)://, s3:// (through shard_tools.transport)."""
from __future__ import annotations

import json

import torch
from torchvision.io import decode_jpeg  # the trainer's decoder (libjpeg-turbo), so "decodes" means the same thing
from webdataset.tariterators import group_by_keys, tar_file_expander

from shard_tools.errors import one_line
from shard_tools.fileio import HashingStream
from shard_tools.manifest import Manifest, ManifestError
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
            n, complete = 0, True
            try:
                for sample in group_by_keys(tar_file_expander([dict(url=url, stream=reader)])):
                    n += 1
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
        if not problems and counts != split.class_counts:
            problems.append(f"split '{split_name}': class counts {counts}, manifest says {split.class_counts}")
    return problems


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
