"""Exponential moving average of the weights (--ema-decay), updated after every optimizer step."""
from __future__ import annotations

import copy

import torch


class WeightEMA(torch.nn.Module):
    """EMA of a model's parameters and buffers, with timm's decay warmup: the decay after n updates is
    min(decay, (1 + n) / (10 + n)). A fixed 0.999 would keep ~37% of the random initial weights after 1,000 steps,
    which ruins short runs.

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
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        floats = [i for i, t in enumerate(averaged) if t.is_floating_point()]
        counters = [i for i, t in enumerate(averaged) if not t.is_floating_point()]  # BatchNorm's batch counts
        if self.updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
            # lerp: a + (b - a) * w = decay * a + (1 - decay) * b, one kernel for all tensors
            torch._foreach_lerp_([averaged[i] for i in floats], [current[i] for i in floats], 1.0 - decay)
            if counters:
                torch._foreach_copy_([averaged[i] for i in counters], [current[i] for i in counters])
        self.updates += 1
        self.n_averaged.fill_(self.updates)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.updates = int(self.n_averaged)
        return result
