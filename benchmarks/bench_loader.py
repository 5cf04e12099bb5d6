"""Loader throughput per worker process, measured side by side in one run.

    python benchmarks/bench_loader.py [--data ../shared/data/mushvision4] [--rounds 5] [--photos 200]

(a) The trainer's pipeline vs. its floor: `distributed_train.data.train_loader(..., workers=1)` streaming shards built
    at --size 256 (tar reading, shuffle buffer, batching, the worker's transport of each batch to this process)
    against a bare loop in this process that decodes and augments the SAME images (JPEG bytes read from the shards
    into memory first) with the same `Preprocess(train=True)`, drawing the same crops, and stacks them into batches.
    Target: loader / bare loop >= 0.85. The loader's shuffle buffer is one batch here (--shuffle-buffer): the
    warm-up batch fills the buffer, and with the trainer's 1000 that fill would read two thirds of this small epoch
    from tar outside the timed window, hiding the tar-streaming cost the ratio is meant to include.

(b) Full-size photos: --photos synthetic 3-12 megapixel JPEGs "as phones take them" (real photos upscaled, with sensor
    grain so they compress like camera files, quality 92, 4:2:0; cached in --workdir), built into shards at --size
    256, then the whole path from those shards (train_loader, 1 worker, 224 px) against the seed notebook's way of
    reading the original files: a Dataset whose __getitem__ does `plt.imread(path)` and `labels.iloc[index, 0/1]`,
    then ToTensor + Normalize, in a DataLoader with one worker. The seed had no resize at all, so its full-size photos
    of different shapes cannot even be batched; it gets the trainer's RandomResizedCrop(224) + flip to do the same
    work. Target: shards / seed >= 10x. The shard build's time is printed apart: it is paid once, not every epoch.
    The shuffle buffer is one batch here too, so the shards' tar streaming is inside the timed window.

Every contender runs in one worker process with one torch thread (DataLoader workers use one), the two alternate in
ABBA order, a warm-up batch is skipped (worker start-up, shuffle-buffer fill), every timed window is at least 10x
the DataLoader's queue (prefetch factor x 1 worker batches, which fill during the warm-up batch), and the headline is
the median of the per-round ratios: on a shared machine, neighbours in time see the same load.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the seed's reader; after choosing a headless backend)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402

from distributed_train.augment import seeded_cpu_rng  # noqa: E402
from distributed_train.data import Preprocess, train_loader  # noqa: E402
from shard_tools.build import build_dataset  # noqa: E402
from shard_tools.manifest import Manifest  # noqa: E402
from shard_tools.shard_reader import iter_shard_samples  # noqa: E402
from machine import MUSHVISION4, load_line, machine_line  # noqa: E402

# plt.imread returns a read-only array and ToTensor warns about it, once per worker process: the seed's behaviour.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

DEFAULT_DATA = MUSHVISION4
SEED = 0
TARGET_LOADER = 0.85
TARGET_FULL_SIZE = 10.0


# ---- reporting ---------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    images: int  # timed images (after the warm-up batch)
    seconds: float  # wall clock over them

    @property
    def rate(self) -> float:
        return self.images / self.seconds


PREFETCH_FACTOR = {"trainer": 4, "seed": 2}  # data.py's DataLoader; the seed's used PyTorch's default


def check_window(what: str, batches: int, queue: int) -> None:
    """A timed window shorter than 10x the loader's queue could be served largely from batches prepared before it."""
    if batches < 10 * queue:
        raise SystemExit(f"bench_loader: {what}: {batches} timed batches, need >= {10 * queue} (10x a queue of "
                         f"{queue}); lower the batch size")


def report(title: str, names: tuple[str, str], timings: dict[str, list[Timing]], target: float) -> None:
    a, b = names
    print(title)
    for r, (ta, tb) in enumerate(zip(timings[a], timings[b]), start=1):
        print(f"  round {r}: {a} {ta.rate:7.1f} img/s | {b} {tb.rate:7.1f} img/s | ratio {ta.rate / tb.rate:6.2f}")
    for name in names:
        print(f"  {name:<38s} median {statistics.median(t.rate for t in timings[name]):7.1f} img/s")
    ratio = statistics.median(ta.rate / tb.rate for ta, tb in zip(timings[a], timings[b]))
    ok = f"meets target >= {target:g}" if ratio >= target else f"BELOW target >= {target:g}"
    print(f"  => {a} / {b} = {ratio:.2f}x (median of per-round ratios; {ok})")


