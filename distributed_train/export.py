"""Export a checkpoint for serving without this package: ONNX (onnxruntime and other runtimes) or TorchScript
(libtorch).

    python -m distributed_train.export --checkpoint RUN/checkpoints/best.pt --format onnx --out model.onnx

The exported model takes `images`, float32 NCHW RGB on the 0-1 scale, resized (shorter side to the `resize` metadata)
and centre-cropped to `image_size`, any batch size, and returns `logits`. The training set's mean/std normalisation
is inside the graph. The EMA weights are exported when the run kept them (what `predict` and `evaluate` use).
Metadata (ONNX metadata_props; TorchScript extra files of the same names): `classes` (a JSON list, index order),
`image_size`, `resize`, `arch`, `ema`.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
import tempfile
import warnings

import torch
from torch import nn

from distributed_train.checkpoint import load, model_from_checkpoint
from distributed_train.data import EVAL_RESIZE_RATIO
from shard_tools.cli import run_main
from shard_tools.errors import CheckpointError, UsageError
from shard_tools.fileio import atomic_path

FORMATS = ("onnx", "torchscript")


class Normalized(nn.Module):
    """The classifier with the normalisation folded in: 0-1 RGB in, logits out (the trainer's `normalize`, then the
    model)."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def servable(state: dict) -> tuple[Normalized, dict[str, str]]:
    """The model to export (eval mode, CPU) and its metadata, from a loaded checkpoint."""
    model, meta = model_from_checkpoint(state, torch.device("cpu"))
    size = meta["image_size"]
    metadata = {
        "classes": json.dumps(meta["classes"]),
        "image_size": str(size),
        # the shorter side before the centre crop, as evaluate does (older checkpoints: the fixed 0.875)
        "resize": str(round(size / meta.get("crop_pct", EVAL_RESIZE_RATIO))),
        "arch": f"{meta['arch']} x{meta['width']}",
        "ema": "true" if state.get("ema") else "false",
    }
    return Normalized(model, meta["mean"], meta["std"]).eval(), metadata


def export_onnx(module: nn.Module, example: torch.Tensor, path: str, metadata: dict[str, str]) -> None:
    # The torch.export-based exporter (the default since torch 2.9; it needs onnxscript): the TorchScript-based one
    # is deprecated. A dynamic batch dimension needs an example batch of at least 2 (1 would be specialised).
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines are not ours to print
        program = torch.onnx.export(module, (example,), input_names=["images"], output_names=["logits"],
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, dynamo=True)
    program.model.metadata_props.update(metadata)
    program.save(path, external_data=False)


def export_torchscript(module: nn.Module, example: torch.Tensor, path: str, metadata: dict[str, str]) -> None:
    # Traced: the network has no data-dependent control flow, and tracing needs no TorchScript annotations. No
    # check_trace: it traces twice more to compare graphs, many times the cost of the trace itself.
    with warnings.catch_warnings():  # PyTorch deprecates TorchScript: --format's help says so, not three warnings
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, path, _extra_files=metadata)


def export(state: dict, fmt: str, out: str) -> dict[str, str]:
    """Write the exported model to `out` (atomically: a temp file renamed into place); returns its metadata."""
    module, metadata = servable(state)
    size = int(metadata["image_size"])
    example = torch.rand(2, 3, size, size)
    with atomic_path(out) as tmp:
        (export_onnx if fmt == "onnx" else export_torchscript)(module, example, tmp, metadata)
    return metadata


def unwritable(path: str) -> str | None:
    """Why `path` cannot be written, found before the export rather than after it; None if it can."""
    if os.path.isdir(path):
        return "it is a folder"
    try:
        with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(path))):
            return None
    except OSError as e:
        return e.strerror or str(e)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m distributed_train.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint of this trainer (RUN/checkpoints/best.pt)")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx, or torchscript for libtorch (C++) users: PyTorch deprecates TorchScript")
    p.add_argument("--out", required=True, help="file to write (model.onnx, model.pt)")
    args = p.parse_args(argv)
    return run_main("export", lambda: export_file(args))


def export_file(args) -> int:
    if args.format == "onnx":
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(f"--format onnx needs {' and '.join(missing)}: pip install 'mushroom-ddp[export]'")
    state = load(args.checkpoint)  # a missing or unreadable file is a CheckpointError naming it
    if not isinstance(state, dict) or not isinstance(state.get("meta"), dict) or "model" not in state:
        raise CheckpointError(f"{args.checkpoint} is not a checkpoint of this trainer (no model and meta entries): "
                              "export RUN/checkpoints/best.pt or latest.pt")
    problem = unwritable(args.out)
    if problem:
        raise UsageError(f"cannot write --out {args.out}: {problem}")
    metadata = export(state, args.format, args.out)
    print(f"wrote {args.out} ({args.format}; {metadata['arch']}, {'EMA' if metadata['ema'] == 'true' else 'trained'} "
          f"weights; input images float32 [N, 3, {metadata['image_size']}, {metadata['image_size']}] RGB 0-1 after "
          f"resize {metadata['resize']} + centre crop; classes {', '.join(json.loads(metadata['classes']))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
