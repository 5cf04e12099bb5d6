"""The trainer's data path against its peers, measured side by side in one run.

    pip install -e .[bench]          # litdata, mosaicml-streaming
    python benchmarks/bench_peers.py [--data ../shared/data/mushvision4] [--copies 8] [--rounds 5]

The photos: --copies copies of mushvision4's 160 px photos (1,694 x 8 = 13,552), linked into a temporary folder at
run time. Every format stores the JPEG files byte for byte (`build --size 256` passes them through) and every reader
does the same work on them: a JPEG decode (torchvision's, libjpeg-turbo) + RandomResizedCrop(--crop) + flip
(distributed_train's own `Preprocess`), batches of --batch-size, one DataLoader worker, one torch thread.

(a0) Decode + crop + flip per image in one process: torchvision's decode_jpeg + v2.RandomResizedCrop +
    v2.RandomHorizontalFlip vs the trainer's `Preprocess` (decode_rgb, the op under decode_jpeg without its wrapper,
    + RandomResizedCropFlip: same pixels, same draws), and each decode alone. Every reader in (a) uses `Preprocess`.
(a) Read, images/s per worker: ours (`distributed_train.data.train_loader`, reading by the shards' sample index,
    batches in reused shared-memory buffers as the trainer streams them; also shown with a fresh batch each time) vs
    LitData `StreamingDataset` + `StreamingDataLoader` (after `litdata.optimize`), MosaicML `StreamingDataset` (MDS,
    after `MDSWriter`) and a plain webdataset pipeline (WebDataset -> shuffle(1000) -> map -> batched). The
    contenders take turns, in an order rotated every round; each round times a steady-state window of --window
    batches after --warmup batches (worker start-up, shuffle-buffer fill), far longer than any prefetch queue
    (ours holds 4 batches, the others 2). Target: ours >= 1.1x the fastest peer, as the median of per-round ratios.
(a1) The loaders' own cost: (a) again with every reader's decode + augment replaced by a copy of one ready image,
    and what it implies: with (a0)'s decode + augment added to both, the ratio ours / fastest peer that (a) can show.
(b) Write, seconds with one process each: `shard_tools build` vs `litdata.optimize` vs `MDSWriter`. Not the same
    work: build also decodes every image once, for the exact per-channel statistics and the near-duplicate hash.
(c) The first step of an epoch vs the median step, 1 rank, 1 worker, the demo's model (ResNet-26 x0.25, 64 px) on
    one copy of the photos, validating after every epoch as the trainer does: the run's one loader
    (`distributed_train.batches.RunData`, workers that live across epochs and start the next epoch ahead) vs a new
    loader every epoch (the trainer before). Target: first step of epochs 1.. <= 1.5x the median step.

mosaicml-streaming imports `transformers` (for its text datasets and its own StreamingDataLoader, neither used here);
when transformers is not installed, empty stub modules stand in for it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import multiprocessing
import statistics
import sys
import tempfile
import time
import types
from functools import partial
from pathlib import Path

import torch

from distributed_train.augment import RandomResizedCropFlip
from distributed_train.batches import RunData
from distributed_train.config import Config
from distributed_train.data import Preprocess, decode_rgb, eval_loader, normalize, train_loader
from distributed_train.dist import DistContext
from distributed_train.model import build_model
from shard_tools.build import build_dataset
from shard_tools.manifest import Manifest
from machine import MUSHVISION4, load_line, machine_line

SEED = 0
TARGET_READ = 1.1
TARGET_FIRST_STEP = 1.5


# ---- the photos, in every format -----------------------------------------------------------------------------------
def photo_folder(data: Path, copies: int, out: Path) -> tuple[Path, Path, list[tuple[Path, int]]]:
    """`copies` links to every photo, a labels.csv for them, and (path, class index) pairs for the peers."""
    lines = (data / "labels.csv").read_text().splitlines()[1:]
    rows = [line.split(",", 1) for line in lines if line.strip()]
    classes = sorted({label for _, label in rows})
    images = out / "images"
    images.mkdir(parents=True)
    samples, csv_lines = [], ["id,label"]
    for copy in range(copies):
        for image_id, label in rows:
            link = images / f"c{copy}_{image_id}.jpg"
            link.symlink_to((data / "images" / f"{image_id}.jpg").resolve())
            samples.append((link, classes.index(label)))
            csv_lines.append(f"c{copy}_{image_id},{label}")
    (out / "labels.csv").write_text("\n".join(csv_lines) + "\n")
    return images, out / "labels.csv", samples


def lit_sample(item: tuple[str, int]) -> dict:
    path, cls = item
    return {"jpg": Path(path).read_bytes(), "cls": cls}


def write_all(images: Path, labels: Path, samples: list, scratch: Path) -> dict[str, float]:
    """(b): seconds per writer; every one stores the JPEG bytes as they are."""
    import litdata

    stub_transformers()
    from streaming import MDSWriter

    seconds = {}
    start = time.perf_counter()
    build_dataset(images, labels, scratch / "ours", size=256, val_fraction=0.0, seed=SEED, workers=1,
                  progress=False)
    seconds["shard_tools build"] = time.perf_counter() - start
    start = time.perf_counter()
    litdata.optimize(fn=lit_sample, inputs=[(str(p), c) for p, c in samples], output_dir=str(scratch / "litdata"),
                     chunk_bytes="64MB", num_workers=1, verbose=False)
    seconds["litdata.optimize"] = time.perf_counter() - start
    multiprocessing.set_start_method("fork", force=True)  # optimize switched to spawn: every reader forks, as before
    start = time.perf_counter()
    with MDSWriter(out=str(scratch / "mds"), columns={"jpg": "bytes", "cls": "int"}, size_limit="64mb") as writer:
        for path, cls in samples:
            writer.write({"jpg": path.read_bytes(), "cls": cls})
    seconds["MDSWriter"] = time.perf_counter() - start
    return seconds


# ---- (a) the readers -----------------------------------------------------------------------------------------------
class _TransformersStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Any `transformers.*` module, whose every attribute is an empty class: enough for mosaicml-streaming's imports
    of tokenizers and batch types it does not use here."""

    def find_spec(self, name, path, target=None):
        if name == "transformers" or name.startswith("transformers."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda attr: type(attr, (dict,), {})
        return module

    def exec_module(self, module):
        pass


def stub_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.meta_path.append(_TransformersStub())


def make_readers(scratch: Path, batch_size: int, crop: int, workers: int = 1) -> dict:
    """name -> function(round) returning a fresh iterable of (images, labels) batches with `workers` workers."""
    import litdata
    import webdataset as wds

    stub_transformers()
    from streaming import StreamingDataset as MDSDataset
    from streaming.base.util import clean_stale_shared_memory

    preprocess = Preprocess(True, crop)
    manifest = Manifest.read(str(scratch / "ours"))

    class LitPhotos(litdata.StreamingDataset):
        def __getitem__(self, index):
            sample = super().__getitem__(index)
            return preprocess(sample["jpg"]), sample["cls"]

    class MDSPhotos(MDSDataset):
        def __getitem__(self, index):
            sample = super().__getitem__(index)
            return preprocess(sample["jpg"]), sample["cls"]

    def ours(r, reuse_buffers=True):  # as the trainer streams (RunData): batches in reused shared-memory buffers
        return train_loader(manifest, rank=0, world_size=1, batch_size=batch_size, accum_steps=1, image_size=crop,
                            workers=workers, seed=SEED, epoch=r, reuse_buffers=reuse_buffers)[0]

    def ours_fresh(r):  # the stock collate's fresh shared-memory batch every time
        return ours(r, reuse_buffers=False)

    def lit(r):
        dataset = LitPhotos(str(scratch / "litdata"), shuffle=True, seed=SEED + r)
        return litdata.StreamingDataLoader(dataset, batch_size=batch_size, num_workers=workers, drop_last=True)

    def mds(r):
        clean_stale_shared_memory()
        dataset = MDSPhotos(local=str(scratch / "mds"), shuffle=True, shuffle_seed=SEED + r, batch_size=batch_size)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, drop_last=True)

    def webdataset(r):
        urls = manifest.shard_urls("train")
        pipeline = (wds.WebDataset(urls, shardshuffle=len(urls), seed=SEED + r).shuffle(1000)
                    .map(lambda s: (preprocess(s["jpg"]), int(s["cls"]))).batched(batch_size, partial=False))
        return wds.WebLoader(pipeline, batch_size=None, num_workers=workers)

    # ours next to the fastest peer in the rotation: their rounds are neighbours in time on a shared machine
    return {"ours": ours, "litdata": lit, "ours, fresh batches": ours_fresh, "webdataset": webdataset,
            "mosaicml (MDS)": mds}