def alternate(rounds: int, contenders: dict) -> dict[str, list[Timing]]:
    """Run the two contenders `rounds` times each in ABBA order, so neither always runs on a fresher machine."""
    timings = {name: [] for name in contenders}
    for r in range(rounds):
        for name in list(contenders)[:: 1 if r % 2 == 0 else -1]:
            timings[name].append(contenders[name](r))
    return timings


# ---- the trainer's loader ------------------------------------------------------------------------------------------
def time_train_loader(manifest: Manifest, shards: str, *, batch_size: int, image_size: int, epoch: int,
                      shuffle_buffer: int = 1000) -> tuple[Timing, list[list[str]]]:
    """One epoch of one worker: throughput after its first batch, and the keys of the timed batches."""
    loader, _ = train_loader(manifest, rank=0, world_size=1, batch_size=batch_size, accum_steps=1,
                             image_size=image_size, workers=1, seed=SEED, epoch=epoch, shuffle_buffer=shuffle_buffer)
    stream = iter(loader)
    next(stream)  # warm-up: worker start-up, shuffle-buffer fill, first batch
    keys, start = [], time.perf_counter()
    for _images, _labels, batch_keys in stream:
        keys.append(batch_keys)
    seconds = time.perf_counter() - start
    del stream, loader  # shut the worker down before the other contender runs
    return Timing(sum(map(len, keys)), seconds), keys


# ---- (a) per-worker loader vs. the bare loop ---------------------------------------------------------------------
def read_train_samples(manifest: Manifest, shards: str) -> dict[str, tuple[bytes, int]]:
    """key -> (JPEG bytes, class index) of every training sample, in memory."""
    return {s["__key__"]: (s["jpg"], int(s["cls"]))
            for url in manifest.shard_urls("train") for s in iter_shard_samples(url)}


def time_bare_loop(samples: dict[str, tuple[bytes, int]], batch_keys: list[list[str]], image_size: int) -> Timing:
    """Decode + augment + stack the given batches in this process: the floor the loader is held to."""
    preprocess = Preprocess(train=True, image_size=image_size)
    start = time.perf_counter()
    for index, keys in enumerate(batch_keys, start=1):  # batch 0 was the loader's warm-up
        with seeded_cpu_rng((SEED, 0, 0, 0, index)):  # the crops data.py draws: (seed, epoch, rank, worker, batch)
            torch.stack([preprocess(samples[k][0]) for k in keys])
        torch.tensor([samples[k][1] for k in keys], dtype=torch.long)
    return Timing(sum(map(len, batch_keys)), time.perf_counter() - start)


def bench_per_worker(args, scratch: Path) -> None:
    shards = args.shards or scratch / "shards-a"
    if not args.shards:
        build_dataset(args.data / "images", args.data / "labels.csv", shards, size=256, seed=SEED,
                      workers=os.cpu_count(), overwrite=True, progress=False)
    manifest = Manifest.read(str(shards))
    samples = read_train_samples(manifest, str(shards))
    # Every round streams epoch 0, so the loader yields the same batches each time and the bare loop can be given
    # exactly those images with exactly those crops.
    shuffle_buffer = args.shuffle_buffer or args.batch_size
    _, batch_keys = time_train_loader(manifest, str(shards), batch_size=args.batch_size,
                                      image_size=args.image_size, epoch=0, shuffle_buffer=shuffle_buffer)
    check_window("(a) loader", len(batch_keys), PREFETCH_FACTOR["trainer"])
    print(f"(a) per-worker loader: {len(samples)} training images of {args.data.name} in shards --size 256, "
          f"{args.image_size} px crops, batch {args.batch_size}, shuffle buffer {shuffle_buffer}, "
          f"{len(batch_keys)} timed batches (one epoch less the warm-up batch) x {args.rounds} rounds, 1 torch thread")

    def loader(_round: int) -> Timing:
        timing, keys = time_train_loader(manifest, str(shards), batch_size=args.batch_size,
                                         image_size=args.image_size, epoch=0, shuffle_buffer=shuffle_buffer)
        if keys != batch_keys:
            raise SystemExit("bench_loader: train_loader yielded different batches for the same epoch")
        return timing

    names = ("loader (train_loader, 1 worker)", "bare loop (same images, same crops)")
    timings = alternate(args.rounds, {names[0]: loader,
                                      names[1]: lambda _: time_bare_loop(samples, batch_keys, args.image_size)})
    report("(a) result", names, timings, TARGET_LOADER)


