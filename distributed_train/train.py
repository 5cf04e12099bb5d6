"""The training loop: DDP, mixed precision, accumulation, warmup + cosine, EMA, checkpoints, preemption.

One function, read top to bottom: set up -> resume -> for each epoch: stream batches, step, log, checkpoint,
validate. Every rank runs the same number of steps (see data.py), so collectives always line up.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed_train import EXIT_DIVERGED, EXIT_PREEMPTED, checkpoint, dist
from distributed_train.config import Config
from distributed_train.data import PieceReader, eval_loader, normalize, stats_tensors, train_batches_per_rank, train_loader
from distributed_train.device_decode import DeviceAugment, DevicePrefetcher
from distributed_train.ema import WeightEMA
from distributed_train.evaluate import evaluate
from distributed_train.logger import Logger
from distributed_train.model import build_model, load_torchvision_state_dict
from shard_tools.manifest import Manifest
from shard_tools.remote import redact


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # CPUs without bf16 units emulate it, many times slower than fp32; with AVX512-BF16 or AMX it is ~2x faster.
    return "bf16" if cpu_has_bf16() else "fp32"


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_workers(device: torch.device, cores: int, local_ranks: int) -> int:
    """--workers -1. On a GPU, decoding must keep up with it: up to 8 workers per GPU, leaving one core for the
    training loop (how many a GPU needs is measured by benchmarks/bench_gpu.py; BENCHMARKS.md). On a CPU the cores are
    better spent on the model (see the thread rule in _train)."""
    if device.type != "cuda":
        return 4
    return max(1, min(8, cores // local_ranks - 1))


def available_cores() -> int:
    """Cores this process may run on (SLURM and containers restrict the affinity mask, not os.cpu_count())."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_optimizer(model: torch.nn.Module, cfg: Config, lr: float, device: torch.device) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm weights and biases (every 1-d parameter), as in the ResNet training recipes.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}  # one kernel for the whole update on GPUs
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **fused)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, **fused)


def warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def forward_backward(model, ddp_model, x, y, *, autocast, scaler, accum_steps: int, sync: bool,
                     label_smoothing: float = 0.0) -> torch.Tensor:
    """One micro-batch: loss / accum_steps backpropagated, so that summed over the micro-batches of a step (and
    averaged over ranks by DDP) the gradient is that of the mean loss over the global batch. DDP all-reduces only
    on the micro-batch that completes a step (`sync`). Returns the detached, unscaled loss."""
    no_sync = ddp_model.no_sync if ddp_model is not None and not sync else contextlib.nullcontext
    with no_sync():
        with autocast():
            loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        scaler.scale(loss / accum_steps).backward()
    return loss.detach()


def optimizer_step(optimizer, scaler, clip_grad_norm: float) -> None:
    """One update from the accumulated gradients, optionally clipped to a global norm first."""
    if clip_grad_norm > 0:
        scaler.unscale_(optimizer)  # clip the real gradients, not fp16's loss-scaled ones (a no-op otherwise)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)  # rescales on the device: no host sync
    scaler.step(optimizer)  # with fp16, skipped when a gradient overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def tally(loss: torch.Tensor) -> torch.Tensor:
    """[the loss if finite else 0, 1 if not finite]: summed on the device over a logging window (no host sync), so
    one NaN does not hide the window's loss and a run whose every loss is NaN can be told apart."""
    finite = torch.isfinite(loss)
    return torch.stack([torch.where(finite, loss, torch.zeros_like(loss)), (~finite).to(loss.dtype)])


def train(cfg: Config) -> int:
    ctx = dist.setup()
    try:
        return _train(cfg, ctx)
    finally:
        dist.teardown()


