"""The trainer's data pipeline: equal steps per rank, no sample twice in an epoch, validation exactly once, resume.

Ranks are simulated in one process by building each rank's loader (with real DataLoader worker processes), which is
exactly what each torchrun process does; the multi-process runs are in test_train.py.
"""
import os
import pickle
import re
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from distributed_train.batches import RunData
from distributed_train.config import Config
from distributed_train.batch_ring import PREFETCH, BatchRing, RingBatch
from distributed_train.data import (EpochCursor, Piece, PieceReader, TrainStream, batches_before, cut_ranges,
                                    decode_rgb, eval_loader, even_split, run_train_loader, train_batches_per_rank,
                                    train_loader)
from distributed_train.dist import DistContext
from shard_tools.manifest import Manifest, ShardInfo
from shard_tools.errors import ShardReadError, one_line as error_line


def epoch_keys(manifest, location, world_size, workers, batch_size=4, epoch=0, skip=0, image_size=24):
    per_rank = []
    for rank in range(world_size):
        loader, steps = train_loader(manifest, rank=rank, world_size=world_size, batch_size=batch_size,
                                     accum_steps=1, image_size=image_size, workers=workers, seed=7, epoch=epoch,
                                     skip_batches=skip, shuffle_buffer=16)
        batches = list(loader)
        assert len(batches) == steps, f"rank {rank} yielded {len(batches)} batches, promised {steps}"
        for images, labels, keys in batches:
            assert images.shape == (batch_size, 3, image_size, image_size) and images.dtype == torch.uint8
            assert labels.shape == (batch_size,)
        per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 2), (3, 2), (4, 3)])
def test_equal_steps_and_no_duplicate_samples(uneven_shards, world_size, workers):
    manifest = Manifest.read(str(uneven_shards))
    per_rank = epoch_keys(manifest, uneven_shards, world_size, workers)
    steps = {len(batches) for batches in per_rank}
    assert len(steps) == 1, f"ranks run different step counts: {steps}"
    keys = [k for batches in per_rank for _, _, ks in batches for k in ks]
    duplicates = [k for k, n in Counter(keys).items() if n > 1]
    assert not duplicates, f"samples read twice in one epoch: {duplicates[:5]}"
    # floor(144 / world / 4) batches per rank: at most one batch per rank is left out
    assert len(keys) == world_size * train_batches_per_rank(144, world_size, 4) * 4
    assert 144 - len(keys) < world_size * 4


def test_labels_travel_with_their_images(uneven_shards):
    manifest = Manifest.read(str(uneven_shards))
    for images, labels, keys in epoch_keys(manifest, uneven_shards, 1, 0)[0]:
        for key, label in zip(keys, labels):
            assert int(key) % 3 == label  # conftest labels row r with class r % 3
        # the class is the dominant channel of the image (see conftest.class_image)
        assert (images.float().mean(dim=(2, 3)).argmax(dim=1) == labels).all()


def test_shard_order_changes_with_epoch_but_not_with_rerun(uneven_shards):
    manifest = Manifest.read(str(uneven_shards))
    first = [ks for _, _, ks in epoch_keys(manifest, uneven_shards, 1, 2, epoch=0)[0]]
    again = [ks for _, _, ks in epoch_keys(manifest, uneven_shards, 1, 2, epoch=0)[0]]
    second = [ks for _, _, ks in epoch_keys(manifest, uneven_shards, 1, 2, epoch=1)[0]]
    assert first == again
    assert first != second


def test_mid_epoch_resume_yields_exactly_the_remaining_batches(uneven_shards):
    manifest = Manifest.read(str(uneven_shards))
    full = epoch_keys(manifest, uneven_shards, 2, 2)
    resumed = epoch_keys(manifest, uneven_shards, 2, 2, skip=5)
    for rank in range(2):
        assert [ks for _, _, ks in resumed[rank]] == [ks for _, _, ks in full[rank]][5:]
        # the same crops too: augmentation is seeded per batch, not by how many batches came before
        assert torch.equal(resumed[rank][0][0], full[rank][5][0])


