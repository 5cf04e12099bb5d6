"""The recipe's extras beyond RandomResizedCrop + flip, all from torchvision.transforms.v2, each off by default:

- per image, in the DataLoader workers: `--auto-augment` (TrivialAugmentWide / RandAugment / AutoAugment on the
  uint8 crop) and `--random-erase P` (filled with the dataset's mean colour: 0 after normalisation, as in
  torchvision's reference scripts, which erase after normalising);
- per batch, on the device: `--mixup A` / `--cutmix A` (torchvision's v2.MixUp / v2.CutMix; one of the two per batch
  when both are on), seeded from (seed, epoch, rank, batch) so that a resumed run mixes exactly as before;
- over the run: `--progressive MIN:MAX` crop sizes (FFCV's progressive resizing), in steps of 16 px;
- against long tails: `--class-balance sqrt|inverse` as cross-entropy class weights (the stream, its equal steps per
  rank and its exact resume stay untouched).
"""
from __future__ import annotations

import contextlib
import math
import random
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

ASPECT_RATIOS = (3 / 4, 4 / 3)  # RandomResizedCrop's default: crops are drawn from these aspect ratios

AUTO_AUGMENT = {
    "trivialaugment": v2.TrivialAugmentWide,
    "randaugment": v2.RandAugment,
    "autoaugment": v2.AutoAugment,  # its ImageNet policy
}


class RandomResizedCropFlip:
    """v2.RandomResizedCrop(size, scale, antialias=True) then v2.RandomHorizontalFlip(): the same random draws and
    the same pixels (tests/test_augment.py compares them), the crop + flip in half the time (0.46-0.47x for 160 px
    photos; benchmarks/bench_peers.py, part a0).

    Where v2's time went:
    - its sampler, ~40 us per image in Python and on fresh one-element tensors; `box` draws the same numbers from the
      same generator in the same order into tensors made once (~12 us);
    - it hands the cropped *view* of the decoded image (HWC in memory) to `interpolate`, which then takes its slower
      strided path for uint8; here the small crop is copied to a contiguous channels-last block first, so the resize
      takes the vectorised uint8 path.
    The result is channels-last in memory, as the trainer's batches are (batch_ring.py)."""

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float] = ASPECT_RATIOS):
        self.size, self.scale, self.ratio = size, scale, ratio
        self.log_ratio = torch.log(torch.tensor(ratio)).tolist()  # float32 values, as v2 draws between them
        # where box() draws: one transform per process (DataLoader workers), not shared between threads
        self.uniform, self.integer = torch.empty(1), torch.empty(1, dtype=torch.int64)

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width): v2.RandomResizedCrop.make_params, draw for draw."""
        area = height * width
        for _ in range(10):
            target_area = area * self.uniform.uniform_(*self.scale).item()
            aspect_ratio = self.uniform.uniform_(*self.log_ratio).exp_().item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = self.integer.random_(0, height - h + 1).item()
                return top, self.integer.random_(0, width - w + 1).item(), h, w
        in_ratio = width / height  # v2's fallback: the central crop closest to the allowed ratios
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, height, width = self.box(*image.shape[-2:])
        crop = image.narrow(-2, top, height).narrow(-1, left, width).unsqueeze(0)
        crop = crop.contiguous(memory_format=torch.channels_last)
        if (height, width) != (self.size, self.size):  # v2 leaves an exact-size crop unresized, too
            crop = F.interpolate(crop, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                 antialias=True)
            crop = crop.contiguous(memory_format=torch.channels_last)  # an upscaled crop comes out NCHW
        crop = crop.squeeze(0)
        return crop.flip(-1) if torch.rand(1).item() < 0.5 else crop  # RandomHorizontalFlip: none when rand >= p


def train_transform(image_size: int, min_crop_scale: float, auto_augment: str = "none", random_erase: float = 0.0,
                    fill: tuple[int, int, int] = (0, 0, 0)) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 CHW image -> augmented uint8 CHW crop of `image_size`."""
    steps = [RandomResizedCropFlip(image_size, scale=(min_crop_scale, 1.0))]
    if auto_augment != "none":
        steps.append(AUTO_AUGMENT[auto_augment]())
    if random_erase > 0:
        steps.append(v2.RandomErasing(p=random_erase, value=list(fill)))
    return steps[0] if len(steps) == 1 else v2.Compose(steps)


def mean_colour(mean: list[float]) -> tuple[int, int, int]:
    """The dataset's mean pixel on the 0-255 scale (the manifest keeps it on the 0-1 scale)."""
    return tuple(round(255 * m) for m in mean)


# ---- per-batch mixing ----------------------------------------------------------------------------------------------
class BatchMix:
    """(images, labels) on the device -> (mixed images, soft labels) by MixUp or CutMix, one of them per batch.

    The cross-entropy takes the soft labels with label smoothing on top (F.cross_entropy smooths probability
    targets too), as torchvision's reference scripts combine them."""

    def __init__(self, num_classes: int, mixup: float, cutmix: float, seed: int, rank: int):
        choices = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
                  ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
        self.mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
        self.seed, self.rank = seed, rank

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, batch: int):
        # torchvision draws lambda, the box and the choice from torch's CPU generator: seeded per batch, the draws
        # depend on where the batch is in the run, not on how many batches this process has seen since it started.
        with seeded_cpu_rng(("mix", self.seed, epoch, self.rank, batch)):
            return self.mix(images, labels)


@contextlib.contextmanager
def seeded_cpu_rng(parts: tuple):
    """Inside the block, torch's CPU generator is seeded from `parts`; after it, it is as before. Only the CPU one:
    every draw made here is on the CPU, and torch.manual_seed would also queue a seed for each accelerator, which
    records a Python stack trace on every call (torch's lazy device init), once per batch, for nothing."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(hash_seed(parts))
        yield


def hash_seed(parts: tuple) -> int:
    """A 63-bit seed from any tuple of values: the same on every platform and in every process."""
    return random.Random("-".join(map(str, parts))).getrandbits(63)


def class_weights(counts: list[int], mode: str) -> torch.Tensor | None:
    """--class-balance: cross-entropy weights proportional to count^-1/2 (sqrt) or count^-1 (inverse), scaled so
    that the average weight over the training samples is 1 (the loss keeps its scale, and with it the lr's meaning).
    A class without training samples gets weight 0. None for "none"."""
    if mode == "none":
        return None
    n = torch.tensor(counts, dtype=torch.float64)
    power = {"sqrt": 0.5, "inverse": 1.0}[mode]
    weights = torch.where(n > 0, n.clamp(min=1).pow(-power), torch.zeros_like(n))
    return (weights * n.sum() / (weights * n).sum()).float()
