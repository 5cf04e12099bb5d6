"""Classify image files with a checkpoint, using the checkpoint's own classes and preprocessing.

    python -m distributed_train.predict --checkpoint RUN/checkpoints/best.pt IMG [IMG ...] [--top-k 3] [--json]
                                        [--tta flip]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from torchvision.io import ImageReadMode, decode_image

from distributed_train.checkpoint import load, model_from_checkpoint
from distributed_train.config import int_at_least
from distributed_train.data import EVAL_RESIZE_RATIO, Preprocess, normalize, stats_tensors
from shard_tools.cli import run_main
from shard_tools.errors import one_line


class Classifier:
    def __init__(self, checkpoint_path: str, device: str = "cpu", tta: str = "none"):
        self.device, self.tta = torch.device(device), tta
        self.model, meta = model_from_checkpoint(load(checkpoint_path), self.device)
        self.classes = meta["classes"]
        self.preprocess = Preprocess(train=False, image_size=meta["image_size"],
                                     crop_pct=meta.get("crop_pct", EVAL_RESIZE_RATIO))  # older checkpoints: 0.875
        self.mean, self.std = stats_tensors(meta["mean"], meta["std"], self.device)

    def load_image(self, path: str) -> torch.Tensor:
        """Decoded, resized and centre-cropped uint8 image; ValueError with the reason for a file that is no image."""
        try:
            with open(path, "rb") as f:
                data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
            image = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except OSError as e:
            raise ValueError(f"cannot read: {e.strerror or e}") from None
        except RuntimeError as e:
            raise ValueError(f"not a readable image ({one_line(e)})") from None
        return self.preprocess.transform(image)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, top_k: int = 3) -> list[list[tuple[str, float]]]:
        x = normalize(images.to(self.device), self.mean, self.std)
        logits = self.model(x).float()
        if self.tta == "flip":  # as evaluate --tta flip: the logits averaged with the mirror image's
            logits = (logits + self.model(x.flip(-1)).float()) / 2
        probs = logits.softmax(dim=1)
        values, indices = probs.topk(min(top_k, len(self.classes)), dim=1)
        return [[(self.classes[i], p) for i, p in zip(row_i.tolist(), row_p.tolist())]
                for row_i, row_p in zip(indices, values)]


def device_name(text: str) -> torch.device:
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, ...)") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m distributed_train.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+", metavar="IMG")
    p.add_argument("--top-k", type=int_at_least(1), default=3)
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--tta", choices=("none", "flip"), default="none",
                   help="test-time augmentation: flip averages each image's logits with its mirror image's")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    return run_main("predict", lambda: classify_files(args))


def classify_files(args) -> int:
    classifier = Classifier(args.checkpoint, args.device, args.tta)
    failed = 0
    for path in args.images:
        try:
            image = classifier.load_image(path)
        except ValueError as e:
            failed += 1
            print(f"{path}: error: {e}", file=sys.stderr)
            continue
        top = classifier(image[None], args.top_k)[0]
        if args.json:
            print(json.dumps({"image": path, "predictions": [{"class": c, "probability": p} for c, p in top]}))
        else:
            print(f"{path}: " + ", ".join(f"{c} {p:.1%}" for c, p in top))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
