"""Run settings: one dataclass, its command line, and RUN/config.json.

Every field is a plain value with a default; the command line is generated from the fields so the two never drift.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # data and outputs
    data: str = _opt("", "dataset folder or URL (http(s)://, s3://) holding manifest.json", required=True)
    run_dir: str = _opt("", "run folder: checkpoints, metrics.jsonl, config.json; reusing it resumes", required=True)
    # model
    arch: str = _opt("resnet50", "resnet26 | resnet50 | resnet101 | resnet152")
    width: float = _opt(1.0, "channel width multiplier (e.g. 0.25 for CPU runs)")
    image_size: int = _opt(224, "training / evaluation crop size in pixels")
    init_from: str = _opt("", "torchvision-format state_dict (.pth) or a checkpoint of this trainer to start from "
                              "(fc skipped if classes differ)")
    # schedule
    epochs: int = _opt(10, "number of epochs (ignored when --max-steps is set)")
    max_steps: int = _opt(0, "stop after this many optimizer steps in total (0: use --epochs)")
    batch_size: int = _opt(64, "images per GPU/process per micro-batch")
    accum_steps: int = _opt(1, "gradient accumulation: micro-batches per optimizer step")
    optimizer: str = _opt("sgd", "sgd (Nesterov momentum) | adamw")
    lr: float = _opt(0.0, "peak learning rate; 0 = base lr scaled by global batch (sgd 0.1, adamw 1e-3 per 256)")
    weight_decay: float = _opt(5e-5, "weight decay (not applied to BatchNorm and biases)")
    warmup_steps: int = _opt(0, "linear warmup steps (0: about 3%% of the run, at least 1)")
    label_smoothing: float = _opt(0.1, "cross-entropy label smoothing")
    clip_grad_norm: float = _opt(0.0, "clip the global gradient norm to this before each step (0: off; 1.0 is common)")
    ema_decay: float = _opt(0.0, "EMA of the weights (e.g. 0.999); 0 disables; evaluation uses the EMA weights")
    min_crop_scale: float = _opt(0.25, "RandomResizedCrop smallest area fraction (0.08 in ImageNet recipes)")
    # speed
    precision: str = _opt("auto", "auto | bf16 | fp16 | fp32 (auto: bf16 on bf16 GPUs, fp16 on older ones; on CPUs "
                                  "bf16 with AVX512-BF16/AMX units, else fp32)")
    compile: bool = _opt(False, "torch.compile the model")
    channels_last: str = _opt("auto", "auto | on | off (auto: on)")
    sync_bn: bool = _opt(False, "SyncBatchNorm across GPUs (CUDA only)")
    workers: int = _opt(-1, "DataLoader worker processes per rank (-1: auto: on a GPU the rank's share of the CPU "
                            "cores less one, at most 8; on a CPU 4)")
    decode: str = _opt("workers", "where training JPEGs are decoded and augmented: workers (DataLoader processes, on "
                                  "CPU cores) | device (nvJPEG on the GPU; the workers read shards and draw crops)")
    synthetic: bool = _opt(False, "benchmark: train on one fixed random batch in memory instead of the shards")
    shuffle_buffer: int = _opt(1000, "samples in each worker's shuffle buffer")
    # bookkeeping
    seed: int = _opt(0, "seed for weights init, shard order, shuffling and augmentation")
    log_every: int = _opt(20, "console / metrics.jsonl line every N optimizer steps")
    eval_every: int = _opt(1, "validate every N epochs (and at the end)")
    checkpoint_every: int = _opt(500, "save RUN/checkpoints/latest.pt every N optimizer steps (and at epoch ends)")
    keep_checkpoints: int = _opt(3, "keep the last K step checkpoints besides latest.pt and best.pt")
    wandb: str = _opt("offline", "offline | online | disabled")
    wandb_project: str = _opt("distributed-train", "W&B project name")
    wandb_log_model: str = _opt("none", "none | best | all: checkpoints as W&B model artifacts (best: each new "
                                        "best.pt, or the last checkpoint of a run without validation; all: every "
                                        "checkpoint saved)")
    on_shard_error: str = _opt("fail", "fail | skip: what to do with a shard that cannot be read after retries")
    verify_shards: bool = _opt(False, "check each shard's sha256 from the manifest while streaming")
    record_samples: bool = _opt(False, "audit: each rank writes the keys it trained on to RUN/samples/")

    def validate(self) -> None:
        problems = []
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            problems.append(f"--precision {self.precision!r}: use auto, bf16, fp16 or fp32")
        if self.optimizer not in ("sgd", "adamw"):
            problems.append(f"--optimizer {self.optimizer!r}: use sgd or adamw")
        if self.wandb not in ("offline", "online", "disabled"):
            problems.append(f"--wandb {self.wandb!r}: use offline, online or disabled")
        if self.channels_last not in ("auto", "on", "off"):
            problems.append(f"--channels-last {self.channels_last!r}: use auto, on or off")
        if self.decode not in ("workers", "device"):
            problems.append(f"--decode {self.decode!r}: use workers or device")
        if self.wandb_log_model not in ("none", "best", "all"):
            problems.append(f"--wandb-log-model {self.wandb_log_model!r}: use none, best or all")
        if self.on_shard_error not in ("fail", "skip"):
            problems.append(f"--on-shard-error {self.on_shard_error!r}: use fail or skip")
        if self.clip_grad_norm < 0:
            problems.append("--clip-grad-norm must be 0 (off) or more")
        from distributed_train.model import ARCHS  # here, not at the top: `--help` must not wait for torch

        if self.arch not in ARCHS:
            problems.append(f"--arch {self.arch!r}: use one of {', '.join(ARCHS)}")
        if self.width <= 0:
            problems.append("--width must be positive")
        if not 0 < self.min_crop_scale <= 1:
            problems.append("--min-crop-scale must be in (0, 1]")
        if not 0 <= self.label_smoothing < 1:
            problems.append("--label-smoothing must be in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            problems.append("--ema-decay must be in [0, 1) (0: off)")
        for name in ("lr", "weight_decay", "warmup_steps", "max_steps", "keep_checkpoints", "shuffle_buffer"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must not be negative")
        if self.init_from and not os.path.isfile(self.init_from):
            problems.append(f"--init-from {self.init_from}: no such file")
        if os.path.exists(self.run_dir) and not os.path.isdir(self.run_dir):
            problems.append(f"--run-dir {self.run_dir} exists and is not a folder")
        if self.workers < -1:
            problems.append("--workers must be -1 (auto), 0 (load in the training process) or more")
        for name in ("batch_size", "accum_steps", "image_size", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1")
        if self.epochs < 1 and self.max_steps < 1:
            problems.append("give --epochs or --max-steps (at least 1)")
        if problems:
            raise SystemExit("distributed_train: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def int_at_least(minimum: int):
    """An argparse type: an integer >= minimum, else argparse's own one-line usage error."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def build_parser(prog: str = "python -m distributed_train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a bottleneck ResNet on shards made by shard_tools.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="", metavar="FILE.yaml",
                   help="recipe: a YAML file of `flag: value` lines (the flags below, with dashes or underscores); "
                        "flags on the command line override it (examples in recipes/)")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=typ, default=None if meta.get("required") else f.default,
                           required=meta.get("required", False), help=meta["help"])
    return p


