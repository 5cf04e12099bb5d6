"""GPU throughput of the trainer, ResNet-50 at 224 px, batch 256 per GPU, all measured in one run on one GPU.

    python benchmarks/bench_gpu.py --out gpu_results.json

1. Model-only ceiling: the trainer's own step (build_model, build_optimizer's fused SGD, forward_backward with label
   smoothing, GradScaler for fp16) on one random batch already on the GPU, for fp32, fp16 and bf16, each with and
   without channels_last, and bf16 or fp16 + channels_last + torch.compile. Images/s over --steps timed steps after
   --warmup untimed ones (the first runs cuDNN's autotuning and the compiler), and each configuration's peak memory.
2. End to end: `python -m distributed_train` with the fastest setting of part 1, streaming shards built here at
   `--size 256` from generated photo-like pictures (mushroom_demo.painter, copies of --unique images), decoding
   in DataLoader workers (`--decode workers`) and with nvJPEG on the GPU (`--decode device`); and `--synthetic`, the
   same trainer loop without the data pipeline. Images/s come from RUN/metrics.jsonl after the first logging window
   (start-up and compilation), with the trainer's data-wait share and peak memory.
Targets (issue #8): model-only bf16 + channels_last >= 3,000 img/s on one H100; end to end >= 0.9x model-only.
Anchor: NVIDIA's ResNet-50 v1.5 PyTorch figure, 2,470 img/s on one A100-80GB with AMP and DALI.
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
from distributed_train.device_decode import DeviceAugment, hand_over, pack_jpegs
from distributed_train.model import build_model
from distributed_train.train import build_optimizer, forward_backward, optimizer_step
from shard_tools.build import build_dataset
from mushroom_demo.painter import SPECIES, generate_demo_dataset
from shard_tools.manifest import Manifest
from shard_tools.shard_reader import iter_shard_samples

# name -> (precision, channels_last, compile); the order they run in
MODEL_CONFIGS = {
    "bf16 + channels_last": ("bf16", True, False),
    "bf16": ("bf16", False, False),
    "fp16 + channels_last": ("fp16", True, False),
    "fp16": ("fp16", False, False),
    "fp32 + channels_last": ("fp32", True, False),
    "fp32": ("fp32", False, False),
    "bf16 + channels_last + compile": ("bf16", True, True),
    # eager fp16 beat eager bf16 by 1.3x on the H200 (BENCHMARKS.md): does that survive compilation?
    "fp16 + channels_last + compile": ("fp16", True, True),
}
TARGET_MODEL, TARGET_E2E = 3000, 0.9
REFERENCE = "bf16 + channels_last"
PREFETCH_FACTOR = 4  # the trainer's DataLoader (data.py): batches queued per worker
DEVICE_READ_AHEAD = 2  # DevicePrefetcher's depth (--decode device)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_results.json"), help="JSON file for every figure")
    p.add_argument("--device", default="cuda", help="cuda (cpu only to try the script itself)")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--configs", default=",".join(MODEL_CONFIGS), help="comma-separated model-only configurations")
    p.add_argument("--warmup", type=int, default=8, help="untimed model-only steps (autotuning, compilation)")
    p.add_argument("--steps", type=int, default=30, help="timed model-only steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds, model-only and end to end")
    p.add_argument("--unique", type=int, default=600, help="generated pictures (copied --copies times)")
    p.add_argument("--copies", type=int, default=0,
                   help="copies of each picture; 0: enough that one epoch outlasts every trainer run")
    p.add_argument("--size", type=int, default=256, help="shorter side of the stored images (shard_tools --size)")
    p.add_argument("--e2e-warmup", type=int, default=20,
                   help="untimed steps per trainer run (start-up, compilation; the DataLoader queues fill meanwhile)")
    p.add_argument("--e2e-steps", type=int, default=100,
                   help="timed steps per trainer run, at least; raised to 10x the deepest batch queue of --runs")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--runs", default="workers:12,device:4,synthetic",
                   help="end-to-end trainer runs in order: workers:N (--decode workers, N DataLoader workers), "
                        "device:N (--decode device), synthetic")
    p.add_argument("--run-timeout", type=float, default=300, help="seconds before a trainer run is abandoned")
    p.add_argument("--workdir", type=Path, help="parent of the scratch folder (default: system temp)")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ModelOnly:
    """One model-only configuration, built and warmed up once (autotuning, compilation), then timed in rounds."""

    def __init__(self, name: str, args, num_classes: int):
        self.name = name
        self.precision, self.channels_last, self.compile = MODEL_CONFIGS[name]
        self.device = device = torch.device(args.device)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        torch.manual_seed(0)
        model = build_model(args.arch, num_classes, width=args.width, zero_init_residual=True)
        model.to(device, memory_format=memory_format).train()
        self.optimizer = build_optimizer(model, Config(data="-", run_dir="-", lr=0.1), device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
        self.model = torch.compile(model) if self.compile else model
        self.x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        self.x = self.x.contiguous(memory_format=memory_format)
        self.y = torch.randint(0, num_classes, (args.batch_size,), device=device)
        self.rates, self.peak_gib = [], 0.0
        start = time.perf_counter()
        self.step()
        sync(device)
        self.first_step_s = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            self.step()
        sync(device)

    def step(self) -> None:
        forward_backward(self.model, self.x, self.y, autocast=self.autocast, scaler=self.scaler, accum_steps=1,
                         sync=True, label_smoothing=0.1)
        optimizer_step(self.optimizer, self.scaler, clip_grad_norm=0.0)

    def timed_round(self, steps: int, batch_size: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)  # kernels run asynchronously: stop the clock when the GPU is done
        self.rates.append(steps * batch_size / (time.perf_counter() - start))
        if self.device.type == "cuda":
            self.peak_gib = max(self.peak_gib, torch.cuda.max_memory_allocated(self.device) / 2**30)

    def row(self, reference: "ModelOnly | None") -> dict:
        ratios = [a / b for a, b in zip(self.rates, reference.rates)] if reference else []
        return {"config": self.name, "precision": self.precision, "channels_last": self.channels_last,
                "compile": self.compile, "images_per_s": statistics.median(self.rates), "rounds": self.rates,
                "vs_reference": statistics.median(ratios) if ratios else None,
                "peak_gib": self.peak_gib if self.device.type == "cuda" else None, "first_step_s": self.first_step_s}


def model_only(args, num_classes: int) -> list[dict]:
    """Every configuration timed in --rounds alternating rounds (the order reversed every other round), so a slow
    moment of the GPU or host hits them all; each is also given as the median of its per-round ratios to
    bf16 + channels_last (the reference). Configurations that fail (out of memory, compiler) are reported, not fatal."""
    contenders, rows = [], []
    for name in args.configs.split(","):
        try:
            contenders.append(ModelOnly(name, args, num_classes))
        except Exception as e:
            rows.append({"config": name, "error": f"{type(e).__name__}: {e}"[:500]})
            print(f"model-only {name}: {rows[-1]['error']}", flush=True)
    for r in range(args.rounds):
        for contender in contenders[:: 1 if r % 2 == 0 else -1]:
            contender.timed_round(args.steps, args.batch_size)
        print(f"model-only round {r + 1}: " + ", ".join(f"{c.name} {c.rates[-1]:.0f}" for c in contenders),
              flush=True)
    reference = next((c for c in contenders if c.name == REFERENCE), None)
    rows += [c.row(reference) for c in contenders]
    del contenders
    torch._dynamo.reset()
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def make_shards(args, scratch: Path, samples_needed: int) -> Path:
    """Generated pictures, each copied enough times that one epoch outlasts every trainer run (a new epoch restarts
    the DataLoader workers inside the timed window), sharded at --size."""
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
    """--decode device against the workers' path (PIL decoding, torchvision's uint8 crop) with the same crops and
    flips: pixels within the decoders' and resizers' rounding differences, the same output when run twice; and how
    long one batch takes with the GPU otherwise idle (nvJPEG alone, and decode + crops)."""
    device = torch.device(args.device)
    url = Manifest.read(str(shards)).shard_urls("train")[0]
    jpegs = [s["jpg"] for s in iter_shard_samples(url, stop=args.batch_size)]
    torch.manual_seed(123)
    batch = pack_jpegs(jpegs, (0.25, 1.0))
    reference = workers_path(jpegs, batch, args.image_size)
    augment = DeviceAugment(args.image_size, device)
    first, second = (hand_over(*augment(batch)).cpu() for _ in range(2))
    diff = (first - reference).abs().flatten()[::7]  # a sample: quantile() refuses very large tensors
    result = {"images": len(jpegs), "mean_abs_diff": diff.mean().item(), "p99_abs_diff": diff.quantile(0.99).item(),
              "repeatable": bool(torch.equal(first, second))}
    tensors = list(torch.split(batch.data, batch.lengths.tolist()))
    for name, work in (("decode_ms", lambda: decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)),
                       ("decode_augment_ms", lambda: hand_over(*augment(batch)))):
        times = []
        for _ in range(6):
            start = time.perf_counter()
            work()
            sync(device)
            times.append(time.perf_counter() - start)
        result[name] = 1000 * statistics.median(times[1:])
    print(f"check --decode device vs the workers' path on {len(jpegs)} samples: mean |diff| {result['mean_abs_diff']:.2f}"
          f", 99th percentile {result['p99_abs_diff']:.1f} (0-255 scale), repeatable {result['repeatable']}; one "
          f"batch with the GPU idle: nvJPEG {result['decode_ms']:.1f} ms, + crops {result['decode_augment_ms']:.1f} ms",
          flush=True)
    return result


def queue_depth(run: str) -> int:
    """Batches that can wait ready before a run's timed window starts: the DataLoader's prefetch_factor x workers,
    plus --decode device's read-ahead; none for --synthetic."""
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


