"""Pieces of the training loop that are easy to get subtly wrong: schedule, EMA warmup, weight-decay groups,
gradient clipping under fp16 loss scaling, the NaN tally."""
import re
import time
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from distributed_train.checkpoint import inference_weights
from distributed_train.config import Config, auto_workers, cpu_has_bf16, parse_args, resolve_precision
from distributed_train.ema import WeightEMA
from distributed_train.model import build_model
from distributed_train import train
from distributed_train.train import (LogWindow, build_optimizer, load_init_weights, optimizer_step, tally,
                                     warmup_cosine)
from shard_tools.errors import CheckpointError, UsageError


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(warmup_steps=4, total_steps=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def test_ema_warmup_forgets_the_initial_weights_then_decays_at_the_set_rate():
    model = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(model, 0.999)
    initial = model[0].weight.detach().clone()
    ema.update(model)  # the first update copies the (random) initial weights
    assert torch.equal(ema.module[0].weight, initial)
    with torch.no_grad():
        model[0].weight.copy_(initial + 1.0)
    model(torch.randn(8, 4))  # moves BatchNorm's running stats and its batch counter
    for _ in range(200):
        ema.update(model)
    # a plain 0.999 EMA would still hold 0.999**200 = 82% of the random initial weights
    assert (initial + 1.0 - ema.module[0].weight).abs().max().item() < 1e-3
    assert torch.allclose(ema.module[1].running_mean, model[1].running_mean, atol=1e-3)
    assert ema.module[1].num_batches_tracked.item() == 1  # an integer buffer is copied, not averaged
    # once warmed up, one update moves the average by exactly 1 - decay of the gap
    ema.n_averaged.fill_(10**6)
    before = ema.module[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.copy_(before + 1.0)
    ema.update(model)
    assert torch.allclose(ema.module[0].weight - before, torch.full_like(before, 0.001), atol=1e-6)


def test_ema_checkpoints_read_like_averaged_models():
    """Checkpoints written before WeightEMA (torch's AveragedModel) load into it, and inference reads both alike."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2))
    old = AveragedModel(model, use_buffers=True)
    old.update_parameters(model)
    old.update_parameters(model)
    ema = WeightEMA(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2)), 0.99)
    ema.load_state_dict(old.state_dict())
    assert int(ema.n_averaged) == 2 and set(ema.state_dict()) == set(old.state_dict())
    weights = inference_weights({"ema": ema.state_dict(), "model": {}})
    assert torch.equal(weights["0.weight"], model[0].weight.detach())


def test_no_weight_decay_on_batchnorm_and_biases():
    model = build_model("resnet26", num_classes=3, width=0.125)
    cfg = Config(data="x", run_dir="y", weight_decay=1e-4, lr=0.1)
    groups = build_optimizer(model, cfg, device=torch.device("cpu")).param_groups
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    assert groups[0]["nesterov"] and groups[0]["momentum"] == 0.9


def test_precision_auto_on_cpu_follows_the_bf16_units():
    # read here from the kernel's CPU flags, not by the function under test
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    expected = "bf16" if flags & {"avx512_bf16", "amx_bf16"} else "fp32"
    assert cpu_has_bf16() == (expected == "bf16")
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_runtime_errors_other_than_a_dead_worker_are_not_hidden(monkeypatch, tmp_path):
    """(A real dead worker is killed in test_train.py.)"""
    import distributed_train.__main__ as cli
    import distributed_train.train

    def other_bug(cfg, ctx):
        raise RuntimeError("something else")

    monkeypatch.setattr(distributed_train.train, "run", other_bug)
    with pytest.raises(RuntimeError, match="something else"):  # not hidden behind a friendly line
        cli.main(["--data", "d", "--run-dir", str(tmp_path / "run")])


@pytest.mark.parametrize("flags, expected", [
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["--decode", "gpu"], "argument --decode: invalid choice: 'gpu'"),
    (["--arch", "resnet18"], "argument --arch: invalid choice: 'resnet18'"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--workers", "-2"], "argument --workers: must be -1 (auto), 0 (load in the training process) or more"),
    (["--width", "0"], "argument --width: must be positive, got 0"),
    (["--min-crop-scale", "1.5"], "argument --min-crop-scale: must be in (0, 1], got 1.5"),
    (["--label-smoothing", "1"], "argument --label-smoothing: must be in [0, 1), got 1"),
    (["--ema-decay", "1.5"], "argument --ema-decay: must be in [0, 1) (0: off), got 1.5"),
    (["--clip-grad-norm", "-1"], "argument --clip-grad-norm: must be 0 or more, got -1"),
    (["--lr", "-0.1"], "argument --lr: must be 0 or more, got -0.1"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_out_of_range_flags_are_argparse_errors_in_one_line(flags, expected, capsys):
    """Each of these used to end in a traceback from deep inside torch or the model, after start-up."""
    with pytest.raises(SystemExit) as e:
        parse_args(["--data", "d", "--run-dir", "r", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and expected in err[-1], err


def test_a_config_made_in_code_is_checked_by_the_same_rules():
    """Config.validate reads the same field metadata as the command line: every bad value is named at once."""
    with pytest.raises(UsageError) as e:
        Config(data="d", run_dir="r", precision="fp8", batch_size=0, workers=-2, width=0, arch="resnet18",
               epochs=0, max_steps=0).validate()
    message = str(e.value)
    for expected in ("--precision 'fp8': use auto, bf16, fp16, fp32", "--batch-size must be at least 1",
                     "--workers must be -1 (auto)", "--width must be positive", "--arch 'resnet18': use resnet26",
                     "give --epochs or --max-steps"):
        assert expected in message, message
    Config(data="d", run_dir="r").validate()  # the defaults pass
    with pytest.raises(UsageError, match="--wandb-log-model best needs --wandb offline or online"):
        Config(data="d", run_dir="r", wandb="disabled", wandb_log_model="best").validate()


def test_config_arch_names_are_the_models():
    from distributed_train.config import ARCH_NAMES
    from distributed_train.model import ARCHS

    assert ARCH_NAMES == tuple(ARCHS)


def test_missing_init_weights_and_a_run_dir_that_is_a_file_are_refused(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(UsageError, match="exists and is not a folder"):
        parse_args(["--data", "d", "--run-dir", str(tmp_path / "run")]).validate()
    with pytest.raises(UsageError, match="--init-from no/such/weights.pth: no such file"):
        parse_args(["--data", "d", "--run-dir", "r", "--init-from", "no/such/weights.pth"]).validate()


def test_init_from_takes_torchvision_weights_or_own_checkpoints_and_names_a_bad_file(tmp_path):
    torch.manual_seed(0)
    source = build_model("resnet26", 3, width=0.125)
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    torch.save({"model": {k: torch.zeros_like(v) for k, v in source.state_dict().items()},
                "ema": {"module." + k: v for k, v in source.state_dict().items()}}, tmp_path / "run.pt")
    for name in ("plain.pth", "run.pt"):  # the checkpoint's EMA weights, not its zeroed raw ones
        target = build_model("resnet26", 3, width=0.125)
        load_init_weights(target, str(tmp_path / name))
        assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    (tmp_path / "junk.pth").write_bytes(b"not weights")
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*junk.pth"):
        load_init_weights(build_model("resnet26", 3, width=0.125), str(tmp_path / "junk.pth"))
    with pytest.raises(CheckpointError, match=r"--init-from .*plain.pth: .*check the arch name and width"):
        load_init_weights(build_model("resnet26", 3, width=0.25), str(tmp_path / "plain.pth"))


def test_auto_workers_share_the_cores_between_the_gpus_of_a_node():
    gpu = torch.device("cuda", 0)
    assert auto_workers(gpu, cores=16, local_ranks=1) == 8  # capped: 8 workers feed a compiled H200 (measured)
    assert auto_workers(gpu, cores=64, local_ranks=8) == 7  # one core per GPU left for its training loop
    assert auto_workers(gpu, cores=8, local_ranks=8) == 1  # never 0: that would decode on the training thread
    assert auto_workers(torch.device("cpu"), cores=2, local_ranks=1) == 4


@pytest.mark.parametrize("loss_scale", [None, 1024.0], ids=["no-scaler", "fp16-scaler"])
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_optimizer_step_clips_the_real_gradient_norm(clip, loss_scale):
    """Plain SGD with lr 1 moves the weights by exactly -grad: the move is the (clipped) unscaled gradient."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=loss_scale or 1.0, enabled=loss_scale is not None)
    before = torch.cat([p.detach().flatten() for p in params])
    scaler.scale(10 * model(torch.randn(8, 4)).square().mean()).backward()
    gradient = torch.cat([p.grad.flatten() for p in params]) / (loss_scale or 1.0)
    assert gradient.norm() > 4 * 0.5, "the test needs a gradient that clipping changes"

    optimizer_step(optimizer, scaler, clip_grad_norm=clip)

    moved = before - torch.cat([p.detach().flatten() for p in params])
    expected = gradient * (clip / gradient.norm() if clip else 1.0)
    torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in params), "gradients are cleared for the next step"


def test_optimizer_step_skips_an_fp16_overflow_even_when_clipping():
    model = torch.nn.Linear(2, 1)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(model(torch.ones(1, 2)).sum()).backward()
    params[0].grad[0, 0] = float("inf")
    optimizer_step(torch.optim.SGD(params, lr=1.0), scaler, clip_grad_norm=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, params)), "an overflowed step must not move the weights"
    assert scaler.get_scale() < 2.0**16


