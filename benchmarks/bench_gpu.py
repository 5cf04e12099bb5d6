"""GPU throughput of the trainer, ResNet-50 at 224 px, all measured in one run on one GPU.

    python benchmarks/bench_gpu.py --out gpu_results.json

1. `--decode device`'s crops: the batched path (`device_decode.crop_batch`: one roi_align for the batch) against
   the per-image one (`crop_each`) and the workers' path (PIL decoding, uint8 resized_crop) on the same JPEGs,
   crops and flips; and how long one batch takes with the GPU otherwise idle (nvJPEG alone, + each crop path).
2. The loaders alone, no model: the trainer's DataLoader (`--decode workers`: read, decode, crop; `--decode device`:
   read, draw crops, pack the JPEG bytes) with 1 and more workers, timed over 10x the prefetch queue after the first
   batch. Gives the per-worker rate on this machine, and so the workers a GPU needs.
3. Model-only ceiling: the trainer's own step (build_model, build_optimizer's fused SGD, forward_backward with label
   smoothing, GradScaler for fp16) on one random batch already on the GPU, for each of --configs
   (`NAME@BATCH`): precisions, channels_last, torch.compile modes and batch sizes. Images/s over --steps timed steps
   in --rounds alternating rounds after --warmup untimed ones (cuDNN's autotuning, the compiler, CUDA graph
   recording), peak memory, and whether a whole trainer step (with the lr schedule, an EMA update and the loss
   tally) makes any host sync (`torch.cuda.set_sync_debug_mode("error")`).
4. End to end: `python -m distributed_train` with the fastest compiled setting of part 3 at --batch-size,
   streaming shards built here at `--size 256` from generated photo-like pictures (mushroom_demo.painter, copies of
   --unique images), with --runs: `--decode workers`, `--decode device`, and `--synthetic` (the same loop
   without the data pipeline). Every run's timed window is at least 10x its deepest batch queue, in one epoch.
   Images/s and data-wait share from RUN/metrics.jsonl, and peak memory.
Targets (issue #19): end to end >= 8,000 img/s on one H200 (NVIDIA's MLPerf Training v4.0 H200 submission: about
7,950 img/s per GPU, MXNet + DALI, batch 400); `--decode device` >= 0.95x `--synthetic` with <= 2 workers.
Prints a table at the end and writes every figure to --out (JSON) as it goes.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from bench_train import read_throughput
from machine import load_line, machine_line

from distributed_train.config import Config
from distributed_train.data import EpochCursor, normalize, run_train_loader
from distributed_train.device_decode import DeviceAugment, crop_batch, crop_each, hand_over, pack_jpegs
from distributed_train.ema import WeightEMA
from distributed_train.model import build_model
from distributed_train.train import LogWindow, build_optimizer, forward_backward, optimizer_step, warmup_cosine
from shard_tools.build import build_dataset
from mushroom_demo.painter import SPECIES, generate_demo_dataset
from shard_tools.manifest import Manifest
from shard_tools.shard_reader import iter_shard_samples

# name -> (precision, channels_last, torch.compile mode or None); --configs adds @BATCH to a name
MODEL_CONFIGS = {
    "bf16 + channels_last": ("bf16", True, None),
    "bf16": ("bf16", False, None),
    "fp16 + channels_last": ("fp16", True, None),
    "fp16": ("fp16", False, None),
    "fp32 + channels_last": ("fp32", True, None),
    "fp32": ("fp32", False, None),
    "bf16 + channels_last + compile": ("bf16", True, "default"),
    "bf16 + channels_last + compile reduce-overhead": ("bf16", True, "reduce-overhead"),
    "fp16 + channels_last + compile": ("fp16", True, "default"),
}
DEFAULT_CONFIGS = ("bf16 + channels_last,bf16 + channels_last + compile,bf16 + channels_last + compile reduce-overhead,"
                   "bf16 + channels_last + compile reduce-overhead@512")
TARGET_E2E, TARGET_DEVICE = 8000, 0.95
REFERENCE = "bf16 + channels_last"
PREFETCH_FACTOR = 4  # the trainer's DataLoader (data.py): batches queued per worker
DEVICE_READ_AHEAD = 2  # DevicePrefetcher's depth (--decode device)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_results.json"), help="JSON file for every figure")
    p.add_argument("--device", default="cuda", help="cuda (cpu only to try the script itself)")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=256, help="per step: the end-to-end runs and the loaders")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma-separated model-only configurations, NAME or NAME@BATCH (default batch: --batch-size)")
    p.add_argument("--warmup", type=int, default=8, help="untimed model-only steps (autotuning, compilation)")
    p.add_argument("--steps", type=int, default=30, help="timed model-only steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating model-only rounds")
    p.add_argument("--e2e-rounds", type=int, default=1, help="alternating rounds of the end-to-end runs")
    p.add_argument("--unique", type=int, default=600, help="generated pictures (copied --copies times)")
    p.add_argument("--copies", type=int, default=0,
                   help="copies of each picture; 0: enough that one epoch outlasts every timed window")
    p.add_argument("--size", type=int, default=256, help="shorter side of the stored images (shard_tools --size)")
    p.add_argument("--e2e-warmup", type=int, default=20,
                   help="untimed steps per trainer run (start-up, compilation; the DataLoader queues fill meanwhile)")
    p.add_argument("--e2e-steps", type=int, default=100,
                   help="timed steps per trainer run, at least; raised to 10x the deepest batch queue of --runs")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--loaders", default="workers:1,workers:12,device:1,device:2",
                   help="loader-only runs: workers:N (decode in N workers), device:N (N workers pack JPEGs)")
    p.add_argument("--runs", default="synthetic,workers:12,device:2",
                   help="end-to-end trainer runs in order: workers:N (--decode workers, N DataLoader workers), "
                        "device:N (--decode device), synthetic")
    p.add_argument("--run-timeout", type=float, default=240, help="seconds before a trainer run is abandoned")
    p.add_argument("--workdir", type=Path, help="parent of the scratch folder (default: system temp)")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ModelOnly:
    """One model-only configuration (NAME@BATCH), built and warmed up once (autotuning, compilation, CUDA graph
    recording), then timed in rounds."""

    def __init__(self, spec: str, args, num_classes: int):
        self.name, _, batch = spec.partition("@")
        self.batch_size = int(batch or args.batch_size)
        self.precision, self.channels_last, self.compile_mode = MODEL_CONFIGS[self.name]
        self.device = device = torch.device(args.device)
        cuda = device.type == "cuda"
        if cuda:  # the other contenders' memory stays allocated: count only what this one adds
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        torch.manual_seed(0)
        model = build_model(args.arch, num_classes, width=args.width, zero_init_residual=True)
        model.to(device, memory_format=memory_format).train()
        self.optimizer = build_optimizer(model, Config(data="-", run_dir="-", lr=0.1), device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
        self.raw_model = model
        # dynamic=False: each contender compiles for its own batch, as a trainer process (one batch size) does;
        # else the second batch size seen would make dynamo compile a dynamic-shape graph
        self.model = torch.compile(model, mode=self.compile_mode, dynamic=False) if self.compile_mode else model
        self.x = torch.randn(self.batch_size, 3, args.image_size, args.image_size, device=device)
        self.x = self.x.contiguous(memory_format=memory_format)
        self.y = torch.randint(0, num_classes, (self.batch_size,), device=device)
        self.rates = []
        start = time.perf_counter()
        self.step()
        sync(device)
        self.first_step_s = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            self.step()
        sync(device)
        self.peak_gib = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if cuda else None
        self.host_syncs = self.check_host_syncs(args.image_size)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.batch_size}"

    def step(self) -> None:
        forward_backward(self.model, self.x, self.y, autocast=self.autocast, scaler=self.scaler, accum_steps=1,
                         sync=True, label_smoothing=0.1)
        optimizer_step(self.optimizer, self.scaler, clip_grad_norm=0.0)

    def check_host_syncs(self, image_size: int) -> str:
        """Two whole trainer steps with CUDA's sync debug mode set to raise: the uint8 batch from pinned memory,
        normalised and made channels_last, the step, the lr schedule, an EMA update and the loss tally; what the
        trainer's loop does between two logging lines. -> "none", or the error of the first sync."""
        if self.device.type != "cuda":
            return "not checked (no GPU)"
        images = torch.randint(0, 256, (self.batch_size, 3, image_size, image_size), dtype=torch.uint8).pin_memory()
        labels = self.y.cpu().pin_memory()
        mean = torch.full((1, 3, 1, 1), 0.5, device=self.device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(10, 1000))
        ema, window = WeightEMA(self.raw_model, 0.999), LogWindow(self.device)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        sync(self.device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                x = normalize(images.to(self.device, non_blocking=True), mean, mean)
                x = x.contiguous(memory_format=memory_format)
                y = labels.to(self.device, non_blocking=True)
                window.add(forward_backward(self.model, x, y, autocast=self.autocast, scaler=self.scaler,
                                            accum_steps=1, sync=True, label_smoothing=0.1))
                optimizer_step(self.optimizer, self.scaler, clip_grad_norm=0.0)
                scheduler.step()
                ema.update(self.raw_model)
            return "none"
        except RuntimeError as e:
            return f"{e}"[:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
            sync(self.device)

    def timed_round(self, steps: int) -> None:
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)  # kernels run asynchronously: stop the clock when the GPU is done
        self.rates.append(steps * self.batch_size / (time.perf_counter() - start))

    def row(self, reference: "ModelOnly | None") -> dict:
        ratios = [a / b for a, b in zip(self.rates, reference.rates)] if reference else []
        return {"config": self.label, "precision": self.precision, "channels_last": self.channels_last,
                "compile_mode": self.compile_mode, "batch_size": self.batch_size,
                "images_per_s": statistics.median(self.rates), "rounds": self.rates,
                "vs_reference": statistics.median(ratios) if ratios else None,
                "peak_gib": self.peak_gib, "first_step_s": self.first_step_s,
                "host_syncs": self.host_syncs}


def model_only(args, num_classes: int) -> list[dict]:
    """Every configuration timed in --rounds alternating rounds (the order reversed every other round), so a slow
    moment of the GPU or host hits them all; each is also given as the median of its per-round ratios to
    bf16 + channels_last at --batch-size (the reference). Configurations that fail (out of memory, compiler) are
    reported, not fatal. The peak memory is what each one adds (weights, optimizer state, activations, graphs) over
    its warm-up steps."""
    contenders, rows = [], []
    for spec in args.configs.split(","):
        try:
            contenders.append(ModelOnly(spec, args, num_classes))
            c = contenders[-1]
            print(f"model-only {c.label}: first step {c.first_step_s:.1f} s, host syncs in a trainer step: "
                  f"{c.host_syncs}", flush=True)
        except Exception as e:
            rows.append({"config": spec, "error": f"{type(e).__name__}: {e}"[:500]})
            print(f"model-only {spec}: {rows[-1]['error']}", flush=True)
    for r in range(args.rounds):
        for contender in contenders[:: 1 if r % 2 == 0 else -1]:
            contender.timed_round(args.steps)
        print(f"model-only round {r + 1}: " + ", ".join(f"{c.label} {c.rates[-1]:.0f}" for c in contenders),
              flush=True)
    reference = next((c for c in contenders if c.label == f"{REFERENCE}@{args.batch_size}"), None)
    rows += [c.row(reference) for c in contenders]
    del contenders, reference
    torch._dynamo.reset()
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def make_shards(args, scratch: Path, samples_needed: int) -> Path:
    """Generated pictures, each copied enough times that one epoch outlasts every timed window (at an epoch's end
    the trainer saves a checkpoint, time in which the workers would fill their queue), sharded at --size."""
    start = time.perf_counter()
    per_class = max(1, args.unique // len(SPECIES))
    cpus = os.cpu_count() or 1
    originals = scratch / "originals"
    labels = pd.read_csv(generate_demo_dataset(originals, per_class, size=args.size, workers=cpus), dtype=str)
    if not args.copies:  # the training split is 98% of the rows
        args.copies = math.ceil(samples_needed / (0.98 * len(labels))) + 1
    images = scratch / "photos" / "images"
    images.mkdir(parents=True)
    rows = []
    for copy in range(args.copies):
        for image_id, label in zip(labels["id"], labels["label"]):
            new_id = f"{copy:03d}-{image_id}"
            os.link(originals / "images" / f"{image_id}.jpg", images / f"{new_id}.jpg")
            rows.append((new_id, label))
    pd.DataFrame(rows, columns=["id", "label"]).to_csv(images.parent / "labels.csv", index=False)
    shards = scratch / "shards"
    manifest = build_dataset(str(images), str(images.parent / "labels.csv"), str(shards), size=args.size,
                             val_fraction=0.02, workers=cpus, progress=False)
    print(f"data: {len(labels)} generated pictures x {args.copies} copies -> {manifest.split('train').num_samples} "
          f"train / {manifest.splits['val'].num_samples if 'val' in manifest.splits else 0} val samples at --size "
          f"{args.size} in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return shards


def workers_path(jpegs: list[bytes], batch, size: int) -> torch.Tensor:
    """What --decode workers makes of the same JPEGs with the same crops and flips: PIL's decoder, torchvision's
    uint8 resized_crop (antialiased) and flip. An independent reference for the device path."""
    out = []
    for jpeg, (top, left, height, width), flip in zip(jpegs, batch.boxes.tolist(), batch.flips.tolist()):
        with Image.open(io.BytesIO(jpeg)) as img:
            image = TF.pil_to_tensor(img.convert("RGB"))
        image = TF.resized_crop(image, top, left, height, width, [size, size], antialias=True)
        out.append(TF.horizontal_flip(image) if flip else image)
    return torch.stack(out).float()


def check_device_decode(args, shards: Path) -> dict:
    """--decode device's batched crops against the per-image path and the workers' path (PIL decoding,
    torchvision's uint8 crop) with the same crops and flips: pixels within the filters' and decoders' differences,
    the same output when run twice; and how long one batch takes with the GPU otherwise idle."""
    device = torch.device(args.device)
    url = Manifest.read(str(shards)).shard_urls("train")[0]
    jpegs = [s["jpg"] for s in iter_shard_samples(url, stop=args.batch_size)]
    torch.manual_seed(123)
    batch = pack_jpegs(jpegs, (0.25, 1.0))
    augment = DeviceAugment(args.image_size, device)
    first, second = (hand_over(*augment(batch)).cpu() for _ in range(2))
    tensors = list(torch.split(batch.data, batch.lengths.tolist()))
    decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    each = crop_each(decoded, batch.boxes, batch.flips, args.image_size).cpu()
    result = {"images": len(jpegs), "repeatable": bool(torch.equal(first, second))}
    for name, reference in (("workers_path", workers_path(jpegs, batch, args.image_size)), ("crop_each", each)):
        diff = (first - reference).abs().flatten()[::7]  # a sample: quantile() refuses very large tensors
        result[f"vs_{name}"] = {"mean_abs_diff": diff.mean().item(), "p99_abs_diff": diff.quantile(0.99).item()}

    def decode():
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)

    for name, work in (("decode_ms", decode),
                       ("decode_crop_each_ms", lambda: crop_each(decode(), batch.boxes, batch.flips, args.image_size)),
                       ("decode_crop_batch_ms", lambda: crop_batch(decode(), batch.boxes, batch.flips,
                                                                   args.image_size))):
        times = []
        for _ in range(8):
            start = time.perf_counter()
            work()
            sync(device)
            times.append(time.perf_counter() - start)
        result[name] = 1000 * statistics.median(times[2:])
    print(f"check --decode device on {len(jpegs)} samples: batched crops vs the workers' path: mean |diff| "
          f"{result['vs_workers_path']['mean_abs_diff']:.2f}, 99th percentile "
          f"{result['vs_workers_path']['p99_abs_diff']:.1f}; vs per-image crops: mean "
          f"{result['vs_crop_each']['mean_abs_diff']:.2f}, p99 {result['vs_crop_each']['p99_abs_diff']:.1f} "
          f"(0-255 scale); repeatable {result['repeatable']}; one batch with the GPU idle: nvJPEG "
          f"{result['decode_ms']:.1f} ms, + per-image crops {result['decode_crop_each_ms']:.1f} ms, + batched crops "
          f"{result['decode_crop_batch_ms']:.1f} ms", flush=True)
    return result


def queue_depth(run: str) -> int:
    """Batches that can wait ready before a timed window starts: the DataLoader's prefetch_factor x workers, plus
    --decode device's read-ahead; none for --synthetic."""
    kind, _, workers = run.partition(":")
    if kind == "synthetic":
        return 0
    return PREFETCH_FACTOR * int(workers or 1) + (DEVICE_READ_AHEAD if kind == "device" else 0)


def e2e_plan(args) -> tuple[int, int]:
    """(untimed steps, timed steps) of every trainer run: the timed window is at least 10x the deepest queue, so
    batches prepared during start-up and compilation carry at most a tenth of it; both multiples of --log-every."""
    def round_up(n: int) -> int:
        return -(-n // args.log_every) * args.log_every
    deepest = max(queue_depth(run) for run in args.runs.split(","))
    return round_up(args.e2e_warmup), round_up(max(args.e2e_steps, 10 * deepest))


def loader_rate(run: str, args, shards: Path) -> dict:
    """The trainer's DataLoader alone (no model, no GPU work): batches/s from the first batch to 10x the prefetch
    queue after it (at least 20), so batches queued while the workers started carry at most a tenth of the window."""
    kind, _, workers = run.partition(":")
    workers = int(workers)
    loader = run_train_loader(Manifest.read(str(shards)), EpochCursor(), workers=workers,
                              pin_memory=args.device.startswith("cuda"), rank=0, world_size=1,
                              batch_size=args.batch_size, accum_steps=1, image_size=args.image_size, seed=0,
                              decode_on_device=kind == "device")
    timed = max(20, 10 * PREFETCH_FACTOR * workers)
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    for _ in range(timed):
        next(batches)
    seconds = time.perf_counter() - start
    batches._shutdown_workers()
    rate = timed * args.batch_size / seconds
    print(f"loader only, {run}: {rate:,.0f} img/s over {timed} batches, {rate / workers:,.0f} per worker",
          flush=True)
    return {"run": run, "workers": workers, "batches": timed, "images_per_s": rate, "per_worker": rate / workers}


def trainer_run(run: str, best: dict, args, shards: Path, scratch: Path, round_index: int) -> dict:
    kind, _, workers = run.partition(":")
    workers = int(workers or 1)
    warm, timed = e2e_plan(args)
    run_dir = scratch / f"run-{kind}-{workers}-{round_index}"
    compile_flags = ["--compile", "--compile-mode", best["compile_mode"]] if best["compile_mode"] else ["--no-compile"]
    command = [sys.executable, "-m", "distributed_train", "--data", str(shards), "--run-dir", str(run_dir),
               "--arch", args.arch, "--width", str(args.width), "--image-size", str(args.image_size),
               "--batch-size", str(best["batch_size"]), "--precision", best["precision"],
               "--channels-last", "on" if best["channels_last"] else "off", *compile_flags,
               "--workers", str(workers), "--decode", "device" if kind == "device" else "workers",
               "--max-steps", str(warm + timed), "--log-every", str(args.log_every), "--wandb", "disabled",
               "--checkpoint-every", "1000000", *(["--synthetic"] if kind == "synthetic" else [])]
    log = run_dir.with_suffix(".log")
    start = time.perf_counter()
    try:
        with open(log, "w") as out:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=args.run_timeout).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    tail = "".join(log.read_text().splitlines(keepends=True)[-8:])
    print(f"\n--- round {round_index + 1}, trainer run {run}: exit {code} after {time.perf_counter() - start:.0f} "
          f"s:\n{tail}", flush=True)
    if code != 0:
        return {"run": run, "round": round_index, "error": f"exit {code}", "log_tail": tail}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    result = read_throughput(run_dir / "metrics.jsonl", after_step=warm)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"run": run, "round": round_index, "workers": workers, "queue_depth": queue_depth(run),
            "timed_steps": timed, "images_per_s": result.images_per_s, "data_wait": result.data_wait,
            "peak_gib": train[-1].get("gpu_mem_gb"), "windows": [round(r["images_per_s"], 1) for r in train]}


def end_to_end(runs: list[dict], args) -> list[dict]:
    """Per run kind: median images/s over the rounds, and the median of its per-round ratios to --synthetic."""
    summary = []
    for name in args.runs.split(","):
        mine = [r for r in runs if r["run"] == name and "error" not in r]
        if not mine:
            summary.append({"run": name, "error": "no round finished"})
            continue
        synthetic = {r["round"]: r for r in runs if r["run"] == "synthetic" and "error" not in r}
        ratios = [r["images_per_s"] / synthetic[r["round"]]["images_per_s"] for r in mine if r["round"] in synthetic]
        summary.append({"run": name, "images_per_s": statistics.median(r["images_per_s"] for r in mine),
                        "data_wait": statistics.median(r["data_wait"] for r in mine),
                        "vs_synthetic": statistics.median(ratios) if ratios else None,
                        "rounds": len(mine), "peak_gib": max(r["peak_gib"] or 0 for r in mine)})
    return summary


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    results = {"machine": machine_line(), "torch": torch.__version__, "batch_size": args.batch_size,
               "image_size": args.image_size, "arch": args.arch, "loaders": [], "model_only": [],
               "end_to_end_runs": []}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer sets it
        results["tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}

    def save():
        args.out.write_text(json.dumps(results, indent=2))

    print(f"bench_gpu | {machine_line()} | {load_line()}", flush=True)
    if device.type == "cuda":
        print(f"cuDNN {torch.backends.cudnn.version()}, {os.cpu_count()} CPUs", flush=True)
    warm, timed = e2e_plan(args)
    loader_batches = 1 + max((10 * queue_depth(r) for r in args.loaders.split(",") if r), default=0)
    scratch = Path(tempfile.mkdtemp(prefix="bench_gpu-", dir=args.workdir))
    try:
        shards = make_shards(args, scratch, samples_needed=max(warm + timed, loader_batches) * args.batch_size)
        try:
            results["device_decode_check"] = check_device_decode(args, shards)
        except Exception as e:
            results["device_decode_check"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"check --decode device failed: {results['device_decode_check']['error']}", flush=True)
        for run in filter(None, args.loaders.split(",")):
            results["loaders"].append(loader_rate(run, args, shards))
        save()
        num_classes = len(SPECIES)  # the model-only runs use the trainer runs' class count: same graph
        results["model_only"] = model_only(args, num_classes)
        save()
        measured = [r for r in results["model_only"] if "error" not in r]
        if not measured:
            print("bench_gpu: no model-only configuration ran; see the errors above", file=sys.stderr)
            return 1
        at_batch = [r for r in measured if r["batch_size"] == args.batch_size] or measured
        best = max(at_batch, key=lambda r: (r["compile_mode"] is not None, r["images_per_s"]))
        results["end_to_end_setting"] = best["config"]
        print(f"end to end with {best['config']}: {warm} untimed + {timed} timed steps per run (>= 10x the deepest "
              f"queue, {max(queue_depth(r) for r in args.runs.split(','))} batches), {args.e2e_rounds} round(s)",
              flush=True)
        runs = args.runs.split(",")
        for r in range(args.e2e_rounds):
            for run in runs[:: 1 if r % 2 == 0 else -1]:
                results["end_to_end_runs"].append(trainer_run(run, best, args, shards, scratch, r))
                save()
        results["end_to_end"] = end_to_end(results["end_to_end_runs"], args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(results, args, best)
    save()
    print(f"figures in {args.out}")
    return 0


def report(results: dict, args, best: dict) -> None:
    print(f"\nbench_gpu | {machine_line()} | {load_line()}")
    check = results.get("device_decode_check", {})
    if "error" not in check:
        print(f"--decode device, one batch of {check['images']} with the GPU idle: nvJPEG {check['decode_ms']:.1f} ms; "
              f"+ per-image crops {check['decode_crop_each_ms']:.1f} ms; + batched crops "
              f"{check['decode_crop_batch_ms']:.1f} ms")
    print(f"model only: {args.arch}, {args.image_size} px, {args.rounds} alternating rounds of {args.steps} timed "
          f"steps after {args.warmup}; peak = GPU memory the configuration adds")
    for r in results["model_only"]:
        if "error" in r:
            print(f"  {r['config']:52s} {r['error'][:100]}")
            continue
        versus = f"  {r['vs_reference']:.3f}x {REFERENCE}@{args.batch_size}" if r.get("vs_reference") else ""
        print(f"  {r['config']:52s} {r['images_per_s']:8.0f} img/s  peak {r['peak_gib'] or 0:5.1f} GiB  first step "
              f"{r['first_step_s']:5.1f} s  host syncs: {r['host_syncs'][:40]}{versus}")
    synthetic = next((r for r in results.get("end_to_end", []) if r["run"] == "synthetic" and "error" not in r), None)
    print("loaders alone (no model), per worker; workers needed to feed the end-to-end --synthetic rate:")
    for r in results["loaders"]:
        need = f"  -> {math.ceil(synthetic['images_per_s'] / r['per_worker'])} workers" if synthetic else ""
        print(f"  {r['run']:12s} {r['images_per_s']:8.0f} img/s  {r['per_worker']:7.0f} per worker{need}")
    print(f"end to end, {best['config']}, median over rounds; per round vs --synthetic:")
    for r in results.get("end_to_end", []):
        if "error" in r:
            print(f"  {r['run']:12s} {r['error']}")
            continue
        verdict = "meets" if r["images_per_s"] >= TARGET_E2E else "BELOW"
        versus = ""
        if r["vs_synthetic"] is not None and r["run"].startswith("device"):
            versus = (f"  {r['vs_synthetic']:.3f}x --synthetic ("
                      f"{'meets' if r['vs_synthetic'] >= TARGET_DEVICE else 'BELOW'} >= {TARGET_DEVICE})")
        elif r["vs_synthetic"] is not None:
            versus = f"  {r['vs_synthetic']:.3f}x --synthetic"
        print(f"  {r['run']:12s} {r['images_per_s']:8.0f} img/s ({verdict} >= {TARGET_E2E:,})  data wait "
              f"{r['data_wait']:6.1%}  peak {r['peak_gib'] or 0:5.1f} GiB{versus}")


if __name__ == "__main__":
    sys.exit(main())
