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
import json
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
    p.add_argument("--steps", type=int, default=30, help="timed model-only steps")
    p.add_argument("--unique", type=int, default=600, help="generated pictures (copied --copies times)")
    p.add_argument("--copies", type=int, default=24, help="copies of each picture: enough images for one epoch")
    p.add_argument("--size", type=int, default=256, help="shorter side of the stored images (shard_tools --size)")
    p.add_argument("--e2e-steps", type=int, default=50, help="optimizer steps per trainer run")
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


def model_only(name: str, args, num_classes: int) -> dict:
    precision, channels_last, compile_model = MODEL_CONFIGS[name]
    device = torch.device(args.device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(args.arch, num_classes, width=args.width, zero_init_residual=True)
    model.to(device, memory_format=memory_format).train()
    optimizer = build_optimizer(model, Config(data="-", run_dir="-", lr=0.1), device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    step_model = torch.compile(model) if compile_model else model
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, num_classes, (args.batch_size,), device=device)

    def step():
        forward_backward(step_model, x, y, autocast=autocast, scaler=scaler, accum_steps=1, sync=True,
                         label_smoothing=0.1)
        optimizer_step(optimizer, scaler, clip_grad_norm=0.0)

    start = time.perf_counter()
    step()
    sync(device)
    first_step = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)  # kernels run asynchronously: stop the clock when the GPU is done
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, optimizer, step_model, x, y
    if compile_model:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"config": name, "precision": precision, "channels_last": channels_last, "compile": compile_model,
            "images_per_s": args.steps * args.batch_size / elapsed, "peak_gib": peak, "first_step_s": first_step}


