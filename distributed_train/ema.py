"""Exponential moving average of the weights (--ema-decay), updated after every optimizer step."""
from __future__ import annotations

import copy

import torch


class WeightEMA(torch.nn.Module):
    """EMA of a model's parameters and buffers, with TensorFlow's ExponentialMovingAverage(num_updates=n) warmup:
    the decay after n updates is min(decay, (1 + n) / (10 + n)), so the random initial weights fade out of short runs
    instead of dominating them (a fixed 0.999 keeps e^-1 of them after 1,000 steps).

    Its state_dict is torch.optim.swa_utils.AveragedModel's (`module.*` and `n_averaged`), so checkpoints read the
    same. Unlike AveragedModel, which compares its device-resident update count with 0 twice per update (two host
    syncs per training step on a GPU), the count lives on the host: an update only queues kernels.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.decay = decay
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))  # stays on the CPU: never moved
        self.floats, self.counters = split_floats(self.module)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        floats, counters = split_floats(model)
        n = int(self.n_averaged)  # a CPU tensor: reading it never waits for the GPU
        if n == 0:
            torch._foreach_copy_(self.floats, floats)
        else:
            decay = min(self.decay, (1 + n) / (10 + n))
            # lerp: a + (b - a) * w = decay * a + (1 - decay) * b, one kernel for all tensors
            torch._foreach_lerp_(self.floats, floats, 1.0 - decay)
        if counters:  # BatchNorm's batch counts: copied, not averaged
            torch._foreach_copy_(self.counters, counters)
        self.n_averaged += 1


def split_floats(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A model's parameters and buffers, in a fixed order: the floating-point ones, and the integer ones."""
    tensors = [t.detach() for t in (*model.parameters(), *model.buffers())]
    return [t for t in tensors if t.is_floating_point()], [t for t in tensors if not t.is_floating_point()]
