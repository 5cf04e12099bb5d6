"""Bottleneck ResNets (ResNet-26/50/101/152, v1.5) with a width multiplier.

The architecture is torchvision's ``models/resnet.py`` restricted to the bottleneck family, and the module names are
torchvision's too, so ``resnet50`` here and ``torchvision.models.resnet50`` have the same state_dict keys and shapes
(tests/test_model.py checks parameter counts and logits). "v1.5" means the stride sits in the 3x3 conv, not in the
first 1x1 conv as in the original paper: it is what torchvision and NVIDIA's reference use, and is more accurate.

    model = build_model("resnet50", num_classes=4)              # what the trainer calls
    model = build_model("resnet26", num_classes=4, width=0.25)  # FLOPs scale with width**2: CPU runs, tests
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

# Blocks per stage. resnet26 is not in torchvision: two blocks per stage, for quick CPU runs.
ARCHS: dict[str, tuple[int, int, int, int]] = {
    "resnet26": (2, 2, 2, 2),
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
}

STAGE_WIDTHS = (64, 128, 256, 512)  # bottleneck (3x3 conv) channels per stage at width 1.0; the stem has 64 too


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: the BatchNorm that always follows has its own shift, a conv bias would be a wasted parameter.
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand x4, each followed by BN; ReLU after the residual sum."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        # Projection only where the identity cannot be added as is (new channel count or resolution); each block
        # owns its own, since a module shared across blocks would share (and wrongly co-train) its weights.
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))  # no ReLU here: the residual branch must be able to subtract
        out += x if self.downsample is None else self.downsample(x)  # in place: one activation fewer to allocate
        return self.relu(out)


def scaled_channels(channels: int, width: float) -> int:
    """Channel count times the width multiplier, a multiple of 8 (fast kernels like it), at least 8."""
    return max(8, round(channels * width / 8) * 8)


class ResNet(nn.Module):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) -> four stages of bottlenecks -> global average pool -> fc."""

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        num_classes: int,
        width: float = 1.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        stem_channels = scaled_channels(64, width)
        self.conv1 = nn.Conv2d(3, stem_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        # Registered as attributes (nn.Sequential), never a plain list: a list hides its modules' parameters from
        # .parameters(), .to(), state_dict() and DDP.
        in_channels = stem_channels
        widths = [scaled_channels(w, width) for w in STAGE_WIDTHS]
        self.layer1, in_channels = self._make_layer(in_channels, widths[0], blocks_per_stage[0], stride=1)
        self.layer2, in_channels = self._make_layer(in_channels, widths[1], blocks_per_stage[1], stride=2)
        self.layer3, in_channels = self._make_layer(in_channels, widths[2], blocks_per_stage[2], stride=2)
        self.layer4, in_channels = self._make_layer(in_channels, widths[3], blocks_per_stage[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)

        self._init_weights(zero_init_residual)

    @staticmethod
    def _make_layer(in_channels: int, width: int, num_blocks: int, stride: int) -> tuple[nn.Sequential, int]:
        """One stage: the first block changes resolution/channels, the rest keep them."""
        blocks = [Bottleneck(in_channels, width, stride)]
        out_channels = width * Bottleneck.expansion
        blocks += [Bottleneck(out_channels, width) for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks), out_channels

    def _init_weights(self, zero_init_residual: bool) -> None:
        # He et al. init for ReLU nets; fc keeps PyTorch's default, as in torchvision.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each block then starts as ReLU(shortcut(x)): easier optimisation at large batch (Goyal et al. 2017).
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def build_model(name: str, num_classes: int, width: float = 1.0, zero_init_residual: bool = False) -> ResNet:
    """A randomly initialised ResNet preset from ARCHS with ``num_classes`` outputs (the manifest's class count)."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}: choose one of {', '.join(ARCHS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes} (check the manifest's class list)")
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")
    return ResNet(ARCHS[name], num_classes, width, zero_init_residual)


CLASSIFIER_KEYS = ("fc.weight", "fc.bias")


def load_torchvision_state_dict(model: ResNet, state_dict: Mapping[str, Tensor], strict: bool = False) -> list[str]:
    """Copy torchvision-format ResNet weights (e.g. ``torchvision.models.resnet50().state_dict()``) into ``model``.

    Key mapping, torchvision -> this module. Our modules carry torchvision's names, so the mapping is the identity;
    the only rule is for the classifier:

        torchvision key                              ours
        -------------------------------------------  --------------------------------------------------------
        conv1.weight, bn1.{weight,bias,running_*}    same (stem)
        layer{1-4}.{i}.conv{1,2,3}.weight            same (1x1 reduce, 3x3 with the stride, 1x1 expand)
        layer{1-4}.{i}.bn{1,2,3}.*                   same
        layer{1-4}.0.downsample.{0,1}.*              same (projection conv1x1, BN; only in each stage's 1st block)
        fc.weight, fc.bias                           same if the class counts match, otherwise left at their
                                                     random init with a warning (fine-tuning); strict=True: error

    Any other missing, unexpected or differently shaped key means another architecture or width: a ValueError.
    Returns the keys that were skipped. From a torchvision checkpoint on disk:

        load_torchvision_state_dict(model, torch.load("resnet50-11ad3fa6.pth", weights_only=True))
    """
    ours = model.state_dict()
    missing = sorted(ours.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - ours.keys())
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match this architecture: {len(missing)} keys missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); check the arch name and width"
        )
    mismatched = [k for k, v in ours.items() if state_dict[k].shape != v.shape]
    body_mismatch = [k for k in mismatched if k not in CLASSIFIER_KEYS]
    if body_mismatch:
        first = body_mismatch[0]
        raise ValueError(
            f"state dict has other layer shapes in {len(body_mismatch)} tensors (e.g. {first}: "
            f"{tuple(state_dict[first].shape)}, ours {tuple(ours[first].shape)}); check the arch name and width"
        )
    if mismatched:
        weights_classes, model_classes = state_dict["fc.weight"].shape[0], ours["fc.weight"].shape[0]
        classes = f"{weights_classes} classes in the weights, {model_classes} in the model"
        if strict:
            raise ValueError(f"classifier does not fit: {classes}")
        warnings.warn(f"classifier not loaded ({classes}): fc keeps its random init", stacklevel=2)
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in mismatched}, strict=not mismatched)
    return mismatched