@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 3), (5, 2)])
def test_validation_reads_every_sample_exactly_once(uneven_shards, world_size, workers):
    manifest = Manifest.read(str(uneven_shards))
    keys = []
    for rank in range(world_size):
        loader = eval_loader(manifest, "val", rank=rank, world_size=world_size, batch_size=4,
                             image_size=24, workers=workers)
        keys += [k for _, _, ks in loader for k in ks]
    assert sorted(keys) == sorted(set(keys))
    assert len(keys) == 31


def shard_list(*sizes: tuple[str, int]) -> list[tuple[str, ShardInfo]]:
    return [(name, ShardInfo(name, n, 0, "")) for name, n in sizes]


def test_tiny_dataset_wraps_around_so_every_rank_still_steps():
    shards = shard_list(("a.tar", 3), ("b.tar", 2))
    a, b = (info for _, info in shards)
    slots = cut_ranges(shards, [4, 4])
    assert slots == [[Piece("a.tar", 0, 3, a), Piece("b.tar", 0, 1, b)],
                     [Piece("b.tar", 1, 2, b), Piece("a.tar", 0, 3, a)]]
    assert train_batches_per_rank(5, world_size=4, batch_size=8) == 1


def test_cut_ranges_skips_empty_shards_and_covers_everything_once():
    shards = shard_list(("a", 5), ("empty", 0), ("b", 1), ("c", 7))
    slots = cut_ranges(shards, even_split(13, 4))
    covered = [(p.url, i) for pieces in slots for p in pieces for i in range(p.start, p.stop)]
    assert sorted(covered) == sorted([(u, i) for u, info in shards for i in range(info.num_samples)])
    assert [sum(p.stop - p.start for p in pieces) for pieces in slots] == [4, 3, 3, 3]


def test_round_robin_bookkeeping():
    # the DataLoader takes batch i from worker i % W: after 7 batches with 3 workers, they made 3, 2, 2
    assert [batches_before(7, w, 3) for w in range(3)] == [3, 2, 2]
    assert even_split(7, 3) == [3, 2, 2]


@pytest.mark.parametrize("workers", [0, 1])
def test_an_undecodable_sample_is_named_with_its_shard(damaged_shards, workers):
    """Bit rot inside a shard: training and evaluation stop with the sample's key, the shard and what to run."""
    manifest = Manifest.read(str(damaged_shards))
    train, _ = train_loader(manifest, rank=0, world_size=1, batch_size=4, accum_steps=1,
                            image_size=24, workers=workers, seed=0, epoch=0)
    val = eval_loader(manifest, "val", rank=0, world_size=1, batch_size=4, image_size=24,
                      workers=workers)
    for loader, where in ((train, "000000003 of .*train-000000.tar"), (val, "000000155 of .*val-000001.tar")):
        with pytest.raises(ShardReadError) as e:
            list(loader)
        assert re.search(f"sample {where} cannot be decoded", error_line(e.value)), error_line(e.value)
        assert "shard_tools verify" in error_line(e.value)


# ---- one loader for the whole run ----------------------------------------------------------------------------------
class PidTagged:
    """A read_piece that tags each sample's key with the process that read it."""

    def __init__(self):
        self.reader = PieceReader()

    def __call__(self, piece):
        for sample in self.reader(piece):
            yield {**sample, "__key__": f"{sample['__key__']}@{os.getpid()}"}


def run_keys(loader) -> tuple[list[str], set[str]]:
    tagged = [k for _, _, keys in loader for k in keys]
    return [k.split("@")[0] for k in tagged], {k.split("@")[1] for k in tagged}


