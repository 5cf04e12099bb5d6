"""Checkpoints: atomic save (temp file + rename), keep the last K, load with `torch.load(weights_only=True)`.

A checkpoint is self-contained: besides the training state it carries the config, the class names and the
normalisation stats, so `predict` can classify an image from the file alone.
"""
from __future__ import annotations

import glob
import os
import shutil

import torch

from shard_tools.errors import CheckpointError, one_line
from shard_tools.fileio import atomic_write

LATEST, BEST = "latest.pt", "best.pt"


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def save_atomic(state: dict, path: str) -> None:
    with atomic_write(path) as f:  # readers see the old file or the whole new one, never half of one
        torch.save(state, f)


def save(state: dict, run_dir: str, step: int, keep: int, best: bool = False) -> str:
    """Write step-N.pt, point latest.pt at the same state, drop step files beyond the last `keep`."""
    folder = checkpoint_dir(run_dir)
    os.makedirs(folder, exist_ok=True)
    step_path = os.path.join(folder, f"step-{step:08d}.pt")
    save_atomic(state, step_path)
    latest = os.path.join(folder, LATEST)
    tmp = latest + ".link"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(step_path, tmp)  # a hard link: latest.pt costs no extra disk and is replaced atomically
    except OSError:  # file systems without hard links
        shutil.copyfile(step_path, tmp)
    os.replace(tmp, latest)
    if best:
        save_best(state, run_dir)
    for old in sorted(glob.glob(os.path.join(folder, "step-*.pt")))[:-keep or None]:
        os.remove(old)
    return latest


def save_best(state: dict, run_dir: str) -> None:
    folder = checkpoint_dir(run_dir)
    os.makedirs(folder, exist_ok=True)
    save_atomic(state, os.path.join(folder, BEST))


def load(path: str, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as e:  # a truncated or foreign file: say which and why, in one line (torch's run to ten)
        raise CheckpointError(f"cannot load checkpoint {path} (not a complete PyTorch weights file?): "
                              f"{type(e).__name__}: {one_line(e, limit=200)}") from None


def latest_path(run_dir: str) -> str | None:
    path = os.path.join(checkpoint_dir(run_dir), LATEST)
    return path if os.path.exists(path) else None


def load_latest(run_dir: str) -> dict | None:
    """The run's newest checkpoint, or None for a run that has not saved one yet."""
    path = latest_path(run_dir)
    return load(path) if path else None


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def inference_weights(state: dict) -> dict:
    """The weights to classify with: the EMA's when the run kept one, else the trained model's."""
    if state.get("ema"):
        prefix = "module."
        return {k[len(prefix):]: v for k, v in state["ema"].items() if k.startswith(prefix)}
    return state["model"]


def model_from_checkpoint(state: dict, device: torch.device):
    """Rebuild the model a checkpoint was trained with, in eval mode, plus what inference needs to know."""
    from distributed_train.model import build_model

    meta = state["meta"]
    model = build_model(meta["arch"], len(meta["classes"]), width=meta["width"])
    model.load_state_dict(inference_weights(state))
    return model.to(device).eval(), meta
