"""Generated inputs for the shard_tools tests: images with known pixels, CSVs in the seed's layout, shard readers."""
from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mushvision4"

# Colours far apart, none grey: each class gets its own, so per-class pixel values are known.
COLOURS = [(200, 30, 30), (30, 160, 60), (40, 60, 190), (220, 200, 40)]


def solid(path: Path, rgb, size=(48, 32), fmt="JPEG", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path, format=fmt, **save)
    return path


def textured(seed: int, size=(96, 64)) -> Image.Image:
    """A smooth random picture (upsampled noise): distinct seeds give perceptually distinct images."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return small.resize(size, Image.BICUBIC)


def write_csv(path: Path, rows, header=("id", "label")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def solid_dataset(root: Path, per_class=(6, 5, 4), size=(48, 32)) -> tuple[Path, Path]:
    """images/<id>.jpg in one solid colour per class, ids with leading zeros; returns (images dir, labels CSV)."""
    images, rows, i = root / "images", [], 0
    for cls, n in enumerate(per_class):
        for _ in range(n):
            image_id = f"{i:05d}"
            solid(images / f"{image_id}.jpg", COLOURS[cls], size=size, quality=95)
            rows.append((image_id, f"class_{cls}"))
            i += 1
    return images, write_csv(root / "labels.csv", rows)


def textured_dataset(root: Path, n: int, labels=("a", "b"), size=(96, 64)) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        textured(1000 + i, size).save(images / f"{i:04d}.jpg", quality=90)
        rows.append((f"{i:04d}", labels[i % len(labels)]))
    return images, write_csv(root / "labels.csv", rows)


def read_shard(path: Path) -> list[dict]:
    """Samples of a tar shard as {key: ..., jpg: bytes, cls: int, json: dict}, with the standard library only."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            data = tar.extractfile(member).read()
            s = samples.setdefault(key, {"key": key})
            s[ext] = int(data) if ext == "cls" else json.loads(data) if ext == "json" else data
    return list(samples.values())


def read_dataset(out: Path, manifest) -> dict[str, list[dict]]:
    return {split: [s for sh in info.shards for s in read_shard(out / sh.name)] for split, info in manifest.splits.items()}


def decode(jpg: bytes) -> np.ndarray:
    """HxWx3 uint8 via torchvision (libjpeg-turbo), the decoder the trainer uses."""
    import torch
    from torchvision.io import decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(jpg), dtype=torch.uint8)).permute(1, 2, 0).numpy()


def pil_size(jpg: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(jpg)) as im:
        return im.size