def trainer_run(run: str, best: dict, args, shards: Path, scratch: Path, round_index: int) -> dict:
    kind, _, workers = run.partition(":")
    workers = int(workers or 1)
    warm, timed = e2e_plan(args)
    run_dir = scratch / f"run-{kind}-{workers}-{round_index}"
    command = [sys.executable, "-m", "distributed_train", "--data", str(shards), "--run-dir", str(run_dir),
               "--arch", args.arch, "--width", str(args.width), "--image-size", str(args.image_size),
               "--batch-size", str(args.batch_size), "--precision", best["precision"],
               "--channels-last", "on" if best["channels_last"] else "off",
               "--compile" if best["compile"] else "--no-compile", "--workers", str(workers),
               "--decode", "device" if kind == "device" else "workers", "--max-steps", str(warm + timed),
               "--log-every", str(args.log_every), "--wandb", "disabled", "--checkpoint-every", "1000000",
               *(["--synthetic"] if kind == "synthetic" else [])]
    log = run_dir.with_suffix(".log")
    start = time.perf_counter()
    try:
        with open(log, "w") as out:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=args.run_timeout).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    tail = "".join(log.read_text().splitlines(keepends=True)[-12:])
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
               "image_size": args.image_size, "arch": args.arch, "model_only": [], "end_to_end_runs": []}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer sets it
        results["tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}

    def save():
        args.out.write_text(json.dumps(results, indent=2))

    print(f"bench_gpu | {machine_line()} | {load_line()}", flush=True)
    warm, timed = e2e_plan(args)
    scratch = Path(tempfile.mkdtemp(prefix="bench_gpu-", dir=args.workdir))
    try:
        shards = make_shards(args, scratch, samples_needed=(warm + timed) * args.batch_size)
        try:
            results["device_decode_check"] = check_device_decode(args, shards)
        except Exception as e:
            results["device_decode_check"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"check --decode device failed: {results['device_decode_check']['error']}", flush=True)
        num_classes = len(SPECIES)  # the model-only runs use the trainer runs' class count: same graph, one compile
        results["model_only"] = model_only(args, num_classes)
        save()
        measured = [r for r in results["model_only"] if "error" not in r]
        if not measured:
            print("bench_gpu: no model-only configuration ran; see the errors above", file=sys.stderr)
            return 1
        best = max(measured, key=lambda r: r["images_per_s"])
        results["fastest"] = best["config"]
        print(f"end to end: {warm} untimed + {timed} timed steps per run (>= 10x the deepest queue, "
              f"{max(queue_depth(r) for r in args.runs.split(','))} batches), {args.rounds} alternating rounds",
              flush=True)
        runs = args.runs.split(",")
        for r in range(args.rounds):
            for run in runs[:: 1 if r % 2 == 0 else -1]:
                results["end_to_end_runs"].append(trainer_run(run, best, args, shards, scratch, r))
                save()
        results["end_to_end"] = end_to_end(results["end_to_end_runs"], args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"\nbench_gpu | {machine_line()} | {load_line()}")
    print(f"model only: {args.arch}, {args.image_size} px, batch {args.batch_size}, {num_classes} classes, "
          f"{args.rounds} alternating rounds of {args.steps} timed steps after {args.warmup}")
    for r in results["model_only"]:
        versus = f"  {r['vs_reference']:.3f}x {REFERENCE}" if r.get("vs_reference") else ""
        print(f"  {r['config']:32s} " + (f"{r['images_per_s']:8.0f} img/s  peak {r['peak_gib'] or 0:5.1f} GiB"
                                        f"{versus}" if "error" not in r else r["error"][:100]))
    reference = next((r for r in measured if r["config"] == REFERENCE), None)
    if reference:
        verdict = "meets" if reference["images_per_s"] >= TARGET_MODEL else "BELOW"
        print(f"  {REFERENCE}: {reference['images_per_s']:.0f} img/s ({verdict} the H100 target "
              f">= {TARGET_MODEL}; NVIDIA's A100 anchor 2,470)")
    print(f"end to end with the fastest setting ({best['config']}), median over rounds; vs its model-only "
          f"{best['images_per_s']:.0f} img/s (measured apart, in this process) and, per round, vs --synthetic:")
    for r in results["end_to_end"]:
        if "error" in r:
            print(f"  {r['run']:12s} {r['error']}")
            continue
        ratio = r["images_per_s"] / best["images_per_s"]
        r["vs_model_only"] = ratio
        versus = f"  {r['vs_synthetic']:.3f}x trainer --synthetic" if r["vs_synthetic"] is not None else ""
        print(f"  {r['run']:12s} {r['images_per_s']:8.0f} img/s  data wait {r['data_wait']:6.1%}  peak "
              f"{r['peak_gib'] or 0:5.1f} GiB  {ratio:.3f}x model-only "
              f"({'meets' if ratio >= TARGET_E2E else 'BELOW'} >= {TARGET_E2E}){versus}")
    save()
    print(f"figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