# ---- (b) full-size photos: shards vs. the seed's reader ----------------------------------------------------------
def make_phone_photo(job: tuple[Path, Path, int]) -> tuple[int, int]:
    """One 3-12 MP JPEG from a small photo: upscaled, plus per-pixel grain (a smooth upscale compresses several
    times better than a camera file and decodes faster). Its own random stream: the set is the same in any order."""
    source, target, index = job
    rng = np.random.default_rng((SEED, index))
    aspect = rng.choice([4 / 3, 3 / 4, 16 / 9, 9 / 16, 1.0])
    pixels = rng.uniform(3e6, 12e6)
    size = (round(math.sqrt(pixels * aspect)), round(math.sqrt(pixels / aspect)))
    with Image.open(source) as img:
        big = np.asarray(img.convert("RGB").resize(size, Image.BICUBIC), dtype=np.int16)
    grain = rng.normal(0, 5, big.shape[:2] + (1,)) + rng.normal(0, 3, big.shape)  # luma + chroma noise
    photo = Image.fromarray((big + grain.astype(np.int16)).clip(0, 255).astype(np.uint8))
    photo.save(target, quality=92, subsampling=2)  # 4:2:0, as phone cameras write
    return size


def phone_photos(data: Path, count: int, folder: Path) -> tuple[Path, Path]:
    """`count` phone-sized photos and a labels.csv (`id,label`, label = class index, as the seed's CSV had), made
    once and reused: labels.csv is written last, so its presence means the folder is complete."""
    images, labels = folder / "images", folder / "labels.csv"
    if labels.exists():
        print(f"(b) reusing {count} phone-sized photos in {folder}")
        return images, labels
    source = pd.read_csv(data / "labels.csv", dtype=str).sample(n=count, random_state=SEED)
    classes = sorted(source["label"].unique())
    ids = [f"phone-{i:05d}" for i in range(count)]
    pairs = enumerate(zip(source["id"], ids))
    jobs = [(data / "images" / f"{src}.jpg", images / f"{i}.jpg", n) for n, (src, i) in pairs]
    images.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        sizes = list(pool.map(make_phone_photo, jobs))
    megapixels = [w * h / 1e6 for w, h in sizes]
    pd.DataFrame({"id": ids, "label": [classes.index(c) for c in source["label"]]}).to_csv(labels, index=False)
    print(f"(b) generated {count} phone-sized photos ({min(megapixels):.1f}-{max(megapixels):.1f} MP) in {folder} "
          f"in {time.perf_counter() - start:.0f} s (cached for the next run)")
    return images, labels


class SeedStyleDataset(Dataset):
    """The seed notebook's MushroomDataset, reading the way it read: one plt.imread per file, pandas iloc per sample."""

    def __init__(self, path_imgs: Path, path_labels: Path, transform) -> None:
        self.img_dir = path_imgs
        self.labels = pd.read_csv(path_labels)
        self.transform = transform

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index):
        img = plt.imread(Path(f"{self.img_dir}/{self.labels.iloc[index, 0]}.jpg"))
        label = torch.tensor(self.labels.iloc[index, 1], dtype=torch.int16)
        return self.transform(img), label


def time_seed_style(images: Path, labels: Path, manifest: Manifest, batch_size: int, batches: int) -> Timing:
    """The seed's reader in a DataLoader with one worker: throughput over `batches` batches after a warm-up one."""
    transform = transforms.Compose([
        transforms.ToTensor(),
        # Not in the seed: the trainer's crop + flip, so both sides make the same 224 px samples. Normalize comes
        # after the crop, the kindest place for the seed (224x224 pixels to normalise, not the whole photo).
        transforms.RandomResizedCrop(224, scale=(0.25, 1.0), antialias=True),
        transforms.RandomHorizontalFlip(),
        transforms.Normalize(manifest.stats.mean, manifest.stats.std),
    ])
    loader = DataLoader(SeedStyleDataset(images, labels, transform), batch_size=batch_size, shuffle=True,
                        num_workers=1)
    stream = iter(loader)
    next(stream)
    start = time.perf_counter()
    count = sum(len(label) for _, (_, label) in zip(range(batches), stream))
    seconds = time.perf_counter() - start
    del stream, loader
    return Timing(count, seconds)


