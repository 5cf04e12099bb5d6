"""The training loop, read top to bottom like torchvision's reference `main()`:

    train(cfg): join the job -> resolve every auto setting -> build (or resume) a TrainState
                -> for each epoch: train_one_epoch -> validate -> checkpoint

Every rank runs the same number of steps (see data.py), so collectives always line up.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed_train import EXIT_DIVERGED, EXIT_PREEMPTED, checkpoint, dist, run_lock
from distributed_train.batches import RunData
from distributed_train.config import Config, available_cores, resolve
from distributed_train.ema import WeightEMA
from distributed_train.evaluate import evaluate
from distributed_train.logger import Logger
from distributed_train.model import build_model, load_torchvision_state_dict
from distributed_train.replan import EpochLayout, carried_over, keep_global_batch
from shard_tools.errors import CheckpointError, UsageError
from shard_tools.fileio import write_json_atomic
from shard_tools.manifest import Manifest
from shard_tools.redaction import redact


def train(cfg: Config) -> int:
    """Run (or resume) the training described by `cfg` on this process's rank; -> the exit code."""
    ctx = dist.setup()
    try:
        with run_lock.holding(cfg.run_dir, ctx.is_main):
            return run(cfg, ctx)
    except dist.UNTYPED as e:
        raise dist.job_error(e, ctx.rank) or e
    finally:
        dist.teardown()


def run(cfg: Config, ctx: dist.DistContext) -> int:
    manifest = Manifest.read(cfg.data)
    saved = checkpoint.load_latest(cfg.run_dir)
    cfg, layout, warnings = job_settings(cfg, ctx, manifest, saved)
    public_config = {**cfg.to_dict(), "data": redact(cfg.data), "world_size": ctx.world_size}
    prepare_run_dir(cfg.run_dir, public_config, ctx.is_main)
    stop = dist.StopFlag(os.path.join(cfg.run_dir, "STOP"), ctx.is_main)
    configure_torch(cfg, ctx.device)

    state = TrainState.create(cfg, ctx, manifest.num_classes, saved)
    if saved is not None:
        state.epoch_started = carried_over(saved, layout)
        if state.epoch_started is not None and saved.get("epoch_started") is None:
            state.batches_done = 0  # the rest of the epoch is counted in the new layout's micro-batches
    log = Logger(cfg.run_dir, ctx.is_main, cfg.wandb, cfg.wandb_project, state.wandb_id, public_config)
    state.wandb_id = log.wandb_id
    log.use_dataset(public_config["data"], manifest.to_dict())
    for warning in warnings:
        log.warn(warning)
    data = RunData(cfg, ctx, manifest, state.memory_format, state.epoch, state.epoch_started)
    # what inference needs: evaluate, predict and export preprocess as the run's validation did
    meta = {"arch": cfg.arch, "width": cfg.width, "image_size": cfg.eval_image_size, "crop_pct": cfg.eval_crop_pct,
            "classes": manifest.classes, "mean": manifest.stats.mean, "std": manifest.stats.std}

    def save(best: bool = False) -> None:
        error = None
        if ctx.is_main:
            try:
                path = checkpoint.save({**state.state_dict(), "layout": layout.to_dict(), "config": public_config,
                                        "meta": {**meta, "wandb_id": state.wandb_id}},
                                       cfg.run_dir, state.step, cfg.keep_checkpoints, best=best)
            except checkpoint.SaveError as e:
                error = e
            else:
                if cfg.wandb_log_model == "all" or (best and cfg.wandb_log_model == "best"):
                    log_model(log, path, state, meta, best)
        # Every rank waits for rank 0's write (nobody exits while it is writing) and stops with it if it failed.
        if not dist.everyone(error is None):
            log.close(checkpoint.SaveError.exit_code)
            raise error or checkpoint.SaveError(f"rank {ctx.rank} stops: rank 0 could not save step {state.step}")

    log.info(f"{f'resuming at step {state.step}' if saved else 'starting'}: {cfg.arch} x{cfg.width} on "
             f"{ctx.world_size} x {ctx.device.type}, {cfg.precision}, global batch {global_batch(cfg, ctx)}, "
             f"lr {cfg.lr:.4g}, {cfg.workers} loader workers per rank ({cfg.decode} decode), "
             f"{data.micro_per_epoch // cfg.accum_steps} steps/epoch, {cfg.max_steps} steps")
    exit_code = 0
    while state.step < cfg.max_steps and not exit_code:
        with contextlib.closing(data.epoch(state.epoch, state.batches_done)) as batches:
            exit_code = train_one_epoch(state, batches, data, cfg, ctx, log, stop, save)
        if exit_code:
            break
        epoch_finished = state.batches_done >= data.micro_in(state.epoch)
        if epoch_finished:
            state.epoch, state.batches_done, state.epoch_started = state.epoch + 1, 0, None
        if state.step >= cfg.max_steps or (epoch_finished and state.epoch % cfg.eval_every == 0):
            save(best=validate(state, data, log, manifest.classes) if data.has_validation else False)
    data.close()
    if exit_code == 0:
        if ctx.is_main and cfg.wandb_log_model == "best" and state.best_top1 < 0:  # no validation: the last stands in
            log_model(log, checkpoint.latest_path(cfg.run_dir), state, meta, best=False)
        finish(state, cfg.run_dir, log, ctx.is_main)
    log.close(exit_code)
    return exit_code