def parse_args(argv=None) -> Config:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--config", default="")
    path = recipe.parse_known_args(argv)[0].config
    if path:
        try:
            argv = recipe_args(path, parser) + argv  # argparse keeps the last value: the command line wins
        except RecipeError as e:
            print(f"distributed_train: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    args = vars(parser.parse_args(argv))
    del args["config"]
    cfg = Config(**args)
    cfg.validate()
    return cfg


class RecipeError(ValueError):
    """A --config file that cannot be used; the message names the file and the key."""


YAML_BOOLEANS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def recipe_args(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """A --config YAML file as command-line arguments, each value checked with its flag's own type first so that a
    bad one is reported with the file and key."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            # BaseLoader keeps every value as the text written, as on a command line (the default loader would read
            # `channels_last: on` as a boolean and `lr: 1e-3` as a string)
            recipe = yaml.load(f, Loader=yaml.BaseLoader)
    except OSError as e:
        raise RecipeError(f"--config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"--config {path}: not valid YAML: {' '.join(str(e).split())}") from None
    if recipe in (None, ""):
        return []
    if not isinstance(recipe, dict):
        raise RecipeError(f"--config {path}: expected `flag: value` lines, found a {type(recipe).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    args = []
    for key, value in recipe.items():
        name = key.replace("-", "_")
        if name not in actions:
            raise RecipeError(f"--config {path}: unknown key {key!r}: the keys are the trainer's flags (see --help)")
        flag, action = "--" + name.replace("_", "-"), actions[name]
        if not isinstance(value, str):
            raise RecipeError(f"--config {path}: {key}: expected one value, found a {type(value).__name__}")
        if isinstance(action, argparse.BooleanOptionalAction):
            if value.lower() not in YAML_BOOLEANS:
                raise RecipeError(f"--config {path}: {key}: {value!r} is not true or false")
            args.append(flag if YAML_BOOLEANS[value.lower()] else "--no-" + flag[2:])
            continue
        try:
            action.type(value)
        except (ValueError, argparse.ArgumentTypeError):
            raise RecipeError(f"--config {path}: {key}: {value!r} is not {'an' if action.type is int else 'a'} "
                              f"{action.type.__name__}") from None
        args.append(f"{flag}={value}")  # one token: a value starting with '-' is not read as a flag
    return args