def bench_full_size(args, scratch: Path) -> None:
    images, labels = phone_photos(args.data, args.photos, args.workdir / f"phone-photos-{args.photos}")
    photo_bytes = sum(p.stat().st_size for p in images.iterdir())
    for p in images.iterdir():  # into the page cache: neither contender pays for the disk
        p.read_bytes()
    shards = scratch / "shards-b"
    start = time.perf_counter()
    manifest = build_dataset(images, labels, shards, size=256, val_fraction=0.0, seed=SEED,
                             workers=args.build_workers, overwrite=True, progress=False)
    build_s = time.perf_counter() - start
    train = manifest.split("train")
    print(f"(b) one-off shard build: {args.photos} photos ({photo_bytes / 1e6:.0f} MB of JPEG) -> shards --size 256 "
          f"({sum(s.bytes for s in train.shards) / 1e6:.1f} MB) in {build_s:.1f} s = {args.photos / build_s:.1f} "
          f"photos/s with {args.build_workers} build workers")
    batches = train.num_samples // args.full_batch_size - 1
    check_window("(b) shards", batches, PREFETCH_FACTOR["trainer"])
    check_window("(b) seed", args.seed_batches, PREFETCH_FACTOR["seed"])
    print(f"(b) full-size photos, 224 px crops, batch {args.full_batch_size}, 1 worker each, {args.rounds} rounds; "
          f"per round: shards {args.shard_epochs} epochs x {batches} timed batches, seed {args.seed_batches} timed "
          f"batches (each after a warm-up batch)")
    print("    note: the seed notebook has no resize at all, so its full-size photos of different shapes cannot even "
          "be batched; here it also does the trainer's RandomResizedCrop(224) + flip")

    def from_shards(r: int) -> Timing:
        runs = [time_train_loader(manifest, str(shards), batch_size=args.full_batch_size, image_size=224,
                                  epoch=r * args.shard_epochs + e, shuffle_buffer=args.full_batch_size)[0]
                for e in range(args.shard_epochs)]
        return Timing(sum(t.images for t in runs), sum(t.seconds for t in runs))

    names = ("shards (train_loader, 1 worker)", "seed (plt.imread + iloc, 1 worker)")
    timings = alternate(args.rounds, {
        names[0]: from_shards,
        names[1]: lambda _: time_seed_style(images, labels, manifest, args.full_batch_size, args.seed_batches),
    })
    report("(b) result", names, timings, TARGET_FULL_SIZE)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with images/<id>.jpg and labels.csv")
    p.add_argument("--shards", type=Path, help="(a) reuse shards of --data built at --size 256 instead of building")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench_loader",
                   help="caches the generated photos between runs; this run's shards go to a folder in it, removed "
                        "at the end")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per contender")
    p.add_argument("--image-size", type=int, default=112, choices=[112, 160], help="(a) crop size")
    p.add_argument("--batch-size", type=int, default=32,
                   help="(a) batch size; small enough that one epoch of mushvision4 times >= 10x the queue")
    p.add_argument("--shuffle-buffer", type=int, default=0,
                   help="(a) the loader's shuffle buffer; 0 = one batch, so the timed window streams ~all the tar")
    p.add_argument("--photos", type=int, default=200, help="(b) number of generated 3-12 MP photos")
    p.add_argument("--full-batch-size", type=int, default=4,
                   help="(b) batch size; small enough that each timed window is >= 10x the loader's queue")
    p.add_argument("--shard-epochs", type=int, default=2, help="(b) epochs per round from the shards")
    p.add_argument("--seed-batches", type=int, default=20,
                   help="(b) timed batches per round of the seed's reader (10x its DataLoader's queue of 2)")
    p.add_argument("--build-workers", type=int, default=os.cpu_count(), help="(b) worker processes of the build")
    p.add_argument("--only", choices=["a", "b"], help="run only one of the two comparisons")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if not (args.data / "labels.csv").exists():
        print(f"bench_loader: no labels.csv in {args.data}; pass --data FOLDER (images/<id>.jpg + labels.csv)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # per-worker figures: DataLoader workers run with one torch thread too
    print(f"bench_loader | {machine_line()} | {load_line()} at start")
    args.workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
    try:
        if args.only != "b":
            bench_per_worker(args, scratch)
        if args.only != "a":
            bench_full_size(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"bench_loader | {load_line()} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
