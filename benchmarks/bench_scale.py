"""How `shard_tools` grows with the number of images: time per stage, peak memory and disk, at several sizes.

    python benchmarks/bench_scale.py --grouping 100000 1000000 [10000000] [--parts 8 9]   # grouping alone
    python benchmarks/bench_scale.py --build 100000 [1000000] [--array 4]   # whole builds of generated JPEGs

--grouping times `split.group_near_duplicates` on synthetic 64-bit hashes of the kind photos give: 10% near-copies
(0-4 flipped bits) of 2% of the others, 1% "dark photos" within 3 bits of one value; and the same with 5% of all
images sharing one hash (blank frames). Sizes are alternated over --rounds and each keeps its median; it prints
us per hash and the ratio to the smallest size (near-linear: ~1x).

--build generates N small licence-free JPEGs in code (smoothed random 9x8 mosaics, whose hashes spread like
photos'; 10% near-duplicate bursts re-saved at another quality, 5% identical blank frames, 100 classes), then runs
`build` in a child process and prints wall time per stage and us per row, the serial share (everything but encode
and write), peak RSS of the parent and of the largest worker (getrusage), and disk in use at the peak vs the
finished dataset. With --array K it also runs the SLURM path: plan, K slices one after another, then merge, each in
its own process, with merge's peak RSS and serial time.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import load_line, machine_line  # noqa: E402

from shard_tools.split import choose_parts, group_near_duplicates  # noqa: E402


# --- synthetic hashes --------------------------------------------------------------------------------------------
def _flips(rng, n: int, max_bits: int) -> np.ndarray:
    """n masks of 0..max_bits random bits each (a repeated bit cancels: fewer, never more)."""
    out = np.zeros(n, dtype=np.uint64)
    count = rng.integers(0, max_bits + 1, n)
    for j in range(max_bits):
        bit = np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)
        out ^= np.where(j < count, bit, np.uint64(0))
    return out


def synthetic_hashes(n: int, blank: float = 0.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_dark, n_copy, n_blank = n // 100, n // 10, int(n * blank)
    other = rng.integers(0, 2**64, n - n_dark - n_copy - n_blank, dtype=np.uint64)
    copies = other[rng.integers(0, max(1, len(other) // 50), n_copy)] ^ _flips(rng, n_copy, 4)
    dark = rng.integers(0, 2**64, dtype=np.uint64) ^ _flips(rng, n_dark, 3)
    blank_frames = np.full(n_blank, rng.integers(0, 2**64, dtype=np.uint64))
    return np.concatenate([other, copies, dark, blank_frames])[rng.permutation(n)]


def bench_grouping(sizes: list[int], rounds: int, forced: list[int]) -> None:
    print("near-duplicate grouping alone (one core), --dup-distance 5")
    sets = {(n, blank): synthetic_hashes(n, blank) for n in sizes for blank in (0.0, 0.05)}
    runs = [(n, blank, None) for n, blank in sets] + [(n, 0.0, k) for n in sizes for k in forced]
    times = {run: [] for run in runs}
    for _ in range(rounds):
        for n, blank, k in runs:
            start = time.process_time()  # CPU time: the machine's other load does not count
            group_near_duplicates(sets[(n, blank)], parts=k)
            times[(n, blank, k)].append(time.process_time() - start)
    for blank in (0.0, 0.05):
        print(f"  {'5% blank frames' if blank else 'photos-like set'}:")
        base = None
        for n in sizes:
            t = statistics.median(times[(n, blank, None)])
            per = t / n * 1e6
            base = base or per
            k = choose_parts(len(np.unique(sets[(n, blank)])), 5)
            print(f"    n={n:>11,}  {t:7.2f} s CPU  {per:5.2f} us/hash  x{per / base:4.2f} of n={sizes[0]:,}  (k={k})")
    if forced:
        # more parts: more keys, each with more bits and so fewer random collisions (profile_grouping.py counts them)
        print("  photos-like set, k forced (the same groups):")
        base = statistics.median(times[(sizes[0], 0.0, None)]) / sizes[0] * 1e6
        for n in sizes:
            for k in forced:
                per = statistics.median(times[(n, 0.0, k)]) / n * 1e6
                print(f"    n={n:>11,}  k={k:<2}  {per:5.2f} us/hash  x{per / base:4.2f} of n={sizes[0]:,} with its k")


# --- generated images --------------------------------------------------------------------------------------------
def _make_images(args) -> list[tuple[str, str]]:
    """One worker's share of the images: (id, label) rows."""
    folder, start, stop, n = args
    from PIL import Image

    rng = np.random.default_rng(start)
    rows = []
    blank_from = n - n // 20  # the last 5% are identical blank frames
    for i in range(start, stop):
        name = f"{i:08d}"
        if i >= blank_from:
            Image.new("RGB", (64, 48)).save(f"{folder}/{name}.jpg", quality=85)
        else:
            burst = i % 10 == 9  # 10% near-duplicates: the previous picture, re-saved at another quality
            seed = i - 1 if burst else i
            coarse = np.random.default_rng(seed).integers(0, 256, (8, 9, 3), dtype=np.uint8)  # ~random hash bits
            img = Image.fromarray(coarse).resize((64, 48), Image.BICUBIC)
            img.save(f"{folder}/{name}.jpg", quality=70 if burst else 85)
        rows.append((name, f"class{rng.integers(0, 100):03d}"))
    return rows


