"""cProfile of near-duplicate grouping at 1M and 10M synthetic hashes (bench_scale.py's photo-like set): the share of
values that share their first key with another value, and the 8 functions with the most time of their own.

    .venv/bin/python benchmarks/profile_grouping.py [N ...]     # default 1000000 10000000: ~2 min
"""
from __future__ import annotations

import cProfile
import io
import pstats
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_scale import synthetic_hashes  # noqa: E402
from shard_tools import split  # noqa: E402


def shared_share(unique: np.ndarray, parts: int) -> float:
    """Share of the distinct values whose first key (k - d parts) is also another value's: each such value is a
    candidate compared for nothing, unless it is a near-duplicate."""
    keys = split._keys_by_first_part(parts, split.DEFAULT_MAX_DISTANCE)
    _, counts = np.unique(unique & next(iter(keys.values()))[0], return_counts=True)
    return float(counts[counts > 1].sum() / len(unique))


def main() -> int:
    for n in [int(a) for a in sys.argv[1:]] or [1_000_000, 10_000_000]:
        hashes = synthetic_hashes(n)
        unique = np.unique(hashes)
        parts = split.choose_parts(len(unique), split.DEFAULT_MAX_DISTANCE)
        print(f"n={n:,}: k={parts}, {len(unique):,} distinct, sharing their first key with another value: "
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
