"""Forward+backward images/s of our ResNet vs torchvision's, measured side by side in one process.

    python benchmarks/bench_model.py                                   # CPU, resnet50, batch 16 at 128 px, fp32
    python benchmarks/bench_model.py --device cuda --batch-size 256 --image-size 224 --channels-last --amp
    python benchmarks/bench_model.py --formats --arch resnet26 --width 0.25 --image-size 80 --batch-size 64 --threads 1

--formats compares our model with itself in three formats instead: fp32 contiguous, fp32 channels_last and bf16
autocast + channels_last (ratios to fp32 contiguous; any --arch and --width, torchvision has neither resnet26 nor
widths).

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
    p.add_argument("--arch", default="resnet50", choices=["resnet26", "resnet50", "resnet101", "resnet152"])
    p.add_argument("--width", type=float, default=1.0, help="width multiplier (with --formats)")
    p.add_argument("--formats", action="store_true",
                   help="our model in fp32, fp32 + channels_last and bf16 + channels_last, not vs torchvision")
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


class Contender:
    def __init__(self, model: torch.nn.Module, channels_last: bool, amp: bool):
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model, self.amp = model.to(memory_format=self.memory_format).train(), amp
        self.rates: list[float] = []

    def steps(self, images, labels, steps: int) -> None:
        images = images.contiguous(memory_format=self.memory_format)
        for _ in range(steps):
            self.model.zero_grad(set_to_none=True)
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss = F.cross_entropy(self.model(images), labels)
            loss.backward()

    def timed_round(self, images, labels, steps: int) -> None:
        """Images/s of one round of `steps` forward+backward steps."""
        sync = torch.cuda.synchronize if images.device.type == "cuda" else lambda: None
        sync()
        start = time.perf_counter()
        self.steps(images, labels, steps)
        sync()  # CUDA kernels are asynchronous: stop the clock only when they are done
        self.rates.append(steps * images.shape[0] / (time.perf_counter() - start))


def contenders(args, device) -> dict[str, Contender]:
    """name -> contender; the first is the reference the others are divided by."""
    torch.manual_seed(0)
    if args.formats:
        def ours():
            return build_model(args.arch, num_classes=1000, width=args.width).to(device)
        return {"fp32": Contender(ours(), False, False), "fp32 + channels_last": Contender(ours(), True, False),
                "bf16 + channels_last": Contender(ours(), True, True)}
    if args.arch == "resnet26" or args.width != 1.0:
        raise SystemExit("bench_model: torchvision has no resnet26 and no widths; add --formats")
    return {"torchvision": Contender(getattr(torchvision.models, args.arch)().to(device), args.channels_last, args.amp),
            "ours": Contender(build_model(args.arch, num_classes=1000).to(device), args.channels_last, args.amp)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = contenders(args, device)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)

    what = "formats of ours" if args.formats else ("bf16 autocast" if args.amp else "fp32") + ", " + \
        ("channels_last" if args.channels_last else "contiguous")
    print(
        f"{args.arch} x{args.width} fwd+bwd, batch {args.batch_size} at {args.image_size}px, device {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, {what}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.rounds} alternating rounds"
    )
    for contender in models.values():
        contender.steps(images, labels, args.warmup)
    for round_index in range(args.rounds):
        order = list(models) if round_index % 2 == 0 else list(reversed(models))  # no model always goes first
        for name in order:
            models[name].timed_round(images, labels, args.steps)

    reference_name, reference = next(iter(models.items()))
    for name, contender in models.items():
        rounds_text = ", ".join(f"{r:.1f}" for r in contender.rates)
        print(f"{name:22s} median {statistics.median(contender.rates):6.1f}  best {max(contender.rates):6.1f} img/s"
              f"   rounds: {rounds_text}")
    for name, contender in list(models.items())[1:]:
        paired = statistics.median(a / b for a, b in zip(contender.rates, reference.rates))
        ratio_of_medians = statistics.median(contender.rates) / statistics.median(reference.rates)
        # Best rounds are the least disturbed ones (timeit's reasoning), when the machine had a quiet moment.
        ratio_of_best = max(contender.rates) / max(reference.rates)
        verdict = "" if args.formats else \
            f" ({'meets' if paired >= TARGET_RATIO else 'BELOW'} target >= {TARGET_RATIO})"
        print(f"{name} / {reference_name} = {paired:.3f} median of per-round ratios{verdict}; ratio of medians "
              f"{ratio_of_medians:.3f}, of best rounds {ratio_of_best:.3f}")


if __name__ == "__main__":
    main()
