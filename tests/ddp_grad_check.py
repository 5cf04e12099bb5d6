"""Gradients of one global batch of 8, computed three ways with the trainer's own `forward_backward`:
  ddp   - under torchrun, 2 ranks x 4 samples, DDP averaging
  accum - 1 process, 2 micro-batches of 4 with gradient accumulation
  full  - 1 process, 1 batch of 8
BatchNorm is in eval mode so its statistics do not depend on how the batch is split (per-rank batch statistics are
what --sync-bn is for). Usage: python tests/ddp_grad_check.py MODE OUT.pt
"""
import contextlib
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed_train import dist
from distributed_train.model import build_model
from distributed_train.train import forward_backward

mode, out = sys.argv[1], sys.argv[2]
ctx = dist.setup()
torch.manual_seed(0)
model = build_model("resnet26", num_classes=3, width=0.125).eval()
x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
y = torch.tensor([0, 1, 2, 0, 1, 2, 2, 1])
scaler = torch.amp.GradScaler("cpu", enabled=False)
run = dict(autocast=contextlib.nullcontext, scaler=scaler, label_smoothing=0.1)

ddp = None
if mode == "ddp":
    ddp = DDP(model)
    lo = ctx.rank * 4
    forward_backward(ddp, x[lo:lo + 4], y[lo:lo + 4], accum_steps=1, sync=True, **run)
elif mode == "accum":
    forward_backward(model, x[:4], y[:4], accum_steps=2, sync=False, **run)
    forward_backward(model, x[4:], y[4:], accum_steps=2, sync=True, **run)
else:
    forward_backward(model, x, y, accum_steps=1, sync=True, **run)

if ctx.is_main:
    torch.save({n: p.grad for n, p in model.named_parameters()}, out)
# Everyone done before the group goes away; a DDP reducer still alive at teardown can abort the process (gloo).
dist.barrier()
ddp = None
dist.teardown()