def time_reader(make, r: int, warmup: int, window: int) -> float:
    """Images/s over `window` batches after `warmup` batches of one epoch."""
    loader = make(r)
    batches = iter(loader)
    for _ in range(warmup):
        next(batches)
    images, start = 0, time.perf_counter()
    for _ in range(window):
        images += len(next(batches)[1])
    rate = images / (time.perf_counter() - start)
    del batches, loader  # the worker goes before the next contender starts
    return rate


def bench_read(readers: dict, rounds: int, warmup: int, window: int, target: bool = True) -> dict[str, float]:
    names = list(readers)
    rates = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # each contender leads once every len(names) rounds
        for name in order:
            rates[name].append(time_reader(readers[name], r, warmup, window))
        print(f"  round {r + 1}: " + " | ".join(f"{n} {rates[n][-1]:7.1f}" for n in names) + "  img/s", flush=True)
    medians = {name: statistics.median(rates[name]) for name in names}
    for name in names:
        print(f"  {name:<16s} median {medians[name]:7.1f} img/s")
    for name in names[1:]:
        ratios = [a / b for a, b in zip(rates["ours"], rates[name])]
        print(f"  ours / {name:<16s} per round " + " ".join(f"{x:.2f}" for x in ratios)
              + f", median {statistics.median(ratios):.2f}x")
    fastest = max((n for n in names if not n.startswith("ours")), key=medians.get)
    ratio = statistics.median(a / b for a, b in zip(rates["ours"], rates[fastest]))
    verdict = ("; meets" if ratio >= TARGET_READ else "; BELOW") + f" target >= {TARGET_READ:g}x" if target else ""
    print(f"  => ours / {fastest} (fastest peer) = {ratio:.2f}x (median of per-round ratios{verdict})")
    return medians


