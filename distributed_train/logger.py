"""Rank-0 logging: a console line, RUN/metrics.jsonl (one JSON record per line) and Weights & Biases.

Other ranks get a logger that does nothing, so call sites need no `if rank == 0`.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

import numpy as np

from shard_tools.errors import UsageError, one_line
from shard_tools.redaction import redact


class Logger:
    def __init__(self, run_dir: str, enabled: bool, wandb_mode: str = "disabled", wandb_project: str = "",
                 wandb_id: str | None = None, config: dict | None = None):
        self.enabled = enabled
        self.run_dir = run_dir
        self.wandb = None
        self.wandb_id = wandb_id
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if wandb_mode != "disabled":
            import wandb

            argv, sys.argv = sys.argv, [redact(a) for a in sys.argv]  # W&B records the command line, URLs too
            try:
                self.wandb = wandb.init(project=wandb_project, dir=run_dir, mode=wandb_mode, config=config,
                                        id=wandb_id, resume="allow", name=os.path.basename(os.path.abspath(run_dir)))
            except wandb.errors.Error as e:  # no login, no network, no such entity...: before any step is spent
                raise UsageError(f"W&B ({wandb_mode}): {one_line(e)} For --wandb online, run `wandb login` or set "
                                 "WANDB_API_KEY; or train with --wandb offline and upload later with `wandb sync`.")
            finally:
                sys.argv = argv
            self.wandb_id = self.wandb.id

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def error(self, message: str) -> None:
        if self.enabled:
            print(f"error: {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        if self.enabled:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def log(self, record: dict, step: int, console: str | None = None) -> None:
        """One metrics record: to metrics.jsonl, W&B (scalars only) and, if given, a console line."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **record}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            prefix = f"{record['kind']}/" if "kind" in record else ""  # train/loss and val/loss stay apart
            self.wandb.log({prefix + k: v for k, v in record.items()
                            if isinstance(v, (int, float)) and k not in ("step", "time")}, step=step)
        if console:
            print(console, flush=True)

    def log_confusion(self, matrix: np.ndarray, class_names: list[str], step: int, png_path: str,
                      prefix: str = "val") -> None:
        """Confusion matrix as a W&B plot and as a PNG in the run folder."""
        if not self.enabled:
            return
        from distributed_train.plots import plot_confusion_matrix

        matrix = np.asarray(matrix)
        plot_confusion_matrix(matrix, class_names, png_path)
        if self.wandb is not None:
            import wandb

            true, pred = np.nonzero(matrix)
            y_true = np.repeat(true, matrix[true, pred]).tolist()
            preds = np.repeat(pred, matrix[true, pred]).tolist()
            self.wandb.log({f"{prefix}/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=y_true, preds=preds, class_names=class_names),
                f"{prefix}/confusion_matrix_png": wandb.Image(png_path)}, step=step)

    def log_per_class(self, accuracies: list[float | None], class_names: list[str], step: int,
                      prefix: str = "val") -> None:
        """Per-class accuracy as W&B scalars (metrics.jsonl has them in the validation record already)."""
        if self.enabled and self.wandb is not None:
            self.wandb.log({f"{prefix}/acc_{name}": acc for name, acc in zip(class_names, accuracies)
                            if acc is not None}, step=step)

    def use_dataset(self, location: str, manifest: dict) -> None:
        """The dataset's manifest.json as a W&B dataset artifact that this run uses, so that W&B's lineage links the
        shards (the manifest lists each one's sha256) to the models trained on them. `location`: already redacted."""
        if self.wandb is None:
            return
        import wandb

        folder = location.rstrip("/").removesuffix("/manifest.json")
        name = re.sub(r"[^\w.-]", "-", os.path.basename(folder)) or "dataset"  # W&B's allowed characters
        artifact = wandb.Artifact(name, type="dataset", metadata={"location": location, "classes": manifest["classes"]})
        with artifact.new_file("manifest.json", mode="w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
        if self.wandb.offline:
            # use_artifact refuses offline runs, though for a new artifact it does no more than this private call,
            # whose "use after commit" mark `wandb sync` replays on upload.
            self.wandb._log_artifact(artifact, is_user_created=True, use_after_commit=True)
        else:
            self.wandb.use_artifact(artifact)

    def log_model(self, checkpoint_path: str, aliases: list[str], metadata: dict) -> None:
        """A checkpoint as a new version of this run's model artifact (`model-<run id>`, as Lightning names it).
        W&B copies the file into its staging folder now: the checkpoint may be replaced or deleted after this."""
        if self.wandb is None:
            return
        import wandb

        artifact = wandb.Artifact(f"model-{self.wandb.id}", type="model", metadata=metadata)
        artifact.add_file(checkpoint_path, name="checkpoint.pt")
        self.wandb.log_artifact(artifact, aliases=aliases)

    def close(self, exit_code: int = 0) -> None:
        """`exit_code`: the trainer's own, recorded in the W&B run (non-zero: diverged or preempted)."""
        if not self.enabled:
            return
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code)