def test_tally_sums_finite_losses_and_counts_the_others():
    total = sum(tally(torch.tensor(x)) for x in [1.5, float("nan"), 2.0, float("inf")])
    assert total.tolist() == [3.5, 2.0]


def test_wandb_online_without_a_login_is_a_one_line_error_before_training(monkeypatch, tmp_path):
    from distributed_train.logger import Logger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.raises(UsageError) as e:
        Logger(str(tmp_path / "run"), True, "online", "p")
    assert str(e.value).startswith("W&B (online): ") and "run `wandb login` or set WANDB_API_KEY" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("tool, argv, expected", [
    ("predict", ["--checkpoint", "c.pt", "x.jpg", "--top-k", "0"], "argument --top-k: must be at least 1, got 0"),
    ("predict", ["--checkpoint", "c.pt", "x.jpg", "--device", "tpu"], "'tpu' is not a device"),
    ("evaluate", ["--checkpoint", "c.pt", "--data", "d", "--batch-size", "0"], "--batch-size: must be at least 1"),
    ("evaluate", ["--checkpoint", "c.pt", "--data", "d", "--workers", "-1"], "--workers: must be at least 0"),
])
def test_evaluate_and_predict_reject_impossible_flags_in_one_line(tool, argv, expected, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"distributed_train.{tool}").main(argv)
    assert e.value.code == 2 and expected in capsys.readouterr().err


