"""Validation that counts every sample exactly once across ranks: top-1, top-5, loss, per-class accuracy, confusion.

Each rank sums over its own samples (no collectives inside the loop, so ranks with fewer batches never block),
then the sums are all-reduced once.

    python -m distributed_train.evaluate --checkpoint RUN/checkpoints/best.pt --data SHARDS [--split val] [--tta flip]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
import torch.nn.functional as F

from distributed_train import dist
from distributed_train.config import int_at_least
from distributed_train.data import EVAL_RESIZE_RATIO, eval_loader, normalize, stats_tensors
from shard_tools.cli import run_main
from shard_tools.errors import UsageError
from shard_tools.manifest import Manifest


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, num_classes: int, device: torch.device, mean: torch.Tensor,
             std: torch.Tensor, autocast=contextlib.nullcontext, memory_format=torch.contiguous_format,
             tta: str = "none") -> dict:
    """`tta` "flip": each image's logits averaged with its mirror image's (test-time augmentation)."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-5 hits, count
    for images, labels, _ in loader:
        images = normalize(images.to(device, non_blocking=True), mean, std).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with autocast():
            logits = model(images).float()
            if tta == "flip":
                logits = (logits + model(images.flip(-1)).float()) / 2
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        k = min(5, num_classes)
        sums[1] += (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()
        sums[2] += labels.numel()
        confusion.view(-1).index_add_(0, labels * num_classes + logits.argmax(dim=1),
                                      torch.ones_like(labels, dtype=torch.float64))
    dist.all_reduce_sum(sums)
    dist.all_reduce_sum(confusion)
    model.train(was_training)
    return summarize(confusion.cpu().long(), sums[0].item(), sums[1].item())


def summarize(confusion: torch.Tensor, loss_sum: float, top5_hits: float) -> dict:
    count = int(confusion.sum())
    per_class_total = confusion.sum(dim=1)
    correct = confusion.diagonal()
    per_class = [(c / t).item() if t > 0 else None for c, t in zip(correct, per_class_total)]
    present = [a for a in per_class if a is not None]
    return {
        "count": count,
        "loss": loss_sum / max(count, 1),
        "top1": correct.sum().item() / max(count, 1),
        "top5": top5_hits / max(count, 1),
        # every class counts the same, however few its samples: what a long-tailed dataset needs to be judged by
        "balanced_accuracy": sum(present) / max(len(present), 1),
        "macro_f1": macro_f1(confusion),
        "per_class_accuracy": per_class,
        "confusion": confusion.tolist(),
    }


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean F1 over the classes that occur as a label or a prediction (scikit-learn's f1_score(average="macro"))."""
    tp = confusion.diagonal().double()
    labelled, predicted = confusion.sum(dim=1).double(), confusion.sum(dim=0).double()
    occurs = (labelled + predicted) > 0
    f1 = 2 * tp[occurs] / (labelled[occurs] + predicted[occurs])
    return f1.mean().item() if occurs.any() else 0.0


def format_report(result: dict, class_names: list[str]) -> str:
    lines = [f"samples {result['count']}  top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  "
             f"balanced accuracy {result['balanced_accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}  "
             f"loss {result['loss']:.4f}", "per-class accuracy:"]
    totals = [sum(row) for row in result["confusion"]]
    for name, acc, n in zip(class_names, result["per_class_accuracy"], totals):
        lines.append(f"  {name:<30} {'n/a' if acc is None else f'{acc:.4f}'}  ({n} samples)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m distributed_train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="dataset folder or URL holding manifest.json")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int_at_least(1), default=64)
    p.add_argument("--workers", type=int_at_least(0), default=2)
    p.add_argument("--tta", choices=("none", "flip"), default="none",
                   help="test-time augmentation: flip averages each image's logits with its mirror image's")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--confusion-png", default="", help="also write the confusion matrix as a PNG here")
    args = p.parse_args(argv)
    return run_main("evaluate", lambda: run(args))


def run(args) -> int:
    ctx = dist.setup()
    try:
        result, classes = evaluate_checkpoint(args.checkpoint, args.data, args.split, ctx, args.batch_size,
                                              args.workers, args.tta)
    except dist.UNTYPED as e:
        raise dist.job_error(e, ctx.rank) or e
    finally:
        dist.teardown()
    if ctx.is_main:
        if args.confusion_png:
            from distributed_train.plots import plot_confusion_matrix

            plot_confusion_matrix(result["confusion"], classes, args.confusion_png)
        print(json.dumps({"split": args.split, "classes": classes, **result}) if args.json
              else format_report(result, classes))
    return 0


def evaluate_checkpoint(path: str, data: str, split: str, ctx: dist.DistContext, batch_size: int,
                        workers: int, tta: str = "none") -> tuple[dict, list[str]]:
    """Evaluate a checkpoint's inference weights on one split of a dataset, every sample once across the ranks."""
    from distributed_train.checkpoint import load, model_from_checkpoint

    model, info = model_from_checkpoint(load(path), ctx.device)
    manifest = Manifest.read(data)
    manifest.split(split)  # a split the dataset lacks is named here, not deep in the loader
    if manifest.classes != info["classes"]:
        raise UsageError(f"the checkpoint was trained on classes {info['classes']} but {data} has {manifest.classes}")
    mean, std = stats_tensors(info["mean"], info["std"], ctx.device)  # the stats the model was trained with
    loader = eval_loader(manifest, split, rank=ctx.rank, world_size=ctx.world_size, batch_size=batch_size,
                         image_size=info["image_size"], workers=workers,
                         crop_pct=info.get("crop_pct", EVAL_RESIZE_RATIO))  # older checkpoints: the fixed 0.875
    return evaluate(model, loader, manifest.num_classes, ctx.device, mean, std, tta=tta), manifest.classes


if __name__ == "__main__":
    sys.exit(main())