def _train(cfg: Config, ctx: dist.DistContext) -> int:
    device = ctx.device
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if cfg.workers == -1:
        cfg = dataclasses.replace(cfg, workers=auto_workers(device, available_cores(), local_ranks))
    manifest = Manifest.read(cfg.data)
    run_dir = cfg.run_dir
    public_config = {**cfg.to_dict(), "data": redact(cfg.data), "world_size": ctx.world_size}

    # ---- resume? ------------------------------------------------------------------------------------------------
    latest = checkpoint.latest_path(run_dir)
    state = checkpoint.load(latest) if latest else None
    if state is not None:
        check_compatible(state, cfg, manifest)
    stop_file = os.path.join(run_dir, "STOP")
    if ctx.is_main:
        os.makedirs(run_dir, exist_ok=True)
        if os.path.exists(stop_file):  # left by the preemption we are resuming from
            os.remove(stop_file)
        with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(public_config, f, indent=2)
    dist.barrier()
    stop = dist.StopFlag(stop_file, ctx.is_main)

    # ---- model, optimizer, schedule -----------------------------------------------------------------------------
    precision = resolve_precision(cfg.precision, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    # channels_last suits tensor cores and oneDNN's CPU convolutions alike (1.2-1.4x on the project's CPU)
    channels_last = cfg.channels_last in ("on", "auto")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input size for the whole run: let cuDNN time its kernels once
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Leave the cores the DataLoader workers decode on: oversubscribed CPUs run several times slower.
        torch.set_num_threads(max(1, available_cores() // local_ranks - cfg.workers))
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg.arch, manifest.num_classes, width=cfg.width, zero_init_residual=True)
    if cfg.init_from and state is None:
        load_init_weights(model, cfg.init_from)
    if cfg.sync_bn and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device, memory_format=memory_format)
    ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    global_batch = cfg.batch_size * ctx.world_size * cfg.accum_steps
    lr = cfg.lr or (0.1 if cfg.optimizer == "sgd" else 1e-3) * global_batch / 256
    micro_per_epoch = train_batches_per_rank(manifest.split("train").num_samples, ctx.world_size, cfg.batch_size,
                                             cfg.accum_steps)
    steps_per_epoch = micro_per_epoch // cfg.accum_steps
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps or max(1, round(0.03 * total_steps))
    optimizer = build_optimizer(model, cfg, lr, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    step, epoch, batches_done, best_top1, wandb_id = 0, 0, 0, -1.0, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved without fp16: switching to fp16 starts a fresh loss scale
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        checkpoint.restore_rng(state["rng"])
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
        best_top1, wandb_id = state["best_top1"], state["meta"].get("wandb_id")

    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if ctx.distributed else model
    step_model = torch.compile(ddp_model) if cfg.compile else ddp_model
    log = Logger(run_dir, ctx.is_main, cfg.wandb, cfg.wandb_project, wandb_id, public_config)
    unapplied = unapplied_on_resume(state, lr, cfg.weight_decay) if state is not None else []
    if unapplied:
        log.warn("resuming restores the optimizer and schedule from the checkpoint, so these settings are not used: "
                 + "; ".join(unapplied) + ". Start a new --run-dir to train with them.")
    if state is not None and state.get("total_steps", total_steps) != total_steps:
        log.warn(schedule_change(state, step, total_steps, scheduler))
    if cfg.decode == "device" and device.type != "cuda" and not cfg.synthetic:
        log.warn("--decode device without a GPU decodes every batch on the CPU in the training process, between "
                 "steps: slower than --decode workers, which is what to use here")
    mean, std = stats_tensors(manifest.stats.mean, manifest.stats.std, device)
    shards_skipped = multiprocessing.Value("i", 0)  # counted in the DataLoader workers, logged here
    read_piece = PieceReader(cfg.on_shard_error, shard_digests(manifest, cfg.data) if cfg.verify_shards else None,
                             shards_skipped)
    device_augment = DeviceAugment(cfg.image_size, device) \
        if cfg.decode == "device" and not cfg.synthetic else None
    meta = {"arch": cfg.arch, "width": cfg.width, "image_size": cfg.image_size, "classes": manifest.classes,
            "mean": manifest.stats.mean, "std": manifest.stats.std, "wandb_id": log.wandb_id}

    def save(best: bool = False) -> None:
        if ctx.is_main:
            checkpoint.save({
                "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else {},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": checkpoint.capture_rng(),
                "step": step, "epoch": epoch, "batches_done": batches_done, "best_top1": best_top1,
                "total_steps": total_steps,
                "config": public_config, "meta": meta,
            }, run_dir, step, cfg.keep_checkpoints, best=best)
        dist.barrier()  # nobody exits (and gets the job torn down) while rank 0 is still writing

    def validate() -> bool:
        """Evaluate (the EMA weights if kept), log, and say whether this is the best top-1 so far."""
        nonlocal best_top1
        loader = eval_loader(manifest, cfg.data, "val", rank=ctx.rank, world_size=ctx.world_size,
                             batch_size=cfg.batch_size, image_size=cfg.image_size, workers=cfg.workers,
                             pin_memory=device.type == "cuda", read_piece=read_piece)
        eval_model = ema.module if ema is not None else model
        result = evaluate(eval_model, loader, manifest.num_classes, device, mean, std, autocast, memory_format)
        is_best = result["top1"] > best_top1
        best_top1 = max(best_top1, result["top1"])
        log.log({"kind": "val", "epoch": epoch, **result}, step,
                console=f"val   step {step:>6}  epoch {epoch}  top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}"
                        f"  loss {result['loss']:.4f}  ({result['count']} samples)")
        log.log_confusion(result["confusion"], manifest.classes, step, os.path.join(run_dir, "confusion_matrix.png"))
        if ctx.is_main and log.wandb is not None:
            log.wandb.log({f"val/acc_{name}": acc for name, acc in zip(manifest.classes, result["per_class_accuracy"])
                           if acc is not None}, step=step)
        return is_best

    log.info(f"{'resuming at step ' + str(step) if state else 'starting'}: {cfg.arch} x{cfg.width} on "
             f"{ctx.world_size} x {device.type}, {precision}, global batch {global_batch}, "
             f"lr {scheduler.base_lrs[0]:.4g}, {cfg.workers} loader workers per rank ({cfg.decode} decode), "
             f"{steps_per_epoch} steps/epoch, {total_steps} steps")

    # ---- the loop -----------------------------------------------------------------------------------------------
    model.train()
    exit_code = 0
    while step < total_steps:
        if cfg.synthetic:  # the same loop without the data pipeline: the speed ceiling it is measured against
            loader = synthetic_batches(cfg, manifest.num_classes, micro_per_epoch - batches_done)
        else:
            loader, _ = train_loader(manifest, cfg.data, rank=ctx.rank, world_size=ctx.world_size,
                                     batch_size=cfg.batch_size, accum_steps=cfg.accum_steps,
                                     image_size=cfg.image_size, workers=cfg.workers, seed=cfg.seed, epoch=epoch,
                                     skip_batches=batches_done, min_crop_scale=cfg.min_crop_scale,
                                     shuffle_buffer=cfg.shuffle_buffer, pin_memory=device.type == "cuda",
                                     read_piece=read_piece, decode_on_device=device_augment is not None)
        batches = DevicePrefetcher(loader, device_augment) if device_augment is not None else loader
        window = torch.zeros(2, device=device)  # finite losses summed, non-finite ones counted (see tally)
        window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0
        fetch_start = time.perf_counter()
        for images, labels, keys in batches:
            data_wait += time.perf_counter() - fetch_start
            if cfg.record_samples:
                record_keys(run_dir, ctx.rank, epoch, keys)
            x = normalize(images.to(device, non_blocking=True), mean, std).contiguous(memory_format=memory_format)
            y = labels.to(device, non_blocking=True)
            batches_done += 1
            sync_now = batches_done % cfg.accum_steps == 0
            window += tally(forward_backward(step_model, ddp_model if ctx.distributed else None, x, y,
                                             autocast=autocast, scaler=scaler, accum_steps=cfg.accum_steps,
                                             sync=sync_now, label_smoothing=cfg.label_smoothing))
            if not sync_now:
                fetch_start = time.perf_counter()
                continue

            optimizer_step(optimizer, scaler, cfg.clip_grad_norm)
            scheduler.step()
            if ema is not None:
                ema.update(model)
            step += 1
            window_steps += 1

            if step % cfg.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                images_per_s = window_steps * global_batch / elapsed
                # Summed over the ranks: the logged loss is the global batch's, and every rank takes the same decision.
                loss_total, nonfinite = dist.all_reduce_sum(window.clone()).tolist()
                micro_batches = window_steps * cfg.accum_steps * ctx.world_size
                if nonfinite == micro_batches:
                    steps = f"step {step}" if window_steps == 1 else f"steps {step - window_steps + 1}-{step}"
                    log.error(f"training diverged: the loss was NaN or inf in every micro-batch ({micro_batches}) of "
                              f"{steps} on every rank; stopping without saving (exit code {EXIT_DIVERGED}). Start "
                              "again in a new --run-dir with a lower --lr, --clip-grad-norm 1.0 or another "
                              "--precision (a checkpoints/latest.pt holds the last state saved before).")
                    exit_code = EXIT_DIVERGED
                    break
                mean_loss = loss_total / (micro_batches - nonfinite)
                lr_now = scheduler.get_last_lr()[0]
                memory = {"gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30} \
                    if device.type == "cuda" else {}
                log.log({"kind": "train", "epoch": epoch, "loss": mean_loss, "nonfinite_losses": int(nonfinite),
                         "lr": lr_now, "images_per_s": images_per_s, "data_wait": data_wait / elapsed,
                         "shards_skipped": shards_skipped.value, **memory}, step,
                        console=f"train step {step:>6}/{total_steps}  epoch {epoch}  loss {mean_loss:.4f}  "
                                f"lr {lr_now:.4g}  {images_per_s:,.0f} img/s  data wait {data_wait / elapsed:.0%}"
                                + (f"  peak GPU memory {memory['gpu_mem_gb']:.1f} GiB" if memory else "")
                                + (f"  ({int(nonfinite)} NaN/inf losses left out)" if nonfinite else ""))
                window.zero_()
                window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0

            if stop.should_stop():
                log.info(f"stop requested: saving step {step} and exiting with code {EXIT_PREEMPTED} (requeue me)")
                save()
                exit_code = EXIT_PREEMPTED
                break
            if step % cfg.checkpoint_every == 0:
                save()
            if step >= total_steps:
                break
            fetch_start = time.perf_counter()
        if batches is not loader:
            batches.close()
        del loader, batches  # shut the epoch's workers down before the next epoch starts its own
        if exit_code:
            break
        epoch_finished = batches_done >= micro_per_epoch
        if epoch_finished:
            epoch, batches_done = epoch + 1, 0
        if step >= total_steps or (epoch_finished and epoch % cfg.eval_every == 0):
            has_val = "val" in manifest.splits and manifest.split("val").num_samples > 0
            save(best=validate() if has_val else False)

    if ctx.is_main and exit_code == 0:
        from distributed_train.plots import plot_training_curves

        plot_training_curves(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "training_curves.png"))
        best = f"best val top-1 {best_top1:.4f}" if best_top1 >= 0 else "no validation split"
        log.info(f"done: {step} steps, {best}; checkpoints in "
                 f"{checkpoint.checkpoint_dir(run_dir)}")
    log.close(exit_code)
    return exit_code


def synthetic_batches(cfg: Config, num_classes: int, count: int):
    images = torch.randint(0, 256, (cfg.batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (cfg.batch_size,))
    if torch.cuda.is_available():
        images, labels = images.pin_memory(), labels.pin_memory()
    return itertools.repeat((images, labels, [""] * cfg.batch_size), count)


def record_keys(run_dir: str, rank: int, epoch: int, keys: list[str]) -> None:
    folder = os.path.join(run_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"epoch-{epoch:04d}-rank-{rank:05d}.txt"), "a", encoding="utf-8") as f:
        f.write("".join(k + "\n" for k in keys))


def shard_digests(manifest: Manifest, location: str) -> dict[str, str]:
    return {url: shard.sha256 for split in manifest.splits for url, shard in
            zip(manifest.shard_urls(location, split), manifest.split(split).shards)}


def unapplied_on_resume(state: dict, lr: float, weight_decay: float) -> list[str]:
    """Settings given now that a resumed run does not use: the optimizer and schedule come back from the checkpoint
    (as in torchvision's reference scripts and Lightning), with their peak lr and weight decay."""
    notes = []
    saved_lr = state["scheduler"]["base_lrs"][0]
    saved_decay = state["optimizer"]["param_groups"][0]["weight_decay"]
    if not math.isclose(saved_lr, lr, rel_tol=1e-9):
        notes.append(f"peak lr {lr:.4g} (the checkpoint's: {saved_lr:.4g})")
    if not math.isclose(saved_decay, weight_decay, rel_tol=1e-9):
        notes.append(f"--weight-decay {weight_decay:g} (the checkpoint's: {saved_decay:g})")
    return notes


def schedule_change(state: dict, step: int, total_steps: int, scheduler) -> str:
    """The warning for a run resumed with another length: warmup and cosine are recomputed for the new length (as
    when a torchvision reference run is restarted with more epochs), so the lr steps to the new curve at once."""
    saved_lr = state["scheduler"]["_last_lr"][0]
    next_lr = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step + 1)
    return (f"the checkpoint's schedule ran to {state['total_steps']} steps, --epochs/--max-steps now give "
            f"{total_steps}: warmup and cosine are recomputed for {total_steps} steps, so the lr jumps from "
            f"{saved_lr:.4g} to {next_lr:.4g} after step {step + 1}")


def load_init_weights(model: torch.nn.Module, path: str) -> None:
    """--init-from: a torchvision-format state_dict, or this trainer's checkpoint (its EMA weights if it kept them)."""
    weights = checkpoint.load(path)  # a missing or foreign file is a one-line error naming it
    if not isinstance(weights, dict):
        raise SystemExit(f"--init-from {path}: holds a {type(weights).__name__}, not a state_dict of weights")
    if isinstance(weights.get("model"), dict):
        weights = checkpoint.inference_weights(weights)
    try:
        load_torchvision_state_dict(model, weights, strict=False)
    except ValueError as e:
        raise SystemExit(f"--init-from {path}: {e}") from None


def check_compatible(state: dict, cfg: Config, manifest: Manifest) -> None:
    """Resuming with another model or dataset would silently load the wrong weights, and another optimizer cannot
    take over the saved one's state: refuse with the reason."""
    saved = {**state["meta"], "optimizer": state.get("config", {}).get("optimizer", cfg.optimizer)}
    mismatches = [f"{k}: checkpoint {saved[k]!r} vs now {v!r}" for k, v in
                  (("arch", cfg.arch), ("width", cfg.width), ("classes", manifest.classes),
                   ("optimizer", cfg.optimizer)) if saved[k] != v]
    if mismatches:
        raise SystemExit(f"{cfg.run_dir} holds a run that cannot be resumed with these settings ("
                         + "; ".join(mismatches) + "): use another --run-dir")