@pytest.mark.parametrize("exit_code", [0, 4])
def test_the_wandb_run_ends_with_the_trainers_exit_code(exit_code, tmp_path, monkeypatch):
    import glob

    from distributed_train.logger import Logger
    from wandb_records import records

    monkeypatch.setenv("WANDB_SILENT", "true")
    log = Logger(str(tmp_path / "run"), True, "offline", "p")
    log.log({"kind": "train", "loss": 1.0}, step=1)
    log.close(exit_code)
    (run_file,) = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    deadline = time.monotonic() + 20
    while not (exits := [r.exit.exit_code for r in records(run_file) if r.WhichOneof("record_type") == "exit"]):
        if time.monotonic() > deadline:  # W&B's service process may write the last record after finish() returns
            break
        time.sleep(0.2)
    assert exits == [exit_code]


def test_evaluate_top5_confusion_and_per_class_against_a_direct_count():
    """8 classes, so top-5 can miss; a model that looks its logits up in a table, so the expected figures are
    counted here with numpy. Rows of the confusion matrix are the true class, columns the predicted one."""
    from distributed_train.evaluate import evaluate

    classes, n = 8, 60
    rng = np.random.default_rng(0)
    table = torch.tensor(rng.normal(size=(n, classes)), dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, classes, n))
    labels[:3] = 7  # class 7 present; class 6 may be absent: its accuracy must be None, not 0

    class Lookup(torch.nn.Module):  # the first pixel carries the sample's index
        def forward(self, x):
            return table[(x[:, 0, 0, 0] * 255).round().long()]

    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    batches = [(images[i:i + 16], labels[i:i + 16], None) for i in range(0, n, 16)]
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    result = evaluate(Lookup(), batches, classes, torch.device("cpu"), zero, one)

    logits, truth = table.numpy(), labels.numpy()
    predicted = logits.argmax(1)
    expected = np.zeros((classes, classes), dtype=int)
    for t, p in zip(truth, predicted):
        expected[t, p] += 1
    assert result["confusion"] == expected.tolist()
    top5 = np.mean([t in np.argsort(-row)[:5] for row, t in zip(logits, truth)])
    assert 0 < top5 < 1 and result["top5"] == pytest.approx(top5)
    assert result["top1"] == pytest.approx(np.mean(predicted == truth))
    for c in range(classes):
        mine = truth == c
        assert result["per_class_accuracy"][c] == (pytest.approx(np.mean(predicted[mine] == c)) if mine.any() else None)
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert result["loss"] == pytest.approx(-log_softmax[np.arange(n), truth].mean(), rel=1e-5)


def test_a_logging_window_is_timed_until_the_devices_work_is_done(monkeypatch):
    """On a GPU the host launches steps ahead of the device; reading the window's losses waits for the device. The
    clock must stop after that wait, else the window times the launches (an H200 logged 11,000 images/s for a step
    it ran at 6,800). Here the wait is a 0.3 s sleep inside the reduction."""
    def slow_reduction(t):
        time.sleep(0.3)
        return t
    monkeypatch.setattr(train.dist, "all_reduce_sum", slow_reduction)
    records = []
    log = SimpleNamespace(log=lambda record, step, console: records.append(record))
    state = SimpleNamespace(step=1, epoch=0, scheduler=SimpleNamespace(get_last_lr=lambda: [0.1]))
    window = LogWindow(torch.device("cpu"))
    window.add(torch.tensor(2.0))
    window.steps = 1
    assert window.flush(state, Config(data="-", run_dir="-", batch_size=30), SimpleNamespace(world_size=1), log, 0)
    assert records[0]["loss"] == 2.0
    assert records[0]["images_per_s"] <= 30 / 0.3  # 30 images in at least 0.3 s


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """--compile-mode is handed to torch.compile (reduce-overhead: CUDA graphs), and only known modes parse."""
    modes = []
    monkeypatch.setattr(train.torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    cfg = parse_args(["--data", "-", "--run-dir", "-", "--compile", "--compile-mode", "reduce-overhead",
                      "--arch", "resnet26", "--width", "0.125", "--precision", "fp32", "--channels-last", "off"])
    train.TrainState.create(cfg, train.dist.DistContext(0, 1, 0, torch.device("cpu")), num_classes=3)
    assert modes == ["reduce-overhead"]
    with pytest.raises(SystemExit):
        parse_args(["--data", "-", "--run-dir", "-", "--compile-mode", "fastest"])