@contextlib.contextmanager
def fixed_preprocess(crop: int):
    """Every reader's decode + augment replaced by a copy of one ready image: what remains is the loaders' own cost
    (reading, shuffling, batching, sending the batch to the training process)."""
    # channels-last in memory, as RandomResizedCropFlip leaves its crops
    image = torch.zeros(1, 3, crop, crop, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)[0]
    original = Preprocess.__call__
    Preprocess.__call__ = lambda self, jpeg: image.clone()
    try:
        yield
    finally:
        Preprocess.__call__ = original


def bench_loader_cost(scratch: Path, batch_size: int, crop: int, rounds: int, warmup: int, window: int,
                      preprocess_us: float) -> None:
    with fixed_preprocess(crop):
        medians = bench_read(make_readers(scratch, batch_size, crop), rounds, warmup, window, target=False)
    cost = {name: 1e6 / rate for name, rate in medians.items()}
    print("  the loaders' own cost per image: " + ", ".join(f"{n} {us:.0f} us" for n, us in cost.items()))
    fastest = min((n for n in cost if not n.startswith("ours")), key=cost.get)
    bound = (preprocess_us + cost[fastest]) / (preprocess_us + cost["ours"])
    print(f"  => with (a0)'s {preprocess_us:.0f} us of decode + augment per image added to both, ours / {fastest} "
          f"would be {bound:.2f}x")


