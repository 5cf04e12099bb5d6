"""cProfile of near-duplicate grouping at 1M and 10M synthetic hashes (bench_scale.py's photo-like set): the share of
values whose first key's bucket holds another value, and the 8 functions with the most time of their own.

    .venv/bin/python benchmarks/profile_grouping.py [N ...]     # default 1000000 10000000: ~2 min
"""
from __future__ import annotations

import cProfile
import io
import math
import pstats
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_scale import synthetic_hashes  # noqa: E402
from shard_tools import split  # noqa: E402


def shared_share(unique: np.ndarray, parts: int) -> float:
    mask = next(split._key_masks(parts, split.DEFAULT_MAX_DISTANCE))
    bits = min(32, math.ceil(math.log2(len(unique))) + 2)
    shared, _ = split._shared_slots(((unique & mask) * split._MIX) >> np.uint64(64 - bits))
    return len(shared) / len(unique)


def main() -> int:
    for n in [int(a) for a in sys.argv[1:]] or [1_000_000, 10_000_000]:
        hashes = synthetic_hashes(n)
        unique = np.unique(hashes)
        parts = split.choose_parts(len(unique), split.DEFAULT_MAX_DISTANCE)
        print(f"n={n:,}: k={parts}, {len(unique):,} distinct, shared in the first key's buckets: "
              f"{shared_share(unique, parts):.1%}")
        profile = cProfile.Profile()
        profile.enable()
        split.group_near_duplicates(hashes)
        profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(8)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