# ---- set-up ----------------------------------------------------------------------------------------------------------
def local_ranks() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def global_batch(cfg: Config, ctx: dist.DistContext) -> int:
    return cfg.batch_size * ctx.world_size * cfg.accum_steps


def job_settings(cfg: Config, ctx: dist.DistContext, manifest: Manifest, saved: dict | None):
    """-> `cfg` made concrete for this job (on resume: with the checkpoint's global batch, lr and weight decay), its
    epoch layout, and the warnings to show."""
    warnings = []
    if saved is not None:
        check_compatible(saved, cfg, manifest)
        cfg, warnings = same_global_batch(cfg, saved, ctx.world_size)
    cfg = resolve(cfg, device=ctx.device, world_size=ctx.world_size, local_ranks=local_ranks(),
                  train_samples=manifest.split("train").num_samples)
    if saved is not None:
        cfg, unapplied = optimizer_settings_in_use(cfg, saved)
        warnings += unapplied + schedule_change(saved, cfg)
    if cfg.decode == "device" and ctx.device.type != "cuda" and not cfg.synthetic:
        warnings.append("--decode device without a GPU decodes every batch on the CPU in the training process, "
                        "between steps: slower than --decode workers, which is what to use here")
    return cfg, EpochLayout(ctx.world_size, cfg.batch_size, cfg.accum_steps, cfg.workers, cfg.shuffle_buffer), warnings


def prepare_run_dir(run_dir: str, public_config: dict, is_main: bool) -> None:
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # left by the preemption we are resuming from
            os.remove(os.path.join(run_dir, "STOP"))
        write_json_atomic(os.path.join(run_dir, "config.json"), public_config)
    dist.barrier()


def configure_torch(cfg: Config, device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input size for the whole run: let cuDNN time its kernels once
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Leave the cores the DataLoader workers decode on: oversubscribed CPUs run several times slower.
        torch.set_num_threads(max(1, available_cores() // local_ranks() - cfg.workers))
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)


@dataclass
class TrainState:
    """Everything a step changes, and what a checkpoint saves and restores.

    `model` is the network itself (saved, averaged, evaluated); `train_model` is the same network as the step runs
    it: wrapped in DDP when there are several ranks, then compiled with --compile.
    """

    model: torch.nn.Module
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: WeightEMA | None
    autocast: Callable[[], contextlib.AbstractContextManager]
    memory_format: torch.memory_format
    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # micro-batches of the current epoch already trained on
    best_top1: float = -1.0
    wandb_id: str | None = None
    epoch_started: dict | None = None  # the current epoch began under another layout (replan.carried_over)

    @classmethod
    def create(cls, cfg: Config, ctx: dist.DistContext, num_classes: int, saved: dict | None = None) -> "TrainState":
        """A resolved `cfg` -> the model, wrapped, with its optimizer, schedule, scaler and EMA; restored from `saved`
        (a checkpoint) when resuming, else initialised from --init-from if given."""
        device = ctx.device
        memory_format = torch.channels_last if cfg.channels_last == "on" else torch.contiguous_format
        model = build_model(cfg.arch, num_classes, width=cfg.width, zero_init_residual=True)
        if cfg.init_from and saved is None:
            load_init_weights(model, cfg.init_from)
        if cfg.sync_bn and device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(device, memory_format=memory_format)
        optimizer = build_optimizer(model, cfg, device)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        state = cls(
            model=model, train_model=model, optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.max_steps)),
            scaler=torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16"),
            ema=WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None,
            autocast=(lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext,
            memory_format=memory_format)
        if saved is not None:
            state.load_state_dict(saved)
        if ctx.distributed:
            state.train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            state.train_model = torch.compile(state.train_model, mode=cfg.compile_mode)
        return state

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights to evaluate: the EMA's when the run keeps one."""
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else {},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": checkpoint.capture_rng(), "step": self.step,
                "epoch": self.epoch, "batches_done": self.batches_done, "best_top1": self.best_top1,
                "epoch_started": self.epoch_started}

    def load_state_dict(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved["scaler"]:  # empty when saved without fp16: switching to fp16 starts a fresh loss scale
            self.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None and saved.get("ema"):
            self.ema.load_state_dict(saved["ema"])
        checkpoint.restore_rng(saved["rng"])
        self.step, self.epoch, self.batches_done = saved["step"], saved["epoch"], saved["batches_done"]
        self.best_top1, self.wandb_id = saved["best_top1"], saved["meta"].get("wandb_id")

    def optimizer_step(self, clip_grad_norm: float) -> None:
        """One update from the accumulated gradients, then the schedule, the EMA and the step count."""
        optimizer_step(self.optimizer, self.scaler, clip_grad_norm)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm weights and biases (every 1-d parameter), as in the ResNet training recipes.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}  # one kernel for the whole update on GPUs
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **fused)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, **fused)


def warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


# ---- one epoch -------------------------------------------------------------------------------------------------------
def train_one_epoch(state: TrainState, batches, data: RunData, cfg: Config, ctx: dist.DistContext, log: Logger,
                    stop: dist.StopFlag, save: Callable[..., None]) -> int:
    """Train on `batches` until they end or the run reaches its last step; -> 0, or the exit code to stop with."""
    window = LogWindow(ctx.device)
    fetch_start = time.perf_counter()
    for images, labels, _ in batches:
        window.data_wait += time.perf_counter() - fetch_start
        x, y = data.train_inputs(images, labels, state.epoch, state.batches_done)
        state.batches_done += 1
        sync = state.batches_done % cfg.accum_steps == 0  # the micro-batch that completes a step
        window.add(forward_backward(state.train_model, x, y, autocast=state.autocast, scaler=state.scaler,
                                    accum_steps=cfg.accum_steps, sync=sync, label_smoothing=cfg.label_smoothing,
                                    class_weights=data.class_weights))
        if sync:
            state.optimizer_step(cfg.clip_grad_norm)
            window.steps += 1
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                if not window.flush(state, cfg, ctx, log, data.shards_skipped.value):
                    return EXIT_DIVERGED
            if stop.should_stop():
                log.info(f"stop requested: saving step {state.step} and exiting with code {EXIT_PREEMPTED} "
                         "(requeue me)")
                save()
                return EXIT_PREEMPTED
            if state.step % cfg.checkpoint_every == 0:
                save()
            if state.step >= cfg.max_steps:
                break
        fetch_start = time.perf_counter()
    return 0


