"""PNG figures of a run: the confusion matrix and the training curves (from RUN/metrics.jsonl)."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: str) -> str:
    matrix = np.asarray(matrix)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * k, 1.0 + 0.6 * k))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (counts; colour = share of the true class)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_training_curves(metrics_jsonl: str, path: str) -> str:
    train, val = [], []
    with open(metrics_jsonl, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "train":
                train.append((r["step"], r["loss"]))
            elif r.get("kind") == "val":
                val.append((r["step"], r["top1"]))
    fig, ax1 = plt.subplots(figsize=(7, 4))
    if train:
        ax1.plot(*zip(*train), color="tab:blue", label="training loss")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("training loss", color="tab:blue")
    ax2 = ax1.twinx()
    if val:
        ax2.plot(*zip(*val), "o-", color="tab:orange", label="validation top-1")
    ax2.set_ylabel("validation top-1", color="tab:orange")
    ax2.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