def bench_preprocess(images: Path, crop: int, rounds: int) -> float:
    """Decode + crop + flip per image in this process, taking turns: torchvision's decode_jpeg + v2 transforms vs
    what every reader in (a) runs (`Preprocess`: data.decode_rgb + RandomResizedCropFlip; the same draws and pixels,
    tests/test_augment.py and tests/test_data.py), and each decode alone."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import v2

    jpegs = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in sorted(images.iterdir())[:1000]]
    torchvision_decode = partial(decode_jpeg, mode=ImageReadMode.RGB)
    contenders = {  # name: (decode, transform)
        "torchvision v2": (torchvision_decode, v2.Compose([
            v2.RandomResizedCrop(crop, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip()])),
        "ours (Preprocess)": (decode_rgb, RandomResizedCropFlip(crop, (0.25, 1.0))),
        "decode_jpeg only": (torchvision_decode, None),
        "decode_rgb only": (decode_rgb, None),
    }
    micros = {name: [] for name in contenders}
    for r in range(rounds):
        for name, (decode, transform) in contenders.items():
            torch.manual_seed(r)
            start = time.perf_counter()
            for data in jpegs:
                image = decode(data)
                if transform is not None:
                    transform(image)
            micros[name].append((time.perf_counter() - start) / len(jpegs) * 1e6)
    medians = {name: statistics.median(values) for name, values in micros.items()}
    for name, value in medians.items():
        print(f"  {name:<22s} {value:6.0f} us per image (median of {rounds} rounds over {len(jpegs)} photos)")
    bench_parts(crop, [decode_rgb(data).shape[-2:] for data in jpegs], rounds)
    ours, theirs = medians["ours (Preprocess)"], medians["torchvision v2"]
    crop_ours, crop_theirs = ours - medians["decode_rgb only"], theirs - medians["decode_jpeg only"]
    print(f"  => decode + crop + flip in {ours / theirs:.2f}x the time of torchvision's; the decode in "
          f"{medians['decode_rgb only'] / medians['decode_jpeg only']:.2f}x, crop + flip in "
          f"{crop_ours / crop_theirs:.2f}x")
    return ours


def bench_parts(crop: int, sizes: list, rounds: int) -> None:
    """Where RandomResizedCropFlip and the ring save time: the box drawn, and a batch of channels-last crops put
    together, us per image (medians of `rounds`)."""
    from torchvision.transforms import v2

    theirs = v2.RandomResizedCrop(crop, scale=(0.25, 1.0), antialias=True)
    ours = RandomResizedCropFlip(crop, (0.25, 1.0))
    images = [torch.empty(1, 3, h, w, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)[0]
              for h, w in sizes]
    crops = [torch.randint(0, 256, (1, 3, crop, crop), dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last)[0] for _ in range(64)]  # channels-last, as the crops come out
    nchw, nhwc = torch.empty(64, 3, crop, crop, dtype=torch.uint8), torch.empty(64, crop, crop, 3, dtype=torch.uint8)
    parts = {
        "box: v2 make_params": (lambda: [theirs.make_params([image]) for image in images], len(images)),
        "box: RandomResizedCropFlip.box": (lambda: [ours.box(*image.shape[-2:]) for image in images], len(images)),
        "batch of 64: stacked into NCHW": (lambda: torch.stack(crops, out=nchw), len(crops)),
        "batch of 64: copied into NHWC (ring)": (lambda: torch.stack([c.permute(1, 2, 0) for c in crops], out=nhwc),
                                                 len(crops)),
    }
    for name, (run, count) in parts.items():
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) / count * 1e6)
        print(f"    {name:<38s} {statistics.median(times):6.1f} us per image")


# ---- (c) the first step of an epoch ------------------------------------------------------------------------------
def step_times(data_dir: Path, epochs: int, persistent: bool) -> list[list[float]]:
    """Seconds per training step (waiting for the batch included), per epoch, validating after every epoch."""
    cfg = Config(data=str(data_dir), run_dir="unused", arch="resnet26", width=0.25, image_size=64, batch_size=64,
                 workers=1, epochs=epochs, seed=SEED)
    manifest = Manifest.read(str(data_dir))
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    data = RunData(cfg, ctx, manifest, torch.contiguous_format)
    cfg.max_steps = epochs * data.micro_per_epoch
    torch.manual_seed(SEED)
    model = build_model(cfg.arch, manifest.num_classes, width=cfg.width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    times = []
    for epoch in range(epochs):
        if persistent:
            batches = data.epoch(epoch, 0)
        else:
            batches = iter(train_loader(manifest, rank=0, world_size=1, batch_size=64, accum_steps=1, image_size=64,
                                        workers=1, seed=SEED, epoch=epoch)[0])
        times.append([])
        model.train()
        start = time.perf_counter()
        for images, labels, _ in batches:
            loss = torch.nn.functional.cross_entropy(model(normalize(images, data.mean, data.std)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times[-1].append(time.perf_counter() - start)
            start = time.perf_counter()
        model.eval()
        with torch.no_grad():
            for images, labels, _ in eval_loader(manifest, "val", rank=0, world_size=1, batch_size=64, image_size=64,
                                                 workers=1):
                model(normalize(images, data.mean, data.std))
    data.close()
    return times


def bench_first_step(data: Path, scratch: Path, rounds: int, epochs: int) -> None:
    one_copy = scratch / "one-copy"
    build_dataset(data / "images", data / "labels.csv", one_copy, size=256, val_fraction=0.1, seed=SEED, workers=1,
                  progress=False)
    results = {"one loader per run": [], "a loader per epoch": []}
    for r in range(rounds):
        for name in list(results)[:: 1 if r % 2 == 0 else -1]:
            times = step_times(one_copy, epochs, persistent=name == "one loader per run")
            median = statistics.median(t for epoch in times for t in epoch[1:])
            first = statistics.median(epoch[0] for epoch in times[1:])  # epoch 0 starts the workers in both
            results[name].append((first, median))
            print(f"  round {r + 1}: {name:<20s} first step {first * 1000:6.1f} ms, median step {median * 1000:6.1f}"
                  f" ms, ratio {first / median:5.2f}", flush=True)
    for name, rows in results.items():
        ratio = statistics.median(first / median for first, median in rows)
        verdict = ("meets" if ratio <= TARGET_FIRST_STEP else "BELOW") + f" target <= {TARGET_FIRST_STEP:g}x"
        print(f"  => {name}: first step of an epoch / median step = {ratio:.2f}x (median over rounds"
              f"{'; ' + verdict if name == 'one loader per run' else ''})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=MUSHVISION4)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--warmup", type=int, default=10, help="batches before the timed window")
    parser.add_argument("--window", type=int, default=150, help="timed batches per round")
    parser.add_argument("--cost-rounds", type=int, default=3, help="rounds of (a1)")
    parser.add_argument("--step-rounds", type=int, default=2)
    parser.add_argument("--step-epochs", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine_line())
    print(load_line(), "(the machine may be shared: rounds alternate and the headline is a median of ratios)")
    with tempfile.TemporaryDirectory(prefix="bench_peers-") as tmp:
        scratch = Path(tmp)
        images, labels, samples = photo_folder(args.data, args.copies, scratch / "photos")
        print(f"\n(b) write {len(samples)} photos of {args.data} x {args.copies}, one process each (seconds)")
        for name, seconds in write_all(images, labels, samples, scratch).items():
            print(f"  {name:<18s} {seconds:7.1f} s  ({len(samples) / seconds:7.1f} photos/s)")
        print("  (build also decodes every image once: exact channel statistics and the near-duplicate hash)")
        print(f"\n(a0) decode + RandomResizedCrop({args.crop}) + flip, one process")
        preprocess_us = bench_preprocess(images, args.crop, args.rounds)
        print(f"\n(a) read, 1 worker, batch {args.batch_size}, decode + RandomResizedCrop({args.crop}) + flip; "
              f"{args.window} batches timed after {args.warmup}")
        bench_read(make_readers(scratch, args.batch_size, args.crop), args.rounds, args.warmup, args.window)
        print(f"\n(a1) the same, with decode + augment replaced by a ready image, {args.cost_rounds} rounds")
        bench_loader_cost(scratch, args.batch_size, args.crop, args.cost_rounds, args.warmup, args.window,
                          preprocess_us)
        print(f"\n(c) step times, 1 rank, 1 worker, ResNet-26 x0.25 at 64 px, batch 64, {args.step_epochs} epochs "
              f"with validation after each, on {args.data}")
        bench_first_step(args.data, scratch, args.step_rounds, args.step_epochs)
    print("\n" + load_line())


if __name__ == "__main__":
    main()