def forward_backward(model, x, y, *, autocast, scaler, accum_steps: int, sync: bool,
                     label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """One micro-batch: loss / accum_steps backpropagated, so that summed over the micro-batches of a step (and
    averaged over ranks by DDP) the gradient is that of the mean loss over the global batch. A DDP model all-reduces
    only on the micro-batch that completes a step (`sync`). `y`: class indices, or class probabilities (mixed
    batches); label smoothing applies to both. Returns the detached, unscaled loss."""
    no_sync = getattr(model, "no_sync", None)  # DDP's, also reached through a compiled wrapper
    with no_sync() if no_sync is not None and not sync else contextlib.nullcontext():
        with autocast():
            loss = F.cross_entropy(model(x), y, weight=class_weights, label_smoothing=label_smoothing)
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


class LogWindow:
    """The steps one console line and metrics record covers: losses summed on the device, time, data wait."""

    def __init__(self, device: torch.device):
        self.device = device
        self.losses = torch.zeros(2, device=device)  # finite losses summed, non-finite ones counted (see tally)
        self.start, self.data_wait, self.steps = time.perf_counter(), 0.0, 0

    def add(self, loss: torch.Tensor) -> None:
        self.losses += tally(loss)

    def flush(self, state: TrainState, cfg: Config, ctx: dist.DistContext, log: Logger, shards_skipped: int) -> bool:
        """Log the window and start the next; False when every micro-batch of it on every rank had a NaN/inf loss
        (all ranks see the same sums, so all stop at this step)."""
        # Read the losses before the clock: on a GPU, that waits for the window's last kernels. The host can launch
        # many steps ahead of the GPU (with CUDA graphs most of all), so a clock read first times the launches, not
        # the work: on an H200 that logged 11,000 images/s for a step the GPU runs at 6,800.
        loss_total, nonfinite = dist.all_reduce_sum(self.losses.clone()).tolist()
        elapsed = time.perf_counter() - self.start
        micro_batches = self.steps * cfg.accum_steps * ctx.world_size
        if nonfinite == micro_batches:
            steps = f"step {state.step}" if self.steps == 1 else f"steps {state.step - self.steps + 1}-{state.step}"
            log.error(f"training diverged: the loss was NaN or inf in every micro-batch ({micro_batches}) of {steps} "
                      f"on every rank; stopping without saving (exit code {EXIT_DIVERGED}). Start again in a new "
                      "--run-dir with a lower --lr, --clip-grad-norm 1.0 or another --precision (a "
                      "checkpoints/latest.pt holds the last state saved before).")
            return False
        record = {"kind": "train", "epoch": state.epoch, "loss": loss_total / (micro_batches - nonfinite),
                  "nonfinite_losses": int(nonfinite), "lr": state.scheduler.get_last_lr()[0],
                  "images_per_s": self.steps * global_batch(cfg, ctx) / elapsed, "data_wait": self.data_wait / elapsed,
                  "shards_skipped": shards_skipped}
        if self.device.type == "cuda":
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        log.log(record, state.step, console=console_line(record, state.step, cfg.max_steps))
        self.losses.zero_()
        self.start, self.data_wait, self.steps = time.perf_counter(), 0.0, 0
        return True


def console_line(r: dict, step: int, max_steps: int) -> str:
    return (f"train step {step:>6}/{max_steps}  epoch {r['epoch']}  loss {r['loss']:.4f}  lr {r['lr']:.4g}  "
            f"{r['images_per_s']:,.0f} img/s  data wait {r['data_wait']:.0%}"
            + (f"  peak GPU memory {r['gpu_mem_gb']:.1f} GiB" if "gpu_mem_gb" in r else "")
            + (f"  ({r['nonfinite_losses']} NaN/inf losses left out)" if r["nonfinite_losses"] else ""))


# ---- validation and the end ------------------------------------------------------------------------------------------
def validate(state: TrainState, data: RunData, log: Logger, classes: list[str]) -> bool:
    """Evaluate (the EMA weights if kept), log, and say whether this is the best top-1 so far."""
    result = evaluate(state.eval_model, data.validation(), len(classes), data.ctx.device, data.mean, data.std,
                      state.autocast, state.memory_format)
    is_best = result["top1"] > state.best_top1
    state.best_top1 = max(state.best_top1, result["top1"])
    log.log({"kind": "val", "epoch": state.epoch, **result}, state.step,
            console=f"val   step {state.step:>6}  epoch {state.epoch}  top-1 {result['top1']:.4f}  "
                    f"top-5 {result['top5']:.4f}  balanced {result['balanced_accuracy']:.4f}  "
                    f"macro-F1 {result['macro_f1']:.4f}  loss {result['loss']:.4f}  ({result['count']} samples)")
    log.log_confusion(result["confusion"], classes, state.step, os.path.join(log.run_dir, "confusion_matrix.png"))
    log.log_per_class(result["per_class_accuracy"], classes, state.step)
    return is_best


def log_model(log: Logger, path: str, state: TrainState, meta: dict, best: bool) -> None:
    """A saved checkpoint as a version of the run's W&B model artifact (--wandb-log-model)."""
    log.log_model(path, aliases=[f"step-{state.step}", "latest"] + ["best"] * best,
                  metadata={"step": state.step, "epoch": state.epoch,
                            "best_val_top1": state.best_top1 if state.best_top1 >= 0 else None,
                            **{k: meta[k] for k in ("arch", "width", "image_size", "classes")}})


def finish(state: TrainState, run_dir: str, log: Logger, is_main: bool) -> None:
    if is_main:
        from distributed_train.plots import plot_training_curves

        plot_training_curves(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "training_curves.png"))
    best = f"best val top-1 {state.best_top1:.4f}" if state.best_top1 >= 0 else "no validation split"
    log.info(f"done: {state.step} steps, {best}; checkpoints in {checkpoint.checkpoint_dir(run_dir)}")


