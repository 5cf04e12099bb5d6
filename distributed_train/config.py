"""Run settings: one dataclass, its command line, `resolve()` of the auto values, and RUN/config.json.

Every field is a plain value with a default; its metadata (help, choices, valid range) generates the command line and
validates a Config however it was made, so the two never drift. "Auto" values (workers -1, lr 0, warmup 0,
max_steps 0, precision and channels_last "auto") are turned into concrete ones once, by `resolve`, and the concrete
values are what config.json and checkpoints record.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field

from distributed_train.schedule import SIZE_STEP, parse_progressive, train_batches_per_rank
from shard_tools.errors import UsageError

# model.ARCHS's names, repeated here so that `--help` never waits for torch to import (a test keeps them equal)
ARCH_NAMES = ("resnet26", "resnet50", "resnet101", "resnet152")


def _opt(default, help: str, *, choices: tuple | None = None, valid: tuple | None = None, **kw):
    """A setting. `valid` is (description, test), e.g. ("at least 1", lambda v: v >= 1)."""
    return field(default=default, metadata={"help": help, "choices": choices, "valid": valid, **kw})


AT_LEAST_0 = ("0 or more", lambda v: v >= 0)
AT_LEAST_1 = ("at least 1", lambda v: v >= 1)


def _progressive_ok(text: str) -> bool:
    try:
        return text == "" or bool(parse_progressive(text))
    except ValueError:
        return False


@dataclass
class Config:
    # data and outputs
    data: str = _opt("", "dataset folder or URL (http(s)://, s3://) holding manifest.json", required=True)
    run_dir: str = _opt("", "run folder: checkpoints, metrics.jsonl, config.json; reusing it resumes", required=True)
    # model
    arch: str = _opt("resnet50", "network", choices=ARCH_NAMES)
    width: float = _opt(1.0, "channel width multiplier (e.g. 0.25 for CPU runs)", valid=("positive", lambda v: v > 0))
    image_size: int = _opt(224, "training / evaluation crop size in pixels", valid=AT_LEAST_1)
    init_from: str = _opt("", "torchvision-format state_dict (.pth) or a checkpoint of this trainer to start from "
                              "(fc skipped if classes differ)")
    # schedule
    epochs: int = _opt(10, "number of epochs (ignored when --max-steps is set)", valid=AT_LEAST_0)
    max_steps: int = _opt(0, "stop after this many optimizer steps in total (0: --epochs worth)", valid=AT_LEAST_0)
    batch_size: int = _opt(64, "images per GPU/process per micro-batch", valid=AT_LEAST_1)
    accum_steps: int = _opt(1, "gradient accumulation: micro-batches per optimizer step", valid=AT_LEAST_1)
    optimizer: str = _opt("sgd", "sgd (Nesterov momentum) or adamw", choices=("sgd", "adamw"))
    lr: float = _opt(0.0, "peak learning rate; 0 = base lr scaled by global batch (sgd 0.1, adamw 1e-3 per 256)",
                     valid=AT_LEAST_0)
    weight_decay: float = _opt(5e-5, "weight decay (not applied to BatchNorm and biases)", valid=AT_LEAST_0)
    warmup_steps: int = _opt(0, "linear warmup steps (0: about 3%% of the run, at least 1)", valid=AT_LEAST_0)
    label_smoothing: float = _opt(0.1, "cross-entropy label smoothing", valid=("in [0, 1)", lambda v: 0 <= v < 1))
    clip_grad_norm: float = _opt(0.0, "clip the global gradient norm to this before each step (0: off; 1.0 is "
                                      "common)", valid=AT_LEAST_0)
    ema_decay: float = _opt(0.0, "EMA of the weights (e.g. 0.999); 0 disables; evaluation uses the EMA weights",
                            valid=("in [0, 1) (0: off)", lambda v: 0 <= v < 1))
    min_crop_scale: float = _opt(0.25, "RandomResizedCrop smallest area fraction (0.08 in ImageNet recipes)",
                                 valid=("in (0, 1]", lambda v: 0 < v <= 1))
    # recipe extras (augment.py), all off by default
    auto_augment: str = _opt("none", "automatic augmentation policy after the crop (torchvision.transforms.v2)",
                             choices=("none", "trivialaugment", "randaugment", "autoaugment"))
    random_erase: float = _opt(0.0, "probability of erasing a random rectangle of each training image (0.1 in "
                                    "torchvision's recipe)", valid=("in [0, 1]", lambda v: 0 <= v <= 1))
    mixup: float = _opt(0.0, "MixUp alpha, per batch on the device (0: off; 0.2 in torchvision's recipe)",
                        valid=AT_LEAST_0)
    cutmix: float = _opt(0.0, "CutMix alpha, per batch on the device (0: off; 1.0 in torchvision's recipe); with "
                              "--mixup too, each batch uses one of the two", valid=AT_LEAST_0)
    progressive: str = _opt("", "progressive resizing: training crops grow from MIN to MAX px over the run, in steps "
                                "of 16 (e.g. 160:192; replaces --image-size for training)",
                            valid=(f"MIN:MAX, multiples of {SIZE_STEP}, MIN <= MAX", _progressive_ok))
    eval_image_size: int = _opt(0, "validation crop size (0: the training size, the last one with --progressive); "
                                   "larger than the training crops gives the FixRes effect", valid=AT_LEAST_0)
    eval_crop_pct: float = _opt(0.875, "validation resizes the shorter side to eval size / this, then centre-crops",
                                valid=("in (0, 1]", lambda v: 0 < v <= 1))
    class_balance: str = _opt("none", "weight the loss of each class by count^-1/2 (sqrt) or count^-1 (inverse), "
                                      "for long-tailed datasets", choices=("none", "sqrt", "inverse"))
    # speed
    precision: str = _opt("auto", "auto: bf16 on bf16 GPUs, fp16 on older ones; on CPUs bf16 with AVX512-BF16/AMX "
                                  "units, else fp32", choices=("auto", "bf16", "fp16", "fp32"))
    compile: bool = _opt(False, "torch.compile the model")
    compile_mode: str = _opt("default", "torch.compile mode with --compile; reduce-overhead replays each step's "
                                        "kernels as CUDA graphs (fewer launches from the host)",
                             choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"))
    channels_last: str = _opt("auto", "channels_last memory format (auto: on)", choices=("auto", "on", "off"))
    sync_bn: bool = _opt(False, "SyncBatchNorm across GPUs (CUDA only)")
    workers: int = _opt(-1, "DataLoader worker processes per rank (-1: auto: on a GPU the rank's share of the CPU "
                            "cores less one, at most 8; on a CPU 4)",
                        valid=("-1 (auto), 0 (load in the training process) or more", lambda v: v >= -1))
    decode: str = _opt("workers", "where training JPEGs are decoded and augmented: workers (DataLoader processes, on "
                                  "CPU cores) or device (nvJPEG on the GPU; the workers read shards and draw crops)",
                       choices=("workers", "device"))
    synthetic: bool = _opt(False, "benchmark: train on one fixed random batch in memory instead of the shards")
    shuffle_buffer: int = _opt(1000, "samples in each worker's shuffle buffer", valid=AT_LEAST_0)
    # bookkeeping
    seed: int = _opt(0, "seed for weights init, shard order, shuffling and augmentation")
    log_every: int = _opt(20, "console / metrics.jsonl line every N optimizer steps", valid=AT_LEAST_1)
    eval_every: int = _opt(1, "validate every N epochs (and at the end)", valid=AT_LEAST_1)
    checkpoint_every: int = _opt(500, "save RUN/checkpoints/latest.pt every N optimizer steps (and at epoch ends)",
                                 valid=AT_LEAST_1)
    keep_checkpoints: int = _opt(3, "keep the last K step checkpoints besides latest.pt and best.pt",
                                 valid=AT_LEAST_0)
    wandb: str = _opt("offline", "W&B mode", choices=("offline", "online", "disabled"))
    wandb_project: str = _opt("distributed-train", "W&B project name")
    wandb_log_model: str = _opt("none", "checkpoints as W&B model artifacts (best: each new best.pt, or the last "
                                        "checkpoint of a run without validation; all: every checkpoint saved)",
                                choices=("none", "best", "all"))
    on_shard_error: str = _opt("fail", "what to do with a shard that cannot be read after retries",
                               choices=("fail", "skip"))
    verify_shards: bool = _opt(False, "check each shard's sha256 from the manifest while streaming")
    record_samples: bool = _opt(False, "audit: each rank writes the keys it trained on to RUN/samples/")

    def validate(self) -> None:
        """Raise UsageError naming every setting that cannot be used (the same rules as the command line's)."""
        problems = []
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta["choices"] and value not in meta["choices"]:
                problems.append(f"{flag(f.name)} {value!r}: use {', '.join(meta['choices'])}")
            if meta["valid"] and not meta["valid"][1](value):
                problems.append(f"{flag(f.name)} must be {meta['valid'][0]}")
        if self.epochs < 1 and self.max_steps < 1:
            problems.append("give --epochs or --max-steps (at least 1)")
        if self.decode == "device" and (self.auto_augment != "none" or self.random_erase > 0):
            problems.append("--auto-augment and --random-erase run in the DataLoader workers: use --decode workers")
        if self.wandb_log_model != "none" and self.wandb == "disabled":
            problems.append(f"--wandb-log-model {self.wandb_log_model} needs --wandb offline or online")
        if self.init_from and not os.path.isfile(self.init_from):
            problems.append(f"--init-from {self.init_from}: no such file")
        if os.path.exists(self.run_dir) and not os.path.isdir(self.run_dir):
            problems.append(f"--run-dir {self.run_dir} exists and is not a folder")
        if problems:
            raise UsageError("; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---- auto values -----------------------------------------------------------------------------------------------------
def resolve(cfg: Config, *, device, world_size: int, local_ranks: int, train_samples: int) -> Config:
    """The same settings with every auto value made concrete for this job (device, world size, dataset)."""
    workers = cfg.workers if cfg.workers >= 0 else auto_workers(device, available_cores(), local_ranks)
    global_batch = cfg.batch_size * world_size * cfg.accum_steps
    lr = cfg.lr or (0.1 if cfg.optimizer == "sgd" else 1e-3) * global_batch / 256  # the linear scaling rule
    steps_per_epoch = train_batches_per_rank(train_samples, world_size, cfg.batch_size, cfg.accum_steps) \
        // cfg.accum_steps
    max_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    image_size = parse_progressive(cfg.progressive)[1] if cfg.progressive else cfg.image_size
    return dataclasses.replace(
        cfg, workers=workers, lr=lr, max_steps=max_steps, image_size=image_size,
        eval_image_size=cfg.eval_image_size or image_size,
        warmup_steps=cfg.warmup_steps or max(1, round(0.03 * max_steps)),
        precision=resolve_precision(cfg.precision, device),
        # channels_last suits tensor cores and oneDNN's CPU convolutions alike
        channels_last="off" if cfg.channels_last == "off" else "on")


def resolve_precision(precision: str, device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # CPUs without bf16 units emulate it, many times slower than fp32; with AVX512-BF16 or AMX it is faster.
    return "bf16" if cpu_has_bf16() else "fp32"


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_workers(device, cores: int, local_ranks: int) -> int:
    """--workers -1. A GPU needs every core it can get for decoding, less one for the training loop, up to 8: on an
    H200 one worker decoded and cropped 936-953 images/s (224 px from 256 px JPEGs), so 8 make ~7,500, above the
    compiled ResNet-50 step's 6,700-7,100 there (BENCHMARKS.md, GPU session 12). On a CPU the cores are better spent
    on the model (see train.configure_torch)."""
    if device.type != "cuda":
        return 4
    return max(1, min(8, cores // local_ranks - 1))


def available_cores() -> int:
    """Cores this process may run on (SLURM and containers restrict the affinity mask, not os.cpu_count())."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---- command line --------------------------------------------------------------------------------------------------
def checked(parse, valid: tuple | None):
    """An argparse type: `parse`, then the field's `valid` rule, else argparse's own one-line usage error."""
    if valid is None:
        return parse

    def parse_checked(text: str):
        value = parse(text)
        if not valid[1](value):
            raise argparse.ArgumentTypeError(f"must be {valid[0]}, got {text}")
        return value
    parse_checked.__name__ = parse.__name__  # argparse names the type in its messages
    return parse_checked


def int_at_least(minimum: int):
    """An argparse type: an integer >= minimum."""
    return checked(int, (f"at least {minimum}", lambda v: v >= minimum))


def build_parser(prog: str = "python -m distributed_train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a bottleneck ResNet on shards made by shard_tools.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="", metavar="FILE.yaml",
                   help="recipe: a YAML file of `flag: value` lines (the flags below, with dashes or underscores); "
                        "flags on the command line override it (examples in recipes/)")
    for f in dataclasses.fields(Config):
        meta = f.metadata
        if f.type in ("bool", bool):
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
            continue
        parse = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        p.add_argument(flag(f.name), type=checked(parse, meta["valid"]), choices=meta["choices"],
                       default=None if meta.get("required") else f.default, required=meta.get("required", False),
                       help=meta["help"])
    return p


def parse_args(argv=None) -> Config:
    """The command line, after the --config recipe's settings when one is given (the command line wins)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--config", default="")
    path = recipe.parse_known_args(argv)[0].config
    if path:
        argv = recipe_args(path, parser) + argv  # argparse keeps the last value: the command line wins
    args = vars(parser.parse_args(argv))
    del args["config"]
    return Config(**args)


class RecipeError(UsageError):
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
            parsed = action.type(value)
        except argparse.ArgumentTypeError as e:  # out of the field's range
            raise RecipeError(f"--config {path}: {key}: {e}") from None
        except ValueError:
            kind = action.type.__name__
            raise RecipeError(f"--config {path}: {key}: {value!r} is not {'an' if kind == 'int' else 'a'} {kind}") \
                from None
        if action.choices and parsed not in action.choices:
            raise RecipeError(f"--config {path}: {key}: {value!r}: use {', '.join(action.choices)}")
        args.append(f"{flag}={value}")  # one token: a value starting with '-' is not read as a flag
    return args
