"""Read amplification of the trainer's sample ranges: how many bytes a training epoch reads per byte it uses.

    python benchmarks/read_amplification.py                 # README's table
    python benchmarks/read_amplification.py --samples 50000 --shards 40 --ranks 16 --workers 8 --batch-size 128

Each (rank, DataLoader worker) slot reads a consecutive range of the epoch's sample sequence, planned by the
trainer's own functions (`distributed_train.data.cut_ranges`, with the step count of `train_batches_per_rank`). Tar
has no index, so a range that starts inside a shard reads that shard from its first sample and throws the earlier
ones away. Shards are taken as equal in size (they differ by at most one sample) and samples as equal in bytes.
A calculation, not a timing: the figures are exact for the assumed layout.
"""
from __future__ import annotations

import argparse

from distributed_train.data import cut_ranges, even_split, train_batches_per_rank
from shard_tools.manifest import ShardInfo

# (samples, shards, ranks, workers per rank): the rows of README's table
README_ROWS = [(1_281_167, 1282, 8, 8), (1_281_167, 1282, 64, 8), (1_281_167, 128, 64, 8), (1_281_167, 64, 64, 8),
               (1_694, 2, 2, 2)]


def amplification(samples: int, shards: int, ranks: int, workers: int, batch_size: int) -> tuple[float, float]:
    """(bytes read / bytes used, shards opened per slot) for one epoch."""
    layout = [(f"shard-{i}", ShardInfo(f"shard-{i}", n, 0, "")) for i, n in enumerate(even_split(samples, shards))]
    steps = train_batches_per_rank(samples, ranks, batch_size)
    per_worker = [b * batch_size for b in even_split(steps, workers)]  # as train_loader plans one rank
    slots = cut_ranges(layout, per_worker * ranks)
    read = sum(piece.stop for slot in slots for piece in slot)  # from the shard's start to the range's end
    used = sum(piece.stop - piece.start for slot in slots for piece in slot)
    return read / used, sum(map(len, slots)) / len(slots)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, help="training samples (default: README's rows)")
    p.add_argument("--shards", type=int)
    p.add_argument("--ranks", type=int)
    p.add_argument("--workers", type=int, help="DataLoader workers per rank")
    p.add_argument("--batch-size", type=int, default=64, help="per rank (the trainer's default)")
    args = p.parse_args()
    rows = [(args.samples, args.shards, args.ranks, args.workers)] if args.samples else README_ROWS
    print(f"batch {args.batch_size} per rank")
    print("| samples | shards | ranks x workers | bytes read / bytes used | shards opened per slot |")
    print("|---|---|---|---|---|")
    for samples, shards, ranks, workers in rows:
        ratio, opened = amplification(samples, shards, ranks, workers, args.batch_size)
        print(f"| {samples:,} | {shards:,} | {ranks} x {workers} = {ranks * workers} | {ratio:.2f}x | {opened:.1f} |")


if __name__ == "__main__":
    main()