def make_shards(args, scratch: Path) -> Path:
    """Generated pictures, each copied --copies times (one epoch must outlast the timed steps), sharded at --size."""
    start = time.perf_counter()
    per_class = max(1, args.unique // len(SPECIES))
    cpus = os.cpu_count() or 1
    originals = scratch / "originals"
    labels = pd.read_csv(generate_demo_dataset(originals, per_class, size=args.size, workers=cpus), dtype=str)
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


def check_device_decode(args, shards: Path) -> dict:
    """--decode device against the same code decoding on the CPU (libjpeg-turbo): same crops from the same seed,
    pixels within the decoders' rounding differences, the same output when run twice; and how long one batch takes
    with the GPU otherwise idle (nvJPEG alone, and decode + crops)."""
    device = torch.device(args.device)
    url = Manifest.read(str(shards)).shard_urls("train")[0]
    jpegs = [s["jpg"] for s in iter_shard_samples(url, stop=args.batch_size)]
    torch.manual_seed(123)
    batch = pack_jpegs(jpegs, (0.25, 1.0))
    reference, _ = DeviceAugment(args.image_size, torch.device("cpu"))(batch)
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
    print(f"check --decode device vs CPU decoding of {len(jpegs)} samples: mean |diff| {result['mean_abs_diff']:.2f}"
          f", 99th percentile {result['p99_abs_diff']:.1f} (0-255 scale), repeatable {result['repeatable']}; one "
          f"batch with the GPU idle: nvJPEG {result['decode_ms']:.1f} ms, + crops {result['decode_augment_ms']:.1f} ms",
          flush=True)
    return result


def trainer_run(run: str, best: dict, args, shards: Path, scratch: Path) -> dict:
    kind, _, workers = run.partition(":")
    workers = int(workers or 1)
    run_dir = scratch / f"run-{kind}-{workers}"
    command = [sys.executable, "-m", "distributed_train", "--data", str(shards), "--run-dir", str(run_dir),
               "--arch", args.arch, "--width", str(args.width), "--image-size", str(args.image_size),
               "--batch-size", str(args.batch_size), "--precision", best["precision"],
               "--channels-last", "on" if best["channels_last"] else "off",
               "--compile" if best["compile"] else "--no-compile", "--workers", str(workers),
               "--decode", "device" if kind == "device" else "workers", "--max-steps", str(args.e2e_steps),
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
    print(f"\n--- trainer run {run}: exit {code} after {time.perf_counter() - start:.0f} s:\n{tail}", flush=True)
    if code != 0:
        return {"run": run, "error": f"exit {code}", "log_tail": tail}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    result = read_throughput(run_dir / "metrics.jsonl")
    return {"run": run, "workers": workers, "images_per_s": result.images_per_s, "data_wait": result.data_wait,
            "peak_gib": train[-1].get("gpu_mem_gb"), "windows": [round(r["images_per_s"], 1) for r in train]}


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    results = {"machine": machine_line(), "torch": torch.__version__, "batch_size": args.batch_size,
               "image_size": args.image_size, "arch": args.arch, "model_only": [], "end_to_end": []}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer sets it
        results["tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}

    def save():
        args.out.write_text(json.dumps(results, indent=2))

    print(f"bench_gpu | {machine_line()} | {load_line()}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench_gpu-", dir=args.workdir))
    try:
        shards = make_shards(args, scratch)
        try:
            results["device_decode_check"] = check_device_decode(args, shards)
        except Exception as e:
            results["device_decode_check"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"check --decode device failed: {results['device_decode_check']['error']}", flush=True)
        num_classes = len(SPECIES)  # the model-only runs use the trainer runs' class count: same graph, one compile
        for name in args.configs.split(","):
            try:
                row = model_only(name, args, num_classes)
            except Exception as e:  # an out-of-memory or compiler failure must not lose the other figures
                row = {"config": name, "error": f"{type(e).__name__}: {e}"[:500]}
            results["model_only"].append(row)
            save()
            print(f"model-only {name:32s} " + (f"{row['images_per_s']:8.0f} img/s  peak {row['peak_gib'] or 0:5.1f} "
                  f"GiB  first step {row['first_step_s']:.1f} s" if "error" not in row else row["error"]), flush=True)

        measured = [r for r in results["model_only"] if "error" not in r]
        if not measured:
            print("bench_gpu: no model-only configuration ran; see the errors above", file=sys.stderr)
            return 1
        best = max(measured, key=lambda r: r["images_per_s"])
        results["fastest"] = best["config"]
        for kind in args.runs.split(","):
            results["end_to_end"].append(trainer_run(kind, best, args, shards, scratch))
            save()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"\nbench_gpu | {machine_line()} | {load_line()}")
    print(f"model only: {args.arch}, {args.image_size} px, batch {args.batch_size}, {num_classes} classes, "
          f"{args.steps} timed steps after {args.warmup}")
    for r in results["model_only"]:
        print(f"  {r['config']:32s} " + (f"{r['images_per_s']:8.0f} img/s  peak {r['peak_gib'] or 0:5.1f} GiB"
                                        if "error" not in r else r["error"][:100]))
    bf16_cl = next((r for r in measured if r["config"] == "bf16 + channels_last"), None)
    if bf16_cl:
        verdict = "meets" if bf16_cl["images_per_s"] >= TARGET_MODEL else "BELOW"
        print(f"  bf16 + channels_last: {bf16_cl['images_per_s']:.0f} img/s ({verdict} the H100 target "
              f">= {TARGET_MODEL}; NVIDIA's A100 anchor 2,470)")
    print(f"end to end with the fastest setting ({best['config']}), vs its model-only "
          f"{best['images_per_s']:.0f} img/s:")
    synthetic = next((r for r in results["end_to_end"] if r["run"].startswith("synthetic") and "error" not in r), None)
    for r in results["end_to_end"]:
        if "error" in r:
            print(f"  {r['run']:12s} {r['error']}")
            continue
        ratio = r["images_per_s"] / best["images_per_s"]
        r["vs_model_only"] = ratio
        versus = f"  {r['images_per_s'] / synthetic['images_per_s']:.3f}x trainer --synthetic" if synthetic else ""
        print(f"  {r['run']:12s} {r['images_per_s']:8.0f} img/s  data wait {r['data_wait']:6.1%}  peak "
              f"{r['peak_gib'] or 0:5.1f} GiB  {ratio:.3f}x model-only "
              f"({'meets' if ratio >= TARGET_E2E else 'BELOW'} >= {TARGET_E2E}){versus}")
    save()
    print(f"figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
