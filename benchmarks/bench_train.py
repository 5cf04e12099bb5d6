"""End-to-end training images/s: the trainer streaming shards vs. the same model and loop on synthetic batches.

    python benchmarks/bench_train.py                       # CPU: resnet26 x0.25, 112 px, batch 64, 1 worker
    python benchmarks/bench_train.py --arch resnet50 --width 1 --image-size 224 --batch-size 256 --workers 8 \\
        --precision bf16 --images DIR --warmup-steps 40 --log-every 20   # a GPU

Both contenders are `python -m distributed_train` in a subprocess with the same flags; the second adds the trainer's
own `--synthetic` (one random uint8 batch in memory, normalised and copied to the device like a real one), so the
difference is the data pipeline alone. Throughput is read from RUN/metrics.jsonl (records with kind == "train")
over the timed steps only, after --warmup-steps untimed ones (worker start-up, shuffle-buffer fill). The timed window
is at least 10x the DataLoader's queue (prefetch factor 4 x --workers batches), so batches queued during start-up
carry at most a tenth of it; the photos are hard-linked --copies times so that one epoch outlasts the run (a new
epoch restarts the workers). The runs alternate (ABBA), and the headline is the median of the per-round ratios; the
ratio of the best runs is printed too. Target: shards / synthetic >= 0.9 (the data pipeline is never the
bottleneck). The data-wait share is the trainer's own: time spent waiting for the next batch over the timed windows.
Flags this script does not know are passed on to the trainer unchanged.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from machine import MUSHVISION4, load_line, machine_line

from shard_tools.build import build_dataset
from shard_tools.manifest import Manifest

DEFAULT_DATA = MUSHVISION4
TARGET = 0.9
PREFETCH_FACTOR = 4  # the trainer's DataLoader (data.py): batches queued per worker


@dataclass
class Throughput:
    images_per_s: float
    data_wait: float  # share of the timed windows spent waiting for a batch


def read_throughput(metrics: Path, after_step: int) -> Throughput:
    """Images/s over the logging windows after step `after_step` (a multiple of --log-every), each weighted by its
    duration."""
    records = [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("kind") == "train"]
    pairs = [(a, b) for a, b in zip(records, records[1:]) if a["step"] >= after_step]
    if not pairs:
        raise SystemExit(f"bench_train: {metrics} has no train record after step {after_step}: raise --max-steps")
    steps = [b["step"] - a["step"] for a, b in pairs]
    seconds = [n / b["images_per_s"] for n, (_, b) in zip(steps, pairs)]  # each window's time / global batch
    return Throughput(sum(steps) / sum(seconds),
                      sum(b["data_wait"] * t for (_, b), t in zip(pairs, seconds)) / sum(seconds))


def run_trainer(args, extra: list[str], shards: Path, run_dir: Path, synthetic: bool) -> Throughput:
    command = [sys.executable, "-m", "distributed_train", "--data", str(shards), "--run-dir", str(run_dir),
               "--arch", args.arch, "--width", str(args.width), "--image-size", str(args.image_size),
               "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--precision", args.precision,
               "--max-steps", str(args.warmup_steps + args.timed_steps), "--log-every", str(args.log_every),
               "--wandb", "disabled",
               *extra, *(["--synthetic"] if synthetic else [])]
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume of the previous round
    log = run_dir.with_suffix(".log")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    with open(log, "w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=run_dir.parent, env=env)
    if result.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"bench_train: the trainer exited with {result.returncode}:\n{' '.join(command)}\n{tail}")
    return read_throughput(run_dir / "metrics.jsonl", after_step=args.warmup_steps)


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, default=DEFAULT_DATA, help="folder with images/<id>.jpg and labels.csv")
    p.add_argument("--size", type=int, default=128, help="shorter side of the stored images when building shards")
    p.add_argument("--shards", type=Path, help="reuse a built dataset folder instead of building from --images")
    p.add_argument("--workdir", type=Path,
                   help="parent of this run's scratch folder (shards, runs; removed at the end); default: system temp")
    p.add_argument("--rounds", type=int, default=3, help="runs per contender (3: a median that one disturbed round "
                                                          "cannot move)")
    p.add_argument("--arch", default="resnet26")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--precision", default="auto")
    p.add_argument("--warmup-steps", type=int, default=10, help="untimed steps first (a multiple of --log-every)")
    p.add_argument("--timed-steps", type=int, default=0,
                   help="timed steps; 0: 10x the DataLoader's queue (prefetch factor 4 x --workers), at least 40")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--copies", type=int, default=0,
                   help="hard-linked copies of each photo; 0: enough that one epoch outlasts a run")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP_NUM_THREADS of the trainer (default 0: unset, so the trainer's own rule applies: on a "
                        "CPU, cores - workers)")
    return p.parse_known_args()


def copied_photos(args, folder: Path) -> tuple[Path, Path, int]:
    """The photos of --images hard-linked --copies times under new ids (no bytes copied), and their labels CSV."""
    rows = pd.read_csv(args.images / "labels.csv", dtype=str)
    copies = args.copies or math.ceil((args.warmup_steps + args.timed_steps) * args.batch_size / (0.9 * len(rows))) + 1
    (folder / "images").mkdir(parents=True)
    ids, labels = [], []
    for copy in range(copies):
        for image_id, label in zip(rows.iloc[:, 0], rows.iloc[:, 1]):
            os.link(args.images / "images" / f"{image_id}.jpg", folder / "images" / f"{copy}-{image_id}.jpg")
            ids.append(f"{copy}-{image_id}")
            labels.append(label)
    pd.DataFrame({"id": ids, "label": labels}).to_csv(folder / "labels.csv", index=False)
    return folder / "images", folder / "labels.csv", copies


def main() -> int:
    args, extra = parse_args()
    args.timed_steps = args.timed_steps or max(40, 10 * PREFETCH_FACTOR * args.workers)
    args.timed_steps = -(-args.timed_steps // args.log_every) * args.log_every  # whole logging windows
    print(f"bench_train | {machine_line()} | {load_line()} at start")
    scratch = Path(tempfile.mkdtemp(prefix="bench_train-", dir=args.workdir))
    try:
        shards = args.shards
        if shards is None:
            if not (args.images / "labels.csv").exists():
                print(f"bench_train: no labels.csv in {args.images}; pass --images FOLDER or --shards DIR",
                      file=sys.stderr)
                return 2
            shards = scratch / "shards"
            start = time.perf_counter()
            images, labels, copies = copied_photos(args, scratch / "photos")
            build_dataset(images, labels, shards, size=args.size, workers=os.cpu_count(), progress=False)
            print(f"built shards of {args.images.name} x {copies} copies at --size {args.size} in "
                  f"{time.perf_counter() - start:.1f} s")
        train_images = Manifest.read(str(shards)).split("train").num_samples
        steps_per_epoch = train_images // args.batch_size
        print(f"trainer: {args.arch} x{args.width}, {args.image_size} px, batch {args.batch_size}, {args.workers} "
              f"worker(s), {args.threads or 'default'} compute thread(s), precision {args.precision}, "
              f"{args.warmup_steps} untimed + {args.timed_steps} timed steps logged every {args.log_every} "
              f"(queue {PREFETCH_FACTOR * args.workers} batches), {train_images} training images = "
              f"{steps_per_epoch} steps/epoch" + (f", extra trainer flags: {' '.join(extra)}" if extra else ""))
        if args.warmup_steps + args.timed_steps > steps_per_epoch:
            print("    note: the run crosses an epoch boundary; windows that start an epoch include its workers' "
                  "start-up (a bigger --images set avoids that)")

        names = ("shards (real data pipeline)", "synthetic (--synthetic)")
        results = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[:: 1 if r % 2 == 0 else -1]:  # ABBA
                synthetic = name == names[1]
                results[name].append(run_trainer(args, extra, shards, scratch / f"run-{r}-{int(synthetic)}", synthetic))
            real, synth = results[names[0]][r], results[names[1]][r]
            print(f"  round {r + 1}: shards {real.images_per_s:8.1f} img/s (data wait {real.data_wait:.1%}) | "
                  f"synthetic {synth.images_per_s:8.1f} img/s | ratio {real.images_per_s / synth.images_per_s:.3f}",
                  flush=True)
        real, synth = results[names[0]], results[names[1]]
        wait = statistics.median(t.data_wait for t in real)
        print(f"  {names[0]:<28s} median {statistics.median(t.images_per_s for t in real):8.1f} img/s, data wait "
              f"{wait:.1%} of step time")
        print(f"  {names[1]:<28s} median {statistics.median(t.images_per_s for t in synth):8.1f} img/s")
        ratio = statistics.median(a.images_per_s / b.images_per_s for a, b in zip(real, synth))
        ok = f"meets target >= {TARGET}" if ratio >= TARGET else f"BELOW target >= {TARGET}"
        print(f"  => shards / synthetic = {ratio:.3f}x (median of per-round ratios; {ok})")
        # The fastest run of each is the least disturbed by other processes (timeit's reasoning).
        best = max(t.images_per_s for t in real) / max(t.images_per_s for t in synth)
        print(f"     best run / best run = {best:.3f}x; data wait {wait:.1%} bounds what the loader itself costs")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"bench_train | {load_line()} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
