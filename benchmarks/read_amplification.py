"""Read amplification per epoch: bytes read / bytes used, sequential tar reading vs reading by the sample index.

    python benchmarks/read_amplification.py [--data ../shared/data/mushvision4]

(1) Planned, for cluster-sized layouts, with the trainer's own range planner (`distributed_train.data.cut_ranges`)
    and samples of equal size: a slot reading a shard sequentially reads it from its first byte to the end of its
    range; by index it reads its range only.
(2) Measured on real shards: mushvision4 built into 2 training shards, every (rank, worker) slot of 2 ranks x 2
    workers read with the trainer's `PieceReader`, counting the bytes the transport returns, with and without the
    index.
"""
from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

from distributed_train.data import PieceReader, cut_ranges, epoch_shards, even_split
from distributed_train.schedule import train_batches_per_rank
from shard_tools import transport
from shard_tools.build import build_dataset
from shard_tools.indexed_reader import read_index
from shard_tools.manifest import Manifest, ShardInfo
from machine import MUSHVISION4

LAYOUTS = [  # samples, shards, ranks, workers
    (1_281_167, 1282, 8, 8),
    (1_281_167, 1282, 64, 8),
    (1_281_167, 128, 64, 8),
    (1_281_167, 64, 64, 8),
]
BATCH = 64


def plan(shards: list[tuple[str, ShardInfo]], num_samples: int, ranks: int, workers: int):
    steps = train_batches_per_rank(num_samples, ranks, BATCH)
    per_worker = [b * BATCH for b in even_split(steps, workers)]
    return cut_ranges(shards, per_worker * ranks)


def planned(samples: int, num_shards: int, ranks: int, workers: int) -> tuple[float, float, float]:
    """(sequential, indexed, shards opened per slot) for equal-size samples (bytes counted in samples)."""
    sizes = even_split(samples, num_shards)
    shards = [(f"s{i}", ShardInfo(f"s{i}", n, n, "")) for i, n in enumerate(sizes)]
    slots = plan(shards, samples, ranks, workers)
    used = sum(p.stop - p.start for slot in slots for p in slot)
    sequential = sum(p.stop for slot in slots for p in slot)  # from the shard's first sample to the range's end
    return sequential / used, used / used, sum(map(len, slots)) / len(slots)


class CountingReads:
    """Counts the bytes the transport hands out: read from streams (sequential shards, index files) and ranged
    reads."""

    def __init__(self):
        self.bytes = 0
        self._open, self._range = transport.open_stream, transport.read_range

    def __enter__(self):
        counter = self

        class Counted(io.RawIOBase):
            def __init__(self, stream):
                self.stream = stream

            def readinto(self, buffer):
                data = self.stream.read(len(buffer))
                buffer[:len(data)] = data
                counter.bytes += len(data)
                return len(data)

            def readable(self):
                return True

            def close(self):
                self.stream.close()
                super().close()

        def read_range(url, start, length, **kw):
            data = self._range(url, start, length, **kw)
            self.bytes += len(data)
            return data

        transport.open_stream = lambda url, **kw: io.BufferedReader(Counted(self._open(url, **kw)))
        transport.read_range = read_range
        return self

    def __exit__(self, *exc):
        transport.open_stream, transport.read_range = self._open, self._range


def measured(data: Path, ranks: int, workers: int) -> dict[str, float]:
    """bytes read / bytes of the samples used, each slot with its own reader (as each worker process has)."""
    with tempfile.TemporaryDirectory(prefix="read_amplification-") as tmp:
        build_dataset(data / "images", data / "labels.csv", Path(tmp) / "shards", size=256, shard_size=800,
                      val_fraction=0.1, seed=0, workers=1, progress=False)
        manifest = Manifest.read(str(Path(tmp) / "shards"))
        split = manifest.split("train")
        slots = plan(epoch_shards(manifest, "train", 0, 0, shuffle=True), split.num_samples, ranks, workers)
        starts = {sh.name: read_index(manifest.shard_url(sh), sh).starts for sh in split.shards}
        used = sum(int(starts[p.shard.name][p.stop] - starts[p.shard.name][p.start]) for slot in slots for p in slot)
        results = {}
        for name, use_index in (("sequential", False), ("by index (index files included)", True)):
            with CountingReads() as counter:
                for slot in slots:
                    reader = PieceReader(use_index=use_index)
                    for piece in slot:
                        for _ in reader(piece):
                            pass
            results[name] = counter.bytes / used
        print(f"  {len(split.shards)} training shards, {sum(map(len, slots)) / len(slots):.1f} shards opened per slot")
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=MUSHVISION4)
    args = parser.parse_args()
    print("(1) planned, equal-size samples, batch 64 per rank")
    print("| samples | shards | ranks x workers | sequential: bytes read / used | by index | shards opened per slot |")
    print("|---|---|---|---|---|---|")
    for samples, shards, ranks, workers in LAYOUTS:
        sequential, indexed, opened = planned(samples, shards, ranks, workers)
        print(f"| {samples:,} | {shards:,} | {ranks} x {workers} = {ranks * workers} | {sequential:.2f}x | "
              f"{indexed:.2f}x | {opened:.1f} |")
    print(f"\n(2) measured: {args.data.name} in 800-sample shards, 2 ranks x 2 workers, bytes the transport returned")
    for name, ratio in measured(args.data, 2, 2).items():
        print(f"  {name:<32s} {ratio:.3f}x")


if __name__ == "__main__":
    main()
