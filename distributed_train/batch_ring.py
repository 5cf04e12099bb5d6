"""Training batches that reach the training process through shared memory both sides already hold.

The stock DataLoader path: a worker stacks every batch into a fresh shared-memory block, the DataLoader passes a file
descriptor per tensor (images, labels) over a socket, and the training process maps the block anew: both sides pay
for a new mapping on every batch. Here the training process allocates, once and before the workers start, a ring of
batch slots per worker; a worker fills its slots in turn and sends only (ring, worker, slot, shape) and the keys,
which unpickle in the training process as (images, labels, keys) over its own mapping of the same memory.
benchmarks/bench_peers.py shows the difference ("ours" vs "ours, fresh batches"), with and without decoding.

The slots keep images channels-last (N, H, W, C in memory) as the augmentation leaves them (augment.py) and the
trainer's channels-last model takes them, so neither side transposes: stacking channels-last crops into an NCHW
batch, as the stock collate does, took ~25 us per 112 px image, 6-8x a plain copy (benchmarks/bench_peers.py, a0).

Why reusing slots is safe: the DataLoader asks a worker for its batch k only when it hands out that worker's batch
k - PREFETCH. With PREFETCH + 2 slots, batch k overwrites batch k - PREFETCH - 2, two batches behind the one being
handed out. So a batch stays intact while the training loop holds it and until it has asked for the next batch
twice (RunData holds one). A consumer that keeps batches longer (e.g. `list(loader)`) must copy them or not use the
ring: `train_loader` has it off unless asked for. Each slot carries the number of the batch last written to it, and
a batch whose slot was refilled before the training process read it (a DataLoader that ran further ahead than this
assumes) stops the run with an error instead of training on the wrong images.
"""
from __future__ import annotations

import math
import uuid
import weakref

import torch
from torch.utils.data import get_worker_info

PREFETCH = 4  # batches a DataLoader worker may have in flight (DataLoader's prefetch_factor)

# The rings of this process by id: where a RingBatch finds its memory when it is unpickled. Weak: a ring lives as
# long as the dataset that made it.
_RINGS: weakref.WeakValueDictionary[str, BatchRing] = weakref.WeakValueDictionary()


class BatchRing:
    """`count` slots per DataLoader worker, each holding a uint8 batch of up to `batch_size` x 3 x `max_size`^2, its
    int64 labels and the batch's number. Make it in the training process, before the DataLoader starts its workers."""

    def __init__(self, workers: int, batch_size: int, max_size: int, count: int = PREFETCH + 2):
        self.capacity = batch_size * 3 * max_size * max_size
        self.labels_at = -(-self.capacity // 8) * 8  # int64 labels need an 8-byte aligned offset
        self.stamp_at = self.labels_at + 8 * batch_size
        self.memory = torch.empty((workers, count, self.stamp_at + 8), dtype=torch.uint8)
        self.memory.share_memory_()  # all of it, now: share_memory_ copies the tensor into a new shared block
        self.count, self.batch_size, self.turn = count, batch_size, 0
        self.id = uuid.uuid4().hex
        _RINGS[self.id] = self

    def views(self, worker: int, slot: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(images of `shape` (N, C, H, W), channels-last in memory; labels) of a slot."""
        row = self.memory[worker, slot]
        n, c, h, w = shape
        images = row[:math.prod(shape)].view(n, h, w, c).permute(0, 3, 1, 2)
        labels = row[self.labels_at:self.labels_at + 8 * n].view(torch.int64)
        return images, labels

    def stamp(self, worker: int, slot: int) -> torch.Tensor:
        """The number of the batch last written to the slot (one int64)."""
        return self.memory[worker, slot, self.stamp_at:].view(torch.int64)

    def put(self, images: list[torch.Tensor], labels: list[int], keys: list[str]) -> RingBatch:
        """In a DataLoader worker: the batch stacked into this worker's next slot."""
        shape = (len(images), *images[0].shape)
        if images[0].dtype != torch.uint8 or shape[0] > self.batch_size or math.prod(shape) > self.capacity:
            raise ValueError(f"a batch of {shape} {images[0].dtype} does not fit the ring's slots")
        worker, turn = get_worker_info().id, self.turn
        slot, self.turn = turn % self.count, turn + 1
        out_images, out_labels = self.views(worker, slot, shape)
        # A plain copy of each image: the augmentation leaves its crops channels-last, as the slots are
        torch.stack([image.permute(1, 2, 0) for image in images], out=out_images.permute(0, 2, 3, 1))
        out_labels.copy_(torch.tensor(labels, dtype=torch.int64))
        self.stamp(worker, slot).fill_(turn)
        return RingBatch(self.id, worker, slot, turn, shape, keys)


class RingBatch:
    """What a worker sends for a batch in a ring: in the training process it unpickles as (images, labels, keys)."""

    __slots__ = ("ring", "worker", "slot", "turn", "shape", "keys")

    def __init__(self, ring: str, worker: int, slot: int, turn: int, shape: tuple[int, ...], keys: list[str]):
        self.ring, self.worker, self.slot, self.turn, self.shape, self.keys = ring, worker, slot, turn, shape, keys

    def __reduce__(self):
        return attach, (self.ring, self.worker, self.slot, self.turn, self.shape, self.keys)


def attach(ring: str, worker: int, slot: int, turn: int, shape: tuple[int, ...], keys: list[str]):
    """(images, labels, keys) of a RingBatch, as views of this process's ring."""
    held = _RINGS.get(ring)
    if held is None:
        raise RuntimeError("a batch arrived for a shared-memory ring this process does not hold: only the process "
                           "that made the DataLoader can read its batches")
    written = int(held.stamp(worker, slot))
    if written != turn:
        raise RuntimeError(f"DataLoader worker {worker} refilled ring slot {slot} (batch {written}) before batch "
                           f"{turn} was read: the DataLoader ran further ahead than its prefetch_factor of {PREFETCH} "
                           "(distributed_train/batch_ring.py)")
    images, labels = held.views(worker, slot, shape)
    return images, labels, keys
