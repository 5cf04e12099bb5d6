"""Near-duplicate grouping, this tree's `shard_tools.split` against the one of an earlier commit, side by side in one
run on the same synthetic hashes (bench_scale.py's sets), CPU seconds of one core, and whether the groups are equal.

    .venv/bin/python benchmarks/bench_grouping_change.py [--before b39c6c1] [N ...]     # default N: 1000000 10000000

The earlier version is read with `git show REV:shard_tools/split.py`, so this needs the repository's history.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_scale import synthetic_hashes  # noqa: E402
from shard_tools import split as current  # noqa: E402


def module_at(rev: str):
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:shard_tools/split.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "split_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("split_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sizes", type=int, nargs="*", default=[1_000_000, 10_000_000])
    ap.add_argument("--before", default="b39c6c1", help="the commit to compare with")
    args = ap.parse_args()
    versions = [(f"at {args.before}", module_at(args.before)), ("this tree", current)]
    for blank in (0.0, 0.05):
        base = {}
        for n in args.sizes:
            hashes, groups, seconds = synthetic_hashes(n, blank), [], []
            for name, module in versions:
                start = time.process_time()
                groups.append(module.group_near_duplicates(hashes))
                seconds.append(time.process_time() - start)
                per = seconds[-1] / n * 1e6
                base.setdefault(name, per)
                print(f"{'5% blank' if blank else 'photo-like'} n={n:>11,} {name:>12}: {seconds[-1]:7.2f} s CPU "
                      f"{per:5.2f} us/hash, x{per / base[name]:.2f} the per-hash cost at n={args.sizes[0]:,}",
                      flush=True)
            print(f"  same groups: {np.array_equal(*groups)}; this tree / before: {seconds[1] / seconds[0]:.2f}x",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
