"""Shared fixtures: small generated shard datasets written with webdataset's own writer (no shard_tools.build),
so the trainer's tests do not depend on the sharding code and can choose deliberately uneven shard sizes."""
from __future__ import annotations

import io
import os
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shard_tools.manifest import ChannelStats, Manifest, ShardInfo, SplitInfo
from shard_tools.shard_index import ShardIndex, index_name

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "mushvision4"
CLASSES = ["red", "green", "blue"]


def class_image(label: int, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """A noisy image whose dominant colour and stripe direction give away its class: easy to fit."""
    img = rng.integers(0, 90, size=(size, size, 3)).astype(np.uint8)
    img[..., label] += 140
    if label == 1:
        img[::4] //= 2
    elif label == 2:
        img[:, ::4] //= 2
    return img


def tar_index(path: Path) -> bytes:
    """A shard's sample index from python's own tar parser (independent of shard_tools' writer)."""
    with tarfile.open(path) as tar:
        return ShardIndex.from_members([(m.name, m.offset_data, m.size) for m in tar.getmembers()]).to_bytes()


def write_dataset(out: Path, shard_sizes: dict[str, list[int]], seed: int = 0, size: int = 40,
                  index: bool = True) -> Manifest:
    """Shards `{split}-{i:06d}.tar` with the given sample counts, their sample indexes (unless not `index`: a
    dataset from before indexes), plus a valid manifest.json."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    splits, row = {}, 0
    total, total_sq, pixels = np.zeros(3), np.zeros(3), 0
    for split, sizes in shard_sizes.items():
        shards, counts = [], [0] * len(CLASSES)
        for i, n in enumerate(sizes):
            name = f"{split}-{i:06d}.tar"
            with wds.TarWriter(str(out / name)) as sink:
                for _ in range(n):
                    label = row % len(CLASSES)
                    pixels_arr = class_image(label, rng, size)
                    buf = io.BytesIO()
                    Image.fromarray(pixels_arr).save(buf, format="JPEG", quality=95)
                    sink.write({"__key__": f"{row:09d}", "jpg": buf.getvalue(), "cls": label,
                                "json": {"id": f"{row:05d}", "label": CLASSES[label], "row": row}})
                    counts[label] += 1
                    if split == "train":
                        x = pixels_arr.reshape(-1, 3) / 255.0
                        total += x.sum(0)
                        total_sq += (x ** 2).sum(0)
                        pixels += len(x)
                    row += 1
            import hashlib
            data = (out / name).read_bytes()
            shards.append(ShardInfo(name, n, len(data), hashlib.sha256(data).hexdigest()))
            if index:
                blob = tar_index(out / name)
                (out / index_name(name)).write_bytes(blob)
                shards[-1].index, shards[-1].index_sha256 = index_name(name), hashlib.sha256(blob).hexdigest()
        splits[split] = SplitInfo(sum(sizes), counts, shards)
    mean = total / pixels
    std = np.sqrt(total_sq / pixels - mean ** 2)
    manifest = Manifest(classes=CLASSES, splits=splits, stats=ChannelStats(mean.tolist(), std.tolist(), pixels),
                        image_size=size, duplicate_groups=0, source={"generator": "tests/conftest.py"})
    manifest.write(str(out))
    return manifest


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory) -> Path:
    """3 classes, train shards of very different sizes (one empty), val not divisible by ranks x workers."""
    out = tmp_path_factory.mktemp("uneven")
    write_dataset(out, {"train": [37, 5, 0, 61, 13, 28], "val": [11, 20]})
    return out


@pytest.fixture(scope="session")
def damaged_shards(uneven_shards, tmp_path_factory) -> Path:
    """uneven_shards with the JPEG bytes of one training and one validation sample zeroed in place (same sizes, so
    the tar still reads; only the manifest's sha256 and decoding notice)."""
    out = tmp_path_factory.mktemp("damaged") / "shards"
    shutil.copytree(uneven_shards, out)
    for name, index in (("train-000000.tar", 3), ("val-000001.tar", 0)):
        data = bytearray((out / name).read_bytes())
        with tarfile.open(out / name) as tar:
            member = [m for m in tar.getmembers() if m.name.endswith(".jpg")][index]
        data[member.offset_data + 2:member.offset_data + member.size] = bytes(member.size - 2)
        (out / name).write_bytes(data)
    return out


def python_env() -> dict:
    """Environment for subprocesses: the repo importable, W&B offline and quiet, few threads per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1", WANDB_DISABLE_GIT="true")
    return env


PYTHON = sys.executable
