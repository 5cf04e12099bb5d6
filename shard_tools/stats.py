"""Exact per-channel pixel statistics, mergeable in any order.

Each worker keeps integer sums (pixel count, sum and sum of squares of the 0-255 values per channel). Integer
addition is exact and associative, so the merged result is bit-identical whatever the number of workers, shards or
SLURM slices, and the mean/std are computed once at the end in float64 from exact integers -- never averaged per
image (an average of per-image stds is not the dataset std).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from shard_tools.manifest import ChannelStats

_VALUES = np.arange(256, dtype=np.int64)
_SQUARES = _VALUES * _VALUES


@dataclass
class PixelSums:
    count: int = 0  # pixels per channel
    sums: list[int] = field(default_factory=lambda: [0, 0, 0])
    squares: list[int] = field(default_factory=lambda: [0, 0, 0])

    def add_histogram(self, histogram) -> None:
        """Accumulate one image given as PIL's RGB histogram: 3 x 256 counts of each pixel value per channel.

        Sum = Σ v·h[v] and Σx² = Σ v²·h[v] in int64 (no overflow below 2^40 pixels); Python ints carry the total.
        """
        hist = np.asarray(histogram, dtype=np.int64).reshape(3, 256)
        self.sums = [a + int(b) for a, b in zip(self.sums, hist @ _VALUES)]
        self.squares = [a + int(b) for a, b in zip(self.squares, hist @ _SQUARES)]
        self.count += int(hist[0].sum())

    def __add__(self, other: "PixelSums") -> "PixelSums":
        return PixelSums(
            self.count + other.count,
            [a + b for a, b in zip(self.sums, other.sums)],
            [a + b for a, b in zip(self.squares, other.squares)],
        )

    def to_dict(self) -> dict:
        # Sums of large datasets pass 2^53: keep them as decimal strings so no JSON reader rounds them to floats.
        return {"count": self.count, "sums": [str(s) for s in self.sums], "squares": [str(q) for q in self.squares]}

    @classmethod
    def from_dict(cls, d: dict) -> "PixelSums":
        return cls(int(d["count"]), [int(s) for s in d["sums"]], [int(q) for q in d["squares"]])

    def channel_stats(self) -> ChannelStats:
        """Mean and population std per channel on the 0-1 scale the network sees (pixel / 255)."""
        n = self.count
        if n == 0:
            raise ValueError("no pixels: the training split is empty")
        mean = [s / (255 * n) for s in self.sums]
        # n*Σx² - (Σx)² is computed exactly in integers, so there is no catastrophic cancellation in float.
        std = [math.sqrt(n * q - s * s) / (255 * n) for s, q in zip(self.sums, self.squares)]
        return ChannelStats(mean=mean, std=std, pixels=n)
