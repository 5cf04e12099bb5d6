"""Process group up/down, rank helpers and the stop flag every rank agrees on.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; a plain `python -m distributed_train` has none of
them and runs as a world of one without a process group.
"""
from __future__ import annotations

import os
import signal
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from shard_tools.errors import Error, one_line


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(timeout_minutes: float = 30) -> DistContext:
    """Join the job torchrun started: NCCL with one GPU per process (LOCAL_RANK), gloo on CPU."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if backend == "nccl" else {}
        timeout = timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend, store=attempt_store(rank, world_size, timeout), rank=rank,
                                world_size=world_size, timeout=timeout, **kw)
    return DistContext(rank, world_size, local_rank, device)


def attempt_store(rank: int, world_size: int, timeout: timedelta):
    """torchrun's store (MASTER_ADDR:MASTER_PORT), with keys of this attempt only. After `--max-restarts` restarts a
    job, the agent's store may still hold the previous attempt's addresses, and a rank that reads a dead peer's
    address before the peer has published its new one fails to connect (gloo: 'connectFullMesh ... Connection
    refused')."""
    from torch.distributed.rendezvous import _create_c10d_store

    store = _create_c10d_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world_size, timeout)
    return dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


_cpu_group = None


def cpu_group():
    """A gloo group for tiny host-side agreements (the stop flag) that must not sync the GPU stream."""
    global _cpu_group
    if _cpu_group is None and dist.is_initialized():
        _cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _cpu_group


def teardown() -> None:
    """Leave the job. No reference to a group may outlive this: a gloo group freed only when the interpreter shuts
    down can abort the process (SIGABRT, "terminate called without an active exception") once its peers are gone."""
    global _cpu_group
    _cpu_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class PeerLost(Error):
    """A collective failed because another rank's process has exited. That rank printed its own error: the ranks
    left waiting for it say so in a line, not in a page of traceback that buries the cause."""


class WorkerDied(Error):
    """A DataLoader worker process was killed, most often by the kernel's OOM killer."""


UNTYPED = (RuntimeError, ConnectionError, EOFError)  # what job_error looks at


def job_error(error: BaseException, rank: int) -> Error | None:
    """The typed error for what torch raises without a type of its own (gloo's lost peer, a dead DataLoader worker),
    recognised by its text or origin; None for anything else, which is a bug to show whole."""
    text = str(error)
    if isinstance(error, RuntimeError) and ("Connection closed by peer" in text or "Connection reset by peer" in text):
        return PeerLost(f"rank {rank} stops: another rank left the job (its error is printed above)")
    if isinstance(error, RuntimeError) and "DataLoader worker (pid" in text:
        return worker_died(one_line(error))
    # A worker killed while this process fetched a batch's shared memory from it (torch passes the file descriptors
    # through multiprocessing's resource sharer): the same dead worker, seen from this end.
    if isinstance(error, (ConnectionError, EOFError)) and any(
            f.filename.endswith("resource_sharer.py") for f in traceback.extract_tb(error.__traceback__)):
        return worker_died(f"a DataLoader worker died while handing over a batch ({type(error).__name__})")
    return None


def worker_died(reason: str) -> WorkerDied:
    # torch's SIGCHLD handler raises again for the same dead worker, which would land in the middle of this report
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return WorkerDied(f"{reason}: if the node ran out of memory (`dmesg`, SLURM's `seff`), use fewer --workers, a "
                      "smaller --batch-size or --shuffle-buffer; starting again with the same --run-dir resumes from "
                      "the last checkpoint")


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum a tensor over ranks in place (a no-op in a world of one)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def everyone(ok: bool) -> bool:
    """True when `ok` holds on every rank (a collective: every rank calls it at the same point)."""
    votes = torch.tensor([int(ok)], dtype=torch.int32)
    all_reduce_sum(votes, group=cpu_group())
    return int(votes.item()) == (dist.get_world_size() if dist.is_initialized() else 1)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class StopFlag:
    """Preemption: a signal on ANY rank, or a stop file, stops EVERY rank at the same step.

    torchrun forwards SIGTERM to its workers but not SIGUSR1, so a SLURM batch shell that receives USR1 touches
    `stop_file` instead. `should_stop()` is a collective: every rank must call it at the same step.
    """

    def __init__(self, stop_file: str, is_main: bool):
        # Only rank 0 looks at the file: one stat per step, not one per rank on a shared file system.
        self.stop_file = stop_file if is_main else None
        self.signalled = 0
        self.flag = torch.zeros(1, dtype=torch.int32)  # on the CPU: checking it never waits for the GPU
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signalled = signum

    def local(self) -> bool:
        return bool(self.signalled) or (self.stop_file is not None and os.path.exists(self.stop_file))

    def should_stop(self) -> bool:
        self.flag.fill_(int(self.local()))
        all_reduce_sum(self.flag, group=cpu_group())
        return bool(self.flag.item())
