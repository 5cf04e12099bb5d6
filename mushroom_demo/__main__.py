"""The whole job on built-in, generated (licence-free) mushroom pictures, through the same commands a user types:

    generate images + CSV -> python -m shard_tools build -> torchrun -m distributed_train -> evaluate -> predict

    python -m mushroom_demo --out demo_out [--per-class 150] [--epochs 15]

It trains with torchrun on every GPU, or on 2 CPU processes when there is none.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from mushroom_demo.painter import generate_demo_dataset
from shard_tools.cli import run_main
from shard_tools.errors import Error


class StepFailed(Error):
    """A command of the demo failed; its own error is printed above."""


# The recipe, also in recipes/demo.yaml (with the default --epochs and --wandb below); a test keeps the two equal.
TRAIN_FLAGS = ["--arch", "resnet26", "--width", "0.25", "--image-size", "64", "--batch-size", "32", "--lr", "0.2",
               "--ema-decay", "0.99", "--workers", "1", "--log-every", "10", "--eval-every", "5"]


def run(cmd: list[str], capture: bool = False) -> str:
    print("\n$ " + shlex.join(cmd), flush=True)
    result = subprocess.run(cmd, text=True, stdout=subprocess.PIPE if capture else None)
    if result.returncode != 0:
        raise StepFailed(f"the command above failed with exit code {result.returncode}")
    return result.stdout or ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mushroom_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="folder for the data, shards and run (replaced)")
    p.add_argument("--per-class", type=int, default=150, help="generated images per class")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled"])
    args = p.parse_args(argv)
    return run_main("demo", lambda: demo(args))


def demo(args) -> int:
    start = time.time()
    out = Path(args.out)
    data, shards, run_dir = out / "data", out / "shards", out / "run"
    for folder in (data, run_dir):  # a fresh demo every time (an existing run dir would be resumed)
        shutil.rmtree(folder, ignore_errors=True)
    py = sys.executable

    print(f"1/5 generating {args.per_class} pictures per class in {data} ...", flush=True)
    labels = generate_demo_dataset(data, per_class=args.per_class, size=160, seed=0, workers=2)

    print("2/5 sharding", flush=True)
    run([py, "-m", "shard_tools", "build", "--images", str(data / "images"), "--labels", str(labels),
         "--out", str(shards), "--size", "96", "--val-fraction", "0.2", "--shard-size", "200", "--workers", "2",
         "--overwrite"])

    gpus = torch.cuda.device_count()
    nproc = gpus or 2
    print(f"\n3/5 training on {nproc} {'GPU' if gpus else 'CPU process'}{'es' if nproc > 1 and not gpus else ''}"
          f"{'s' if nproc > 1 and gpus else ''}", flush=True)
    run([py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "distributed_train",
         "--data", str(shards), "--run-dir", str(run_dir), *TRAIN_FLAGS, "--epochs", str(args.epochs),
         "--wandb", args.wandb])

    best = run_dir / "checkpoints" / "best.pt"
    print("\n4/5 evaluating the best checkpoint on the validation split", flush=True)
    report = json.loads(run([py, "-m", "distributed_train.evaluate", "--checkpoint", str(best), "--data",
                             str(shards), "--json", "--confusion-png", str(run_dir / "confusion_matrix.png")],
                            capture=True))

    print("\n5/5 classifying new pictures the model has never seen", flush=True)
    fresh = generate_demo_dataset(out / "new_pictures", per_class=2, size=160, seed=12345)
    new_images = sorted(str(path) for path in (fresh.parent / "images").glob("*.jpg"))
    truth = dict(line.split(",") for line in fresh.read_text().splitlines()[1:])
    predictions = run([py, "-m", "distributed_train.predict", "--checkpoint", str(best), *new_images, "--json"],
                      capture=True)
    hits = 0
    for line in predictions.splitlines():
        pred = json.loads(line)
        image_id = Path(pred["image"]).stem
        top = pred["predictions"][0]
        hits += top["class"] == truth[image_id]
        print(f"  {Path(pred['image']).name}: {top['class']} ({top['probability']:.0%})  true: {truth[image_id]}")

    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    majority = max(map(sum, report["confusion"])) / report["count"]
    classes = json.loads((shards / "manifest.json").read_text())["classes"]
    print(f"""
summary ({time.time() - start:.0f} s)
  validation top-1  {report['top1']:.1%} on {report['count']} images (majority class: {majority:.0%})
  new pictures      {hits}/{len(new_images)} right
  per class         {', '.join(f'{name} {acc:.0%}' for name, acc in zip(classes, report['per_class_accuracy']))}
  checkpoint        {best}
  metrics           {run_dir / 'metrics.jsonl'} (training curves: {run_dir / 'training_curves.png'})
  confusion matrix  {run_dir / 'confusion_matrix.png'}
  W&B offline run   {wandb_runs[-1] if wandb_runs else 'disabled'}  (upload: wandb sync <that folder>)""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