def test_persistent_workers_stream_every_epoch_as_a_fresh_loader_would(uneven_shards):
    manifest = Manifest.read(str(uneven_shards))
    kw = dict(rank=1, world_size=2, batch_size=4, accum_steps=1, image_size=24, workers=2, seed=5)
    cursor = EpochCursor()
    loader = run_train_loader(manifest, cursor, read_piece=PidTagged(), **kw)
    workers, seen = set(), {}
    for epoch, skip in [(0, 0), (1, 0), (1, 5), (2, 3), (0, 0)]:
        fresh, _ = train_loader(manifest, epoch=epoch, skip_batches=skip, **kw)
        expected = [(images, keys) for images, _, keys in fresh]
        cursor.set(epoch, skip)
        got = [(images.clone(), keys) for images, _, keys in loader]  # its buffers are reused: keep copies
        assert [[k.split("@")[0] for k in keys] for _, keys in got] == [keys for _, keys in expected]
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got, expected))  # same crops too
        workers |= {k.split("@")[1] for _, keys in got for k in keys}
        seen[epoch, skip] = [k.split("@")[0] for _, keys in got for k in keys]
    assert len(workers) == 2, "the same two worker processes served every epoch"
    assert seen[1, 0] != seen[0, 0]  # each epoch its own order
    assert seen[1, 5] == seen[1, 0][5 * 4:]  # resuming after 5 batches continues the uninterrupted epoch


@pytest.mark.parametrize("workers", [1, 2])
def test_ring_slots_keep_each_batch_until_the_next_but_one_is_asked_for(uneven_shards, workers):
    """The trainer's loader has its workers fill a ring of shared-memory slots in turn (batch_ring.py). A slow
    consumer lets the workers run as far ahead as the DataLoader allows: the batch it holds, and the one before,
    must not change."""
    manifest = Manifest.read(str(uneven_shards))
    kw = dict(rank=0, world_size=1, batch_size=4, accum_steps=1, image_size=24, workers=workers, seed=3, epoch=1)
    expected = list(train_loader(manifest, **kw)[0])  # fresh batches
    loader, steps = train_loader(manifest, reuse_buffers=True, **kw)
    held, slots = [], set()  # (batch, its copy on arrival) for the last two batches
    for images, labels, _ in loader:
        held = held[-1:] + [(images, images.clone())]
        slots.add(images.data_ptr())
        assert images.shape == (4, 3, 24, 24) and labels.dtype == torch.int64 and labels.shape == (4,)
        assert images.is_contiguous(memory_format=torch.channels_last), "ring batches are NHWC in memory"
        time.sleep(0.01)  # the workers fill their queue meanwhile
        for batch, on_arrival in held:
            assert torch.equal(batch, on_arrival), "a held batch was overwritten by a later one"
    assert steps == len(expected) > 2 * workers * (PREFETCH + 2)  # every buffer is filled twice at least
    assert len(slots) <= workers * (PREFETCH + 2), "slots were not reused"
    copies = [(images.clone(), labels.clone(), keys)
              for images, labels, keys in train_loader(manifest, reuse_buffers=True, **kw)[0]]
    assert len(copies) == len(expected)
    for (images, labels, keys), (want_images, want_labels, want_keys) in zip(copies, expected):
        assert keys == want_keys and torch.equal(labels, want_labels) and torch.equal(images, want_images)


def test_the_ring_is_used_only_when_the_workers_batch_counts_are_within_one(uneven_shards):
    """At an epoch's end the DataLoader gives a finished worker's requests to the others: a worker with many more
    batches left than the rest could then run past its buffers, so such an epoch gets fresh batches."""
    stream = TrainStream(Manifest.read(str(uneven_shards)), EpochCursor(), rank=0, world_size=1, batch_size=4,
                         accum_steps=1, image_size=24, workers=2, seed=0, reuse_buffers=True)
    slots, per_worker, _ = stream.slots(0)
    assert abs(per_worker[0] - per_worker[1]) <= 4 and stream.epoch_stream(0, 0).ring is stream.ring
    stream.planned[1] = (slots, [per_worker[0] + 8, per_worker[1] - 8])  # as if another layout had left it so
    assert stream.ring is not None and stream.epoch_stream(1, 0).ring is None


