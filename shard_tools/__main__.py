"""Command line: `python -m shard_tools build|verify|info|plan|merge ...` (also installed as `shard-tools`).

    build   --images DIR --labels CSV --out DIR [...]   images + CSV -> shards + manifest.json, in one command
    verify  OUT                                          re-read every shard against the manifest
    info    OUT                                          classes, counts, shards, mean/std
    upload  OUT DEST [--overwrite]                       copy a built dataset to s3://... (manifest.json last)
  for a SLURM job array (see slurm/shard.sbatch); the result equals a one-process `build`:
    plan    --images DIR --labels CSV --out DIR [...]   check the CSV, list the work in OUT/_plan (no image opened)
    build   --plan OUT/_plan --slice K/N [--workers W]   array task K of N: decode/resize/encode its share of images
    merge   OUT [--workers W]                            after all tasks: split, write the shards, manifest.json
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from shard_tools.cli import run_main
from shard_tools.images import DEFAULT_MAX_PIXELS
from shard_tools.manifest import Manifest
from shard_tools.plan import BuildError, BuildSettings
from shard_tools.split import DEFAULT_MAX_DISTANCE
from shard_tools.redaction import redact
from shard_tools.transport import is_url

EXIT_PROBLEMS = 1  # the command ran but found problems (--strict skips, verify failures)


def _add_settings_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--images", required=required, help="folder holding the images (ids resolve inside it)")
    p.add_argument("--labels", required=required, help="CSV: image id, label (first two columns unless named)")
    p.add_argument("--out", required=required, help="output folder for shards and manifest.json")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of each class for validation (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the sample order (default 0)")
    p.add_argument("--size", type=int, default=256, help="shorter side of stored images at most this (default 256)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard at most (default 1000)")
    p.add_argument("--id-column", help="name of the id column (default: the first)")
    p.add_argument("--label-column", help="name of the label column (default: the second)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"skip images with more pixels than this (decompression bombs; default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--dup-distance", type=int, default=DEFAULT_MAX_DISTANCE,
                   help=f"max perceptual-hash bit distance of near-duplicates (default {DEFAULT_MAX_DISTANCE})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder's dataset")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shard_tools", description="Images + labels CSV -> WebDataset shards.")
    sub = ap.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="build shards and manifest.json (or one slice of a plan)")
    _add_settings_args(build, required=False)
    build.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    build.add_argument("--strict", action="store_true", help="exit non-zero if any row was skipped")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.add_argument("--plan", help="SLURM mode: the OUT/_plan folder made by `plan`")
    build.add_argument("--slice", help="SLURM mode: K/N, write only the shards of slice K (0-based) of N")

    plan = sub.add_parser("plan", help="SLURM, before the array: check the CSV, write the work list to OUT/_plan")
    _add_settings_args(plan, required=True)

    merge = sub.add_parser("merge", help="SLURM, after the array: split, write shards and manifest.json")
    merge.add_argument("out")
    merge.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    merge.add_argument("--strict", action="store_true", help="exit non-zero if any row was skipped")
    merge.add_argument("--no-progress", action="store_true", help="no progress bars")

    verify = sub.add_parser("verify", help="check every shard against the manifest")
    verify.add_argument("out")
    info = sub.add_parser("info", help="print the manifest summary")
    info.add_argument("out")
    upload = sub.add_parser("upload", help="copy a built dataset to s3://bucket/prefix or a folder, manifest last")
    upload.add_argument("out")
    upload.add_argument("dest", help="s3://bucket/prefix (endpoint and credentials from AWS_* variables) or a folder")
    upload.add_argument("--overwrite", action="store_true", help="replace a dataset already at DEST")
    return ap


def _settings(args) -> BuildSettings:
    return BuildSettings(args.images, args.labels, args.val_fraction, args.seed, args.size, args.quality,
                         args.shard_size, args.max_pixels, args.id_column, args.label_column, args.dup_distance)


def _report(manifest: Manifest, out: str, strict: bool) -> int:
    src = manifest.source
    counts = ", ".join(f"{name} {s.num_samples} in {len(s.shards)} shards" for name, s in manifest.splits.items())
    print(f"{out}: {counts}; {manifest.duplicate_groups} near-duplicate groups")
    print(f"written {src['written']} + skipped {src['skipped']} = {src['rows']} rows"
          + (f" (reasons in {os.path.join(out, 'skipped.csv')})" if src["skipped"] else ""))
    if strict and src["skipped"]:
        print(f"error: --strict and {src['skipped']} rows were skipped", file=sys.stderr)
        return EXIT_PROBLEMS
    return 0


def run(args) -> int:
    from shard_tools import build

    if args.command == "build" and args.plan:
        if not args.slice:
            raise BuildError("--plan needs --slice K/N (or run `merge` after all slices)")
        k, n = build.parse_slice(args.slice)
        done = build.write_slice(args.plan, k, n, workers=args.workers, progress=not args.no_progress)
        print(f"slice {k}/{n}: encoded {done} chunks")
        return 0
    if args.command == "build":
        missing = [f"--{a}" for a in ("images", "labels", "out") if getattr(args, a) is None]
        if missing:
            raise BuildError(f"build needs {', '.join(missing)} (or --plan and --slice)")
        if is_url(args.out):
            return build_and_upload(args)
        m = build.build(_settings(args), args.out, workers=args.workers, overwrite=args.overwrite,
                        progress=not args.no_progress)
        return _report(m, args.out, args.strict)
    if args.command == "plan":
        work = build.plan_dataset(_settings(args), args.out, overwrite=args.overwrite)
        print(f"planned {len(work.rows)} images in {work.num_chunks} chunks ({len(work.skipped)} rows skipped so "
              f"far); now run `build --plan {work.folder} --slice K/N` for K = 0..N-1, then `merge {args.out}`")
        return 0
    if args.command == "merge":
        m = build.merge(args.out, workers=args.workers, progress=not args.no_progress)
        return _report(m, args.out, args.strict)
    if args.command == "verify":
        from shard_tools.verify import verify_dataset

        problems = verify_dataset(args.out)
        for p in problems:
            print(p)
        print(f"{args.out}: {'OK' if not problems else f'{len(problems)} problems'}")
        return EXIT_PROBLEMS if problems else 0
    if args.command == "info":
        from shard_tools.info import describe

        print(describe(Manifest.read(args.out)))
        return 0
    if args.command == "upload":
        return upload(args)
    raise AssertionError(args.command)


def upload(args) -> int:
    from shard_tools import upload

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    upload.log.setLevel(logging.INFO)  # our "uploaded NAME" lines, not botocore's chatter
    order = upload.upload_dataset(args.out, args.dest, overwrite=args.overwrite)
    print(f"uploaded {len(order)} files to {redact(args.dest)} (manifest.json last)")
    return 0


def build_and_upload(args) -> int:
    """`build --out s3://...`: build in a local temporary folder ($TMPDIR), then upload it, manifest.json last,
    so readers of the bucket never see a half-written dataset."""
    import tempfile

    from shard_tools import build
    from shard_tools.upload import upload_dataset

    with tempfile.TemporaryDirectory(prefix="shard_tools-") as local:
        m = build.build(_settings(args), local, workers=args.workers, overwrite=True, progress=not args.no_progress)
        code = _report(m, local, args.strict)
        upload_dataset(local, args.out, overwrite=args.overwrite)
        print(f"uploaded to {redact(args.out)}")
        return code


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_main("shard_tools", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
