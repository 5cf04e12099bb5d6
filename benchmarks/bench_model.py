"""Forward+backward images/s of our ResNet vs torchvision's, measured side by side in one process.

    python benchmarks/bench_model.py                                   # CPU, resnet50, batch 16 at 128 px, fp32
    python benchmarks/bench_model.py --device cuda --batch-size 256 --image-size 224 --channels-last --amp

Rounds alternate between the two models (ABBA order), so load from other processes on a shared machine hits both
alike. The headline is the median over rounds of the ratio ours/torchvision within a round: pairing neighbours in time
cancels slow drifts in machine load that a ratio of two medians would keep (the ratio of the best rounds is printed
too). Target: ours >= 0.97x torchvision.
"""

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

from distributed_train.model import build_model

TARGET_RATIO = 0.97


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet101", "resnet152"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per model")
    p.add_argument("--steps", type=int, default=1, help="forward+backward steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU intra-op threads")
    return p.parse_args()


def train_steps(model, images, labels, steps: int, args) -> None:
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()


def timed_round(model, images, labels, args) -> float:
    """Images/s of one round of ``args.steps`` forward+backward steps."""
    sync = torch.cuda.synchronize if images.device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    train_steps(model, images, labels, args.steps, args)
    sync()  # CUDA kernels are asynchronous: stop the clock only when they are done
    return args.steps * images.shape[0] / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    models = {
        "ours": build_model(args.arch, num_classes=1000),
        "torchvision": getattr(torchvision.models, args.arch)(),
    }
    for model in models.values():
        model.to(device, memory_format=memory_format).train()
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)

    print(
        f"{args.arch} fwd+bwd, batch {args.batch_size} at {args.image_size}px, device {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"{'bf16 autocast' if args.amp else 'fp32'}, {'channels_last' if args.channels_last else 'contiguous'}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    for model in models.values():
        train_steps(model, images, labels, args.warmup, args)

    throughput = {name: [] for name in models}
    for round_index in range(args.rounds):
        order = list(models) if round_index % 2 == 0 else list(reversed(models))  # ABBA: no model always goes first
        for name in order:
            throughput[name].append(timed_round(models[name], images, labels, args))

    for name, rounds in throughput.items():
        rounds_text = ", ".join(f"{r:.1f}" for r in rounds)
        median, best = statistics.median(rounds), max(rounds)
        print(f"{name:12s} median {median:6.1f}  best {best:6.1f} img/s   rounds: {rounds_text}")
    ratio_of_medians = statistics.median(throughput["ours"]) / statistics.median(throughput["torchvision"])
    paired = [ours / reference for ours, reference in zip(throughput["ours"], throughput["torchvision"])]
    ratio = statistics.median(paired)
    verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"
    # Best rounds are the least disturbed ones (timeit's reasoning), when the machine had a quiet moment.
    ratio_of_best = max(throughput["ours"]) / max(throughput["torchvision"])
    print(f"ours / torchvision = {ratio:.3f} median of per-round ratios ({verdict} target >= {TARGET_RATIO}); "
          f"ratio of medians {ratio_of_medians:.3f}, of best rounds {ratio_of_best:.3f}")


if __name__ == "__main__":
    main()