def test_run_data_starts_the_next_epoch_ahead_and_resumes_mid_epoch(uneven_shards):
    manifest = Manifest.read(str(uneven_shards))
    cfg = Config(data=str(uneven_shards), run_dir="unused", workers=2, batch_size=4, image_size=24, max_steps=80,
                 seed=2)
    data = RunData(cfg, DistContext(0, 1, 0, torch.device("cpu")), manifest, torch.contiguous_format)
    try:
        def epoch_keys(epoch, skip):
            return [k for _, _, keys in data.epoch(epoch, skip) for k in keys]

        def fresh_keys(epoch, skip):
            loader, _ = train_loader(manifest, rank=0, world_size=1, batch_size=4, accum_steps=1, image_size=24,
                                     workers=2, seed=2, epoch=epoch, skip_batches=skip)
            return [k for _, _, keys in loader for k in keys]

        assert epoch_keys(0, 0) == fresh_keys(0, 0)
        assert data.ahead is not None and data.ahead[:2] == (1, 0)  # started when epoch 0 ended
        assert epoch_keys(1, 0) == fresh_keys(1, 0)
        assert epoch_keys(3, 7) == fresh_keys(3, 7)  # asked for something else: the run ahead is dropped
    finally:
        data.close()


def test_decode_rgb_is_torchvisions_decode_jpeg_without_its_wrapper():
    """The loaders call the op under torchvision.io.decode_jpeg directly (data.decode_rgb): same pixels for colour
    and greyscale JPEGs, and the same error for damaged ones, which the loader reports per sample."""
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    torch.manual_seed(0)
    for image in [torch.randint(0, 256, (3, 37, 50), dtype=torch.uint8), torch.randint(0, 256, (1, 20, 9),
                                                                                            dtype=torch.uint8)]:
        data = encode_jpeg(image, quality=90)
        assert torch.equal(decode_rgb(data), decode_jpeg(data, mode=ImageReadMode.RGB))
        assert decode_rgb(data).shape == (3, *image.shape[1:])
        with pytest.raises(RuntimeError):
            decode_rgb(data[: len(data) // 2])
        with pytest.raises(RuntimeError):
            decode_jpeg(data[: len(data) // 2], mode=ImageReadMode.RGB)


def test_the_ring_stacks_images_of_either_layout_into_channels_last_slots(monkeypatch):
    """The crops arrive channels-last (augment.py) but --auto-augment may hand over plain CHW tensors: both land in
    the slot as torch.stack would stack them, and the batch is channels-last in memory."""
    monkeypatch.setattr("distributed_train.batch_ring.get_worker_info", lambda: SimpleNamespace(id=1))
    ring = BatchRing(workers=2, batch_size=3, max_size=5)
    plain = [torch.randint(0, 256, (3, 5, 4), dtype=torch.uint8) for _ in range(3)]
    mixed = [plain[0], plain[1].unsqueeze(0).contiguous(memory_format=torch.channels_last)[0], plain[2]]
    assert not mixed[1].is_contiguous()
    images, labels, keys = pickle.loads(pickle.dumps(ring.put(mixed, [2, 0, 1], ["a", "b", "c"])))
    assert torch.equal(images, torch.stack(plain)) and labels.tolist() == [2, 0, 1] and keys == ["a", "b", "c"]
    assert images.is_contiguous(memory_format=torch.channels_last)


def test_a_ring_batch_unpickles_as_views_of_the_ring_and_refuses_a_refilled_slot():
    """What a worker sends is (ring, worker, slot, batch number, shape, keys); the training process reads the slot.
    A slot that already holds a later batch is an error, never a silently wrong batch."""
    ring = BatchRing(workers=2, batch_size=3, max_size=4)
    images, labels = ring.views(1, 2, (3, 3, 4, 4))
    images.copy_(torch.arange(144, dtype=torch.uint8).view(3, 3, 4, 4))
    labels.copy_(torch.tensor([5, 6, 7]))
    ring.stamp(1, 2).fill_(9)
    sent = RingBatch(ring.id, 1, 2, 9, (3, 3, 4, 4), ["a", "b", "c"])
    got_images, got_labels, keys = pickle.loads(pickle.dumps(sent))
    assert torch.equal(got_images, images) and got_images.data_ptr() == images.data_ptr()  # a view, not a copy
    assert got_labels.tolist() == [5, 6, 7] and keys == ["a", "b", "c"]
    ring.stamp(1, 2).fill_(9 + PREFETCH + 2)  # the worker came round again before batch 9 was read
    with pytest.raises(RuntimeError, match="refilled ring slot 2"):
        pickle.loads(pickle.dumps(sent))
