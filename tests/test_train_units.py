"""Pieces of the training loop that are easy to get subtly wrong: schedule, EMA warmup, weight-decay groups."""
import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from distributed_train.config import Config, parse_args
from distributed_train.model import build_model
from distributed_train.checkpoint import inference_weights
from distributed_train.ema import WeightEMA
from distributed_train.train import auto_workers, build_optimizer, cpu_has_bf16, resolve_precision, warmup_cosine


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
    cfg = Config(data="x", run_dir="y", weight_decay=1e-4)
    groups = build_optimizer(model, cfg, lr=0.1, device=torch.device("cpu")).param_groups
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    assert groups[0]["nesterov"] and groups[0]["momentum"] == 0.9


def test_precision_auto_on_cpu_follows_the_bf16_units():
    expected = "bf16" if cpu_has_bf16() else "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_command_line_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--data", "d", "--run-dir", "r", "--precision", "fp8", "--batch-size", "0", "--workers", "-2",
                    "--decode", "gpu"])
    message = str(e.value)
    assert "--precision 'fp8'" in message and "--batch-size must be at least 1" in message
    assert "--workers must be -1 (auto)" in message and "--decode 'gpu': use workers or device" in message


def test_auto_workers_share_the_cores_between_the_gpus_of_a_node():
    gpu = torch.device("cuda", 0)
    assert auto_workers(gpu, cores=16, local_ranks=1) == 8  # capped: 8 keep up with a compiled H200
    assert auto_workers(gpu, cores=64, local_ranks=8) == 7  # one core per GPU left for its training loop
    assert auto_workers(gpu, cores=8, local_ranks=8) == 1  # never 0: that would decode on the training thread
    assert auto_workers(torch.device("cpu"), cores=2, local_ranks=1) == 4
