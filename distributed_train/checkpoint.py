"""Checkpoints: atomic save (temp file + rename), keep the last K, load with `torch.load(weights_only=True)`.

A checkpoint is self-contained: besides the training state it carries the config, the class names and the
normalisation stats, so `predict` can classify an image from the file alone.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil

import torch

from shard_tools.errors import CheckpointError, Error, one_line
from shard_tools.fileio import atomic_write

LATEST, BEST = "latest.pt", "best.pt"


class SaveError(Error):
    """A checkpoint could not be written (a full disk, a quota, an I/O error). The checkpoints saved before are
    intact and no temporary file is left behind; the run stops rather than train on without a way back."""

    exit_code = 5


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def save_atomic(state: dict, path: str) -> None:
    with atomic_write(path) as f:  # readers see the old file or the whole new one, never half of one
        torch.save(state, f)


def save(state: dict, run_dir: str, step: int, keep: int, best: bool = False) -> str:
    """Write step-N.pt, point latest.pt at the same state, drop step files beyond the last `keep`. Any failure is a
    SaveError naming the step, the folder, the reason and what latest.pt still holds."""
    try:
        return _save(state, run_dir, step, keep, best)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError caused by the OSError
        cause = next((c for c in _causes(e) if isinstance(c, OSError)), e)
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else one_line(cause)
        held = latest_step(run_dir)
        still = f"latest.pt still holds step {held}" if held is not None else "no checkpoint was saved before"
        raise SaveError(f"cannot save checkpoint step {step} to {checkpoint_dir(run_dir)}: {reason}; {still}") \
            from None


def _causes(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _save(state: dict, run_dir: str, step: int, keep: int, best: bool) -> str:
    folder = checkpoint_dir(run_dir)
    os.makedirs(folder, exist_ok=True)
    step_path = os.path.join(folder, f"step-{step:08d}.pt")
    save_atomic(state, step_path)
    latest = os.path.join(folder, LATEST)
    point_at(step_path, latest)
    if best:
        save_best(state, run_dir)
    for old in sorted(glob.glob(os.path.join(folder, "step-*.pt")))[:-keep or None]:
        os.remove(old)
    return latest


def point_at(step_path: str, latest: str) -> None:
    """Replace `latest` atomically by a hard link to `step_path` (no extra disk), or by a copy where the file system
    has no hard links."""
    tmp = latest + ".link"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    try:
        os.link(step_path, tmp)
    except OSError:
        with open(step_path, "rb") as src, atomic_write(latest) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return
    try:
        os.replace(tmp, latest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


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


def latest_step(run_dir: str) -> int | None:
    """The step latest.pt holds, read from the step file it is a hard link to (None when there is none)."""
    latest = latest_path(run_dir)
    if latest is None:
        return None
    for path in sorted(glob.glob(os.path.join(checkpoint_dir(run_dir), "step-*.pt")), reverse=True):
        if os.path.samefile(path, latest):
            return int(os.path.basename(path)[len("step-"):-len(".pt")])
    return load(latest).get("step")  # a copy, where the file system has no hard links


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
