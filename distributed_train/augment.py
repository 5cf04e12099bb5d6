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

import random

import torch
from torchvision.transforms import v2

AUTO_AUGMENT = {
    "trivialaugment": v2.TrivialAugmentWide,
    "randaugment": v2.RandAugment,
    "autoaugment": v2.AutoAugment,  # its ImageNet policy
}


def train_transform(image_size: int, min_crop_scale: float, auto_augment: str = "none", random_erase: float = 0.0,
                    fill: tuple[int, int, int] = (0, 0, 0)) -> v2.Compose:
    """uint8 CHW image -> augmented uint8 CHW crop of `image_size`."""
    steps = [v2.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if auto_augment != "none":
        steps.append(AUTO_AUGMENT[auto_augment]())
    if random_erase > 0:
        steps.append(v2.RandomErasing(p=random_erase, value=list(fill)))
    return v2.Compose(steps)


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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash_seed(("mix", self.seed, epoch, self.rank, batch)))
            return self.mix(images, labels)


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