# ---- starting from saved weights -------------------------------------------------------------------------------------
def same_global_batch(cfg: Config, saved: dict, world_size: int) -> tuple[Config, list[str]]:
    """On another number of ranks, the per-rank batch or the accumulation changes so that the global batch, and
    with it the lr and the steps per epoch, stay the checkpoint's."""
    before = saved["config"]
    if before["world_size"] == world_size:
        return cfg, []
    batch_size, accum_steps = keep_global_batch(cfg.batch_size, cfg.accum_steps, world_size, before["batch_size"]
                                                * before["world_size"] * before["accum_steps"])
    return dataclasses.replace(cfg, batch_size=batch_size, accum_steps=accum_steps), [
        f"resuming a run of {before['world_size']} ranks on {world_size}: --batch-size {batch_size} --accum-steps "
        f"{accum_steps} keep its global batch"]


def optimizer_settings_in_use(cfg: Config, saved: dict) -> tuple[Config, list[str]]:
    """A resumed run restores its optimizer and schedule from the checkpoint (as torchvision's reference scripts and
    Lightning do), with their peak lr and weight decay: -> the settings with those values, and the ones given now
    that are therefore not used."""
    saved_lr = saved["scheduler"]["base_lrs"][0]
    saved_decay = saved["optimizer"]["param_groups"][0]["weight_decay"]
    notes = []
    if not math.isclose(saved_lr, cfg.lr, rel_tol=1e-9):
        notes.append(f"peak lr {cfg.lr:.4g} (the checkpoint's: {saved_lr:.4g})")
    if not math.isclose(saved_decay, cfg.weight_decay, rel_tol=1e-9):
        notes.append(f"--weight-decay {cfg.weight_decay:g} (the checkpoint's: {saved_decay:g})")
    warning = ("resuming restores the optimizer and schedule from the checkpoint, so these settings are not used: "
               + "; ".join(notes) + ". Start a new --run-dir to train with them.")
    return dataclasses.replace(cfg, lr=saved_lr, weight_decay=saved_decay), [warning] if notes else []


def schedule_change(saved: dict, cfg: Config) -> list[str]:
    """A run resumed with another length: warmup and cosine are recomputed for the new length (as when a torchvision
    reference run is restarted with more epochs), so the lr steps to the new curve at once. Said in one line."""
    before = saved["config"].get("max_steps")  # concrete since resolve() (0 in older checkpoints: unknown)
    if not before or before == cfg.max_steps:
        return []
    step = saved["step"]
    next_lr = cfg.lr * warmup_cosine(cfg.warmup_steps, cfg.max_steps)(step + 1)  # what the next step logs
    return [f"the checkpoint's schedule ran to {before} steps, --epochs/--max-steps now give {cfg.max_steps}: warmup "
            f"and cosine are recomputed for {cfg.max_steps} steps, so the lr jumps from "
            f"{saved['scheduler']['_last_lr'][0]:.4g} to {next_lr:.4g} after step {step + 1}"]


def load_init_weights(model: torch.nn.Module, path: str) -> None:
    """--init-from: a torchvision-format state_dict, or this trainer's checkpoint (its EMA weights if it kept them)."""
    weights = checkpoint.load(path)  # a missing or foreign file is a one-line error naming it
    if not isinstance(weights, dict):
        raise CheckpointError(f"--init-from {path}: holds a {type(weights).__name__}, not a state_dict of weights")
    if isinstance(weights.get("model"), dict):
        weights = checkpoint.inference_weights(weights)
    try:
        load_torchvision_state_dict(model, weights, strict=False)
    except ValueError as e:
        raise CheckpointError(f"--init-from {path}: {e}") from None


def check_compatible(saved: dict, cfg: Config, manifest: Manifest) -> None:
    """Resuming with another model or dataset would silently load the wrong weights, and another optimizer cannot
    take over the saved one's state: refuse with the reason."""
    before = {**saved["meta"], "optimizer": saved.get("config", {}).get("optimizer", cfg.optimizer)}
    mismatches = [f"{k}: checkpoint {before[k]!r} vs now {v!r}" for k, v in
                  (("arch", cfg.arch), ("width", cfg.width), ("classes", manifest.classes),
                   ("optimizer", cfg.optimizer)) if before[k] != v]
    if mismatches:
        raise UsageError(f"{cfg.run_dir} holds a run that cannot be resumed with these settings ("
                         + "; ".join(mismatches) + "): use another --run-dir")
