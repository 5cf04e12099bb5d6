"""What each epoch of a run trains and validates on, chosen once per run.

Normally the shards of the manifest (data.py), decoded in the DataLoader workers or, with --decode device, on the
GPU (device_decode.py). Two substitutes exist for measuring and auditing, so the training loop never branches on
them: `--synthetic` (one fixed random batch in memory: the loop's speed without its data pipeline) and
`--record-samples` (the same batches, each rank writing the keys it trained on to RUN/samples/).
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
from typing import Iterator

import torch

from distributed_train.augment import BatchMix, class_weights, mean_colour
from distributed_train.config import Config
from distributed_train.data import EpochCursor, PieceReader, eval_loader, normalize, run_train_loader, \
    stats_tensors, train_batches_per_rank
from distributed_train.device_decode import DeviceAugment, DevicePrefetcher
from distributed_train.dist import DistContext
from distributed_train.replan import EpochLayout, remainder_slots
from distributed_train.schedule import parse_progressive
from shard_tools.manifest import Manifest


class RunData:
    """The run's batches: `epoch(e, skip)` for training, `validation()` for evaluation, `to_device` for both."""

    def __init__(self, cfg: Config, ctx: DistContext, manifest: Manifest, memory_format: torch.memory_format,
                 epoch: int = 0, epoch_started: dict | None = None):
        self.cfg, self.ctx, self.manifest, self.memory_format = cfg, ctx, manifest, memory_format
        self.shards_skipped = multiprocessing.Value("i", 0)  # counted in the DataLoader workers, logged by rank 0
        self.read_piece = PieceReader(cfg.on_shard_error, cfg.verify_shards, self.shards_skipped)
        self.device_augment = DeviceAugment(cfg.image_size, ctx.device) if cfg.decode == "device" else None
        self.mean, self.std = stats_tensors(manifest.stats.mean, manifest.stats.std, ctx.device)
        self.micro_per_epoch = train_batches_per_rank(manifest.split("train").num_samples, ctx.world_size,
                                                      cfg.batch_size, cfg.accum_steps)
        self.has_validation = "val" in manifest.splits and manifest.split("val").num_samples > 0
        self.mix = BatchMix(manifest.num_classes, cfg.mixup, cfg.cutmix, cfg.seed, ctx.rank) \
            if cfg.mixup > 0 or cfg.cutmix > 0 else None
        weights = class_weights(manifest.split("train").class_counts, cfg.class_balance)
        self.class_weights = weights.to(ctx.device) if weights is not None else None
        self.planned = {}  # {epoch: (slots, samples per worker)} for an epoch begun under another layout
        if epoch_started is not None:
            now = EpochLayout(ctx.world_size, cfg.batch_size, cfg.accum_steps, cfg.workers, cfg.shuffle_buffer)
            self.planned[epoch] = remainder_slots(manifest, EpochLayout(**epoch_started["layout"]),
                                                  epoch_started["batches_done"], now, cfg.seed, epoch)
        self.cursor = EpochCursor()  # made before the loader's workers, which share it
        self.loader = None  # made on first use: --synthetic runs never start workers
        self.ahead = None  # (epoch, skip, iterator) started before it was asked for

    def micro_in(self, epoch: int) -> int:
        """Micro-batches per rank in `epoch` (fewer in an epoch finished under another layout)."""
        if epoch in self.planned:
            return sum(self.planned[epoch][1]) // self.cfg.batch_size
        return self.micro_per_epoch

    def epoch(self, epoch: int, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """(images, labels, keys) for the rest of `epoch` after its first `skip` micro-batches."""
        if self.cfg.synthetic:
            return synthetic_batches(self.cfg, self.manifest.num_classes, self.micro_in(epoch) - skip)
        batches = self.shard_batches(epoch, skip)
        if self.cfg.record_samples:
            return recording(batches, os.path.join(self.cfg.run_dir, "samples"), self.ctx.rank, epoch)
        return batches

    def shard_batches(self, epoch: int, skip: int):
        batches = self.start(epoch, skip)
        if self.device_augment is not None:
            prefetcher = DevicePrefetcher(batches, self.device_augment)
            try:
                yield from prefetcher
            finally:
                prefetcher.close()
        else:
            yield from batches
        # The epoch ran to its end: start the next one now, so its first batches are decoded while this process
        # validates and saves (the first step of an epoch then waits no longer than any other).
        if (epoch + 1) * (self.micro_per_epoch // self.cfg.accum_steps) < self.cfg.max_steps:
            self.ahead = (epoch + 1, 0, self.start(epoch + 1, 0))

    def start(self, epoch: int, skip: int):
        """The iterator of the run's one training loader over `epoch` after `skip` micro-batches (already running
        when the previous epoch started it ahead)."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[:2] == (epoch, skip):
            return ahead[2]
        if self.loader is None:
            cfg, ctx = self.cfg, self.ctx
            self.loader = run_train_loader(
                self.manifest, self.cursor, workers=cfg.workers, pin_memory=ctx.device.type == "cuda", rank=ctx.rank,
                world_size=ctx.world_size, batch_size=cfg.batch_size, accum_steps=cfg.accum_steps,
                image_size=cfg.image_size, seed=cfg.seed, min_crop_scale=cfg.min_crop_scale,
                shuffle_buffer=cfg.shuffle_buffer, read_piece=self.read_piece,
                decode_on_device=self.device_augment is not None, planned=self.planned,
                extras={"auto_augment": cfg.auto_augment, "random_erase": cfg.random_erase,
                        "fill": mean_colour(self.manifest.stats.mean)},
                progressive=(*parse_progressive(cfg.progressive), self.epochs) if cfg.progressive else None)
        self.cursor.set(epoch, skip)  # before iter(): the workers read it when their iterators are re-created
        return iter(self.loader)

    def close(self) -> None:
        """Stop the training loader's workers (they live for the whole run)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
        self.loader, self.ahead = None, None

    def validation(self):
        cfg, ctx = self.cfg, self.ctx
        return eval_loader(self.manifest, "val", rank=ctx.rank, world_size=ctx.world_size, batch_size=cfg.batch_size,
                           image_size=cfg.eval_image_size, workers=cfg.workers, pin_memory=ctx.device.type == "cuda",
                           read_piece=self.read_piece, crop_pct=cfg.eval_crop_pct)

    @property
    def epochs(self) -> int:
        """Epochs the run starts, the last one possibly cut short by --max-steps."""
        return -(-self.cfg.max_steps // (self.micro_per_epoch // self.cfg.accum_steps))

    def to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalize(images.to(self.ctx.device, non_blocking=True), self.mean, self.std)
        return x.contiguous(memory_format=self.memory_format), labels.to(self.ctx.device, non_blocking=True)

    def train_inputs(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, batch: int):
        """A training micro-batch on the device, mixed (--mixup/--cutmix: the targets become class probabilities)."""
        x, y = self.to_device(images, labels)
        if self.mix is not None:
            x, y = self.mix(x, y, epoch, batch)
        return x, y


# ---- benchmark and audit substitutes -------------------------------------------------------------------------------
def synthetic_batches(cfg: Config, num_classes: int, count: int):
    images = torch.randint(0, 256, (cfg.batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (cfg.batch_size,))
    if torch.cuda.is_available():
        images, labels = images.pin_memory(), labels.pin_memory()
    yield from itertools.repeat((images, labels, [""] * cfg.batch_size), count)  # a generator: the loop closes it


def recording(batches, folder: str, rank: int, epoch: int):
    """The same batches; their keys are appended to FOLDER/epoch-E-rank-R.txt as they are handed out."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"epoch-{epoch:04d}-rank-{rank:05d}.txt")
    try:
        for images, labels, keys in batches:
            with open(path, "a", encoding="utf-8") as f:
                f.write("".join(k + "\n" for k in keys))
            yield images, labels, keys
    finally:
        batches.close()
