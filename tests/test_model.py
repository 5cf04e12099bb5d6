"""The bottleneck ResNet: identical to torchvision's, every parameter registered, and the fast paths work."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from distributed_train.model import ARCHS, Bottleneck, build_model, load_torchvision_state_dict

TORCHVISION_TWINS = ["resnet50", "resnet101", "resnet152"]


def tiny_model(**kwargs):
    return build_model("resnet26", num_classes=5, width=0.125, **kwargs)


def randomise_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN affine params and running stats, so a mis-wired BN changes the logits."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=generator))
                m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=generator))


@pytest.mark.parametrize("name", TORCHVISION_TWINS)
def test_same_parameters_as_torchvision(name):
    # On the meta device: shapes only, no memory, no init work, so even resnet152 is instant.
    with torch.device("meta"):
        ours = build_model(name, num_classes=1000)
        reference = getattr(torchvision.models, name)()
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    reference_shapes = {k: v.shape for k, v in reference.state_dict().items()}
    assert ours_shapes == reference_shapes
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())


def test_torchvision_weights_give_the_same_logits():
    torch.manual_seed(0)
    reference = torchvision.models.resnet50()
    randomise_batchnorm(reference, torch.Generator().manual_seed(1))
    ours = build_model("resnet50", num_classes=1000)
    skipped = load_torchvision_state_dict(ours, reference.state_dict())
    assert skipped == []
    reference.eval()
    ours.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(images)
        logits = ours(images)
    assert expected.std() > 0.1  # the comparison means something only if the logits are not all alike
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


class RecordOps(TorchDispatchMode):
    """Logs every aten op with its argument shapes: what actually runs, kernel by kernel."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.ops.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


def test_runs_the_same_kernels_as_torchvision():
    # Same ops on the same shapes in the same order, forward and backward: eager speed cannot differ
    # (benchmarks/bench_model.py measures it, but on a shared machine timing alone is noisy).
    # On the meta device ops are dispatched and shapes computed, but nothing is computed: fast.
    with torch.device("meta"):
        models = build_model("resnet50", num_classes=10), torchvision.models.resnet50(num_classes=10)
        images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    recorded = []
    for model in models:
        with RecordOps() as recorder:
            F.cross_entropy(model(images), labels).backward()
        recorded.append(recorder.ops)
    assert len(recorded[0]) > 500
    assert recorded[0] == recorded[1]


def test_torchvision_weights_with_other_class_count():
    reference = torchvision.models.resnet50(num_classes=10)
    ours = build_model("resnet50", num_classes=4)
    with pytest.warns(UserWarning, match="classifier not loaded"):
        skipped = load_torchvision_state_dict(ours, reference.state_dict())
    assert sorted(skipped) == ["fc.bias", "fc.weight"]
    assert torch.equal(ours.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    with pytest.raises(ValueError, match="10 classes in the weights, 4 in the model"):
        load_torchvision_state_dict(ours, reference.state_dict(), strict=True)


def test_torchvision_weights_of_another_architecture_are_refused():
    with torch.device("meta"):
        resnet101_weights = torchvision.models.resnet101().state_dict()
        narrow_weights = build_model("resnet50", num_classes=1000, width=0.5).state_dict()
        ours = build_model("resnet50", num_classes=1000)
    with pytest.raises(ValueError, match="keys missing"):
        load_torchvision_state_dict(ours, resnet101_weights)
    with pytest.raises(ValueError, match="other layer shapes"):
        load_torchvision_state_dict(ours, narrow_weights)


def test_every_parameter_is_registered():
    with torch.device("meta"):
        model = build_model("resnet50", num_classes=4)
    registered = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    assert registered == set(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) > 23_000_000  # the seed registered 28k
    model.to(torch.float64)  # .to() must reach every block, not just the stem and classifier
    assert all(t.dtype == torch.float64 for t in model.state_dict().values() if t.is_floating_point())


def test_small_model_trains_every_parameter():
    torch.manual_seed(0)
    model = build_model("resnet26", num_classes=3, width=0.25)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])

    logits = model(images)
    assert logits.shape == (4, 3)
    F.cross_entropy(logits, labels).backward()
    optimizer.step()

    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert not torch.equal(p, before[name]), f"{name} did not change after an optimizer step"


def test_width_scales_channels():
    model = build_model("resnet26", num_classes=3, width=0.25)
    assert model.conv1.out_channels == 16
    assert [stage[0].conv2.out_channels for stage in (model.layer1, model.layer2, model.layer3, model.layer4)] == [
        16, 32, 64, 128
    ]
    assert model.fc.in_features == 512
    assert build_model("resnet26", num_classes=3, width=0.01).conv1.out_channels == 8
    odd_width = build_model("resnet26", num_classes=3, width=0.3)  # 64 * 0.3 = 19.2 channels before rounding
    assert all(m.out_channels % 8 == 0 for m in odd_width.modules() if isinstance(m, nn.Conv2d))


def test_convs_have_no_bias_and_shortcuts_project_only_where_needed():
    with torch.device("meta"):
        model = build_model("resnet50", num_classes=4)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    projected = [name for name, m in model.named_modules() if isinstance(m, Bottleneck) and m.downsample is not None]
    assert projected == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]


def test_zero_init_residual_makes_blocks_start_as_their_shortcut():
    torch.manual_seed(0)
    model = tiny_model(zero_init_residual=True).eval()
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 8
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    assert all(torch.count_nonzero(b.bn2.weight) == b.bn2.num_features for b in blocks)
    with torch.no_grad():
        for block in blocks:
            x = torch.randn(2, block.conv1.in_channels, 8, 8)
            shortcut = x if block.downsample is None else block.downsample(x)
            torch.testing.assert_close(block(x), F.relu(shortcut))
    assert all(torch.count_nonzero(b.bn3.weight) > 0 for b in tiny_model().modules() if isinstance(b, Bottleneck))


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    model = tiny_model().eval()
    randomise_batchnorm(model, torch.Generator().manual_seed(1))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        model.to(memory_format=torch.channels_last)
        logits = model(images.to(memory_format=torch.channels_last))
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_in_low_precision(dtype):
    torch.manual_seed(0)
    model = tiny_model()
    images = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=dtype):
        logits = model(images)
    assert logits.dtype == dtype
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits.float(), torch.tensor([0, 1])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_compiles_without_graph_breaks():
    model = tiny_model()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_forward_matches_eager():
    # Inductor's C++ codegen: ~15 s on 2 cores for inference only (a training graph takes about twice that).
    torch.manual_seed(0)
    model = tiny_model().eval()
    randomise_batchnorm(model, torch.Generator().manual_seed(1))
    compiled = torch.compile(model, fullgraph=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="resnet18", num_classes=4), "choose one of " + ", ".join(ARCHS)),
        (dict(name="resnet50", num_classes=1), "at least 2"),
        (dict(name="resnet50", num_classes=4, width=0), "width must be positive"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(**kwargs)