def make_dataset(n: int, folder: Path, processes: int) -> tuple[Path, Path]:
    images = folder / "images"
    images.mkdir(parents=True)
    step = -(-n // (processes * 8))
    jobs = [(str(images), s, min(n, s + step), n) for s in range(0, n, step)]
    with Pool(processes) as pool:
        rows = [r for part in pool.map(_make_images, jobs) for r in part]
    labels = folder / "labels.csv"
    with open(labels, "w") as f:
        f.write("id,label\n")
        f.writelines(f"{i},{lab}\n" for i, lab in rows)
    return images, labels


# --- one build, timed from inside (runs in a child process) ------------------------------------------------------
def _disk_usage(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class DiskPeak(threading.Thread):
    def __init__(self, path: str):
        super().__init__(daemon=True)
        self.path, self.peak, self.stop = path, 0, threading.Event()

    def run(self):
        while not self.stop.wait(1.0):
            self.peak = max(self.peak, _disk_usage(self.path))


def child(mode: str, images: str, labels: str, out: str, workers: int, k: int, n_slices: int) -> dict:
    """Run one command with each stage timed; -> stage seconds, peak RSS (parent, largest worker), disk."""
    from shard_tools import build
    from shard_tools.plan import BuildSettings

    stages: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                stages[name] = stages.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    for attr, name in [("plan_dataset", "plan"), ("_encode", "encode"), ("make_layout", "layout"),
                       ("_pack", "write"), ("finalize", "finish")]:
        setattr(build, attr, timed(name, getattr(build, attr)))
    settings = BuildSettings(images, labels, size=48, shard_size=5000)
    disk = DiskPeak(out)
    disk.start()
    start = time.perf_counter()
    if mode == "build":
        build.build(settings, out, workers=workers, progress=False)
    elif mode == "plan":
        build.plan_dataset(settings, out)
    elif mode == "slice":
        build.write_slice(os.path.join(out, "_plan"), k, n_slices, workers=workers, progress=False)
    else:
        build.merge(out, workers=workers, progress=False)
    wall = time.perf_counter() - start
    disk.stop.set()
    finished = _disk_usage(out)
    return {"wall": wall, "stages": stages, "parent_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "worker_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "disk_peak": max(disk.peak, finished), "disk_final": finished}


def run_child(mode: str, images: Path, labels: Path, out: Path, workers: int, k: int = 0, n_slices: int = 1) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps([mode, str(images), str(labels), str(out), workers, k,
                                                                 n_slices])]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{mode} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _mb(b: float) -> str:
    return f"{b / 2**20:7.0f} MB"


def bench_build(sizes: list[int], workers: int, array: int, where: Path | None) -> None:
    print(f"build of generated 64x48 JPEGs, --size 48 --shard-size 5000 --workers {workers}")
    rows = []
    for n in sizes:
        tmp = Path(tempfile.mkdtemp(prefix="bench_scale-", dir=where))
        try:
            start = time.perf_counter()
            images, labels = make_dataset(n, tmp / "data", workers)
            print(f"  n={n:,}: generated {n:,} JPEGs in {time.perf_counter() - start:.0f} s", flush=True)
            r = run_child("build", images, labels, tmp / "out", workers)
            serial = r["wall"] - r["stages"]["encode"] - r["stages"]["write"]
            print(f"  n={n:,} build: wall {r['wall']:.1f} s = {r['wall'] / n * 1e6:.0f} us/row; stages (s) "
                  + ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
                  + f", other {r['wall'] - sum(r['stages'].values()):.1f}")
            print(f"    serial (all but encode and write): {serial:.1f} s = {serial / r['wall']:.0%} of the wall time,"
                  f" {serial / n * 1e6:.1f} us/row")
            print(f"    peak RSS parent {_mb(r['parent_rss'])}, largest worker {_mb(r['worker_rss'])}; disk peak"
                  f" {_mb(r['disk_peak'])} vs finished dataset {_mb(r['disk_final'])}", flush=True)
            rows.append((n, r))
            if array:
                shutil.rmtree(tmp / "out")
                plan = run_child("plan", images, labels, tmp / "out", workers)
                slices = [run_child("slice", images, labels, tmp / "out", workers, k, array) for k in range(array)]
                m = run_child("merge", images, labels, tmp / "out", workers)
                m_serial = m["wall"] - m["stages"]["write"]
                print(f"  n={n:,} array path: plan {plan['wall']:.1f} s (RSS {_mb(plan['parent_rss']).strip()}), "
                      f"{array} slices {sum(s['wall'] for s in slices):.1f} s in all, merge {m['wall']:.1f} s of which"
                      f" serial {m_serial:.1f} s = {m_serial / n * 1e6:.1f} us/row; merge peak RSS"
                      f" {_mb(m['parent_rss']).strip()}, largest worker {_mb(m['worker_rss']).strip()}", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if len(rows) > 1:
        (n0, r0), (n1, r1) = rows[0], rows[-1]
        growth = (r1["parent_rss"] - r0["parent_rss"]) / (n1 - n0)
        print(f"  parent peak RSS grows {growth:.0f} bytes/row between n={n0:,} and n={n1:,} (target <= 1024)")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(*json.loads(sys.argv[2]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grouping", type=int, nargs="*", default=[], metavar="N", help="hash counts to group")
    ap.add_argument("--rounds", type=int, default=3, help="grouping: rounds alternating the sizes (median kept)")
    ap.add_argument("--parts", type=int, nargs="*", default=[], metavar="K",
                    help="grouping: also time the photos-like set with k forced to each K (the cost of more keys)")
    ap.add_argument("--build", type=int, nargs="*", default=[], metavar="N", help="image counts to build")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--array", type=int, default=0, metavar="K", help="also time plan -> K slices -> merge")
    ap.add_argument("--tmp", type=Path,
                    help="folder for the generated images and outputs, removed after each size (default: system temp)")
    args = ap.parse_args()
    print(machine_line())
    print(load_line())
    if args.grouping:
        bench_grouping(sorted(args.grouping), args.rounds, args.parts)
    if args.build:
        bench_build(sorted(args.build), args.workers, args.array, args.tmp)
    print(load_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
