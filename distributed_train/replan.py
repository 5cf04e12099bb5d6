"""Finishing an interrupted epoch under another layout: another world size, per-rank batch, accumulation or worker
count (an elastic job, a requeue onto fewer GPUs).

An epoch's sample order is a pure function of its layout (data.py: slots cut from the shard sequence, a seeded shuffle
per slot, batches taken round-robin from the workers), so the samples the interrupted layout trained on can be worked
out again without reading any data. The rest of the epoch is exactly the samples it had planned and not used yet,
cut into consecutive ranges over the new ranks and workers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from distributed_train.data import Piece, batches_before, cut_ranges, epoch_shards, even_split, slot_order, \
    train_batches_per_rank
from shard_tools.errors import UsageError
from shard_tools.manifest import Manifest


@dataclass(frozen=True)
class EpochLayout:
    """What decides which samples each rank trains on in an epoch."""

    world_size: int
    batch_size: int
    accum_steps: int
    workers: int
    shuffle_buffer: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.accum_steps

    def to_dict(self) -> dict:
        return asdict(self)


def planned_slots(manifest: Manifest, layout: EpochLayout, seed: int, epoch: int) -> tuple[list[list[Piece]],
                                                                                        list[int]]:
    """Every (rank, worker) slot's pieces, rank-major, and each worker's sample count (the same on every rank)."""
    steps = train_batches_per_rank(manifest.split("train").num_samples, layout.world_size, layout.batch_size,
                                   layout.accum_steps)
    per_worker = [b * layout.batch_size for b in even_split(steps, max(1, layout.workers))]
    return cut_ranges(epoch_shards(manifest, "train", seed, epoch, shuffle=True), per_worker * layout.world_size), \
        per_worker


def remaining_samples(manifest: Manifest, layout: EpochLayout, seed: int, epoch: int,
                      batches_done: int) -> list[Piece]:
    """The samples `layout` had planned for `epoch` and not trained on in its first `batches_done` micro-batches per
    rank, as one-sample Pieces in the epoch's sequence order."""
    slots, _ = planned_slots(manifest, layout, seed, epoch)
    workers = max(1, layout.workers)
    rest = []
    for index, pieces in enumerate(slots):
        rank, worker = divmod(index, workers)
        samples = [Piece(p.url, i, i + 1, p.shard) for p in pieces for i in range(p.start, p.stop)]
        used = slot_order(samples, (seed, epoch, rank), worker, layout.shuffle_buffer)
        used = used[:batches_before(batches_done, worker, workers) * layout.batch_size]
        used_ids = {(p.shard.name, p.start) for p in used}
        rest += [p for p in samples if (p.shard.name, p.start) not in used_ids]
    return rest


def remainder_slots(manifest: Manifest, started: EpochLayout, batches_done: int, now: EpochLayout, seed: int,
                    epoch: int) -> tuple[list[list[Piece]], list[int]]:
    """The rest of an epoch begun under `started`, as slots of `now` (rank-major) and each worker's sample count.
    Both layouts have the same global batch, so the epoch keeps its number of optimizer steps."""
    rest = remaining_samples(manifest, started, seed, epoch, batches_done)
    micro = len(rest) // now.world_size // now.batch_size
    per_worker = [b * now.batch_size for b in even_split(micro, max(1, now.workers))]
    slots, start = [], 0
    for count in per_worker * now.world_size:
        slots.append(merge_runs(rest[start:start + count]))
        start += count
    return slots, per_worker


def merge_runs(samples: list[Piece]) -> list[Piece]:
    """Consecutive samples of one shard as one Piece: one read instead of one per sample."""
    runs: list[Piece] = []
    for p in samples:
        last = runs[-1] if runs else None
        if last is not None and last.url == p.url and last.stop == p.start:
            runs[-1] = Piece(last.url, last.start, p.stop, last.shard)
        else:
            runs.append(p)
    return runs


def keep_global_batch(batch_size: int, accum_steps: int, world_size: int, saved_global: int) -> tuple[int, int]:
    """(batch_size, accum_steps) for `world_size` ranks with the checkpoint's global batch: the per-rank batch is
    adjusted where it divides, else the accumulation; UsageError when neither does."""
    if batch_size * accum_steps * world_size == saved_global:
        return batch_size, accum_steps
    if saved_global % (world_size * accum_steps) == 0:
        return saved_global // (world_size * accum_steps), accum_steps
    if saved_global % (world_size * batch_size) == 0:
        return batch_size, saved_global // (world_size * batch_size)
    raise UsageError(f"the checkpoint's global batch of {saved_global} cannot be kept on {world_size} ranks with "
                     f"--batch-size {batch_size} or --accum-steps {accum_steps}: resume on a number of ranks that "
                     f"divides {saved_global}, or give --batch-size and --accum-steps whose product times "
                     f"{world_size} is {saved_global}")


def saved_layout(saved: dict, workers_now: int) -> EpochLayout:
    """The layout a checkpoint's epoch ran under (checkpoints from before layouts were saved: from their config, whose
    auto worker count is taken to be today's)."""
    if "layout" in saved:
        return EpochLayout(**saved["layout"])
    c = saved["config"]
    return EpochLayout(c["world_size"], c["batch_size"], c["accum_steps"], c["workers"] if c["workers"] >= 0 else
                     workers_now, c["shuffle_buffer"])


def carried_over(saved: dict, now: EpochLayout) -> dict | None:
    """What a resumed run must know about its current epoch: None when it continues under the layout it was saved
    with (or at an epoch's end), else {"layout": the one the epoch began under, "batches_done": its micro-batches}."""
    before, started = saved_layout(saved, now.workers), saved.get("epoch_started")
    if started is not None:  # the epoch was already resumed under another layout: finish it under that one
        if before != now:
            raise UsageError(f"epoch {saved['epoch']} was resumed under another layout and is not finished: resume "
                             f"it on {before.world_size} ranks with --batch-size {before.batch_size} --accum-steps "
                             f"{before.accum_steps} --workers {before.workers}, then change them")
        return started
    if saved["batches_done"] == 0 or before == now:
        return None
    return {"layout": before.to_dict(), "batches_done": saved["batches_done"]}
