"""The trainer's data pipeline: equal steps per rank, no sample twice in an epoch, validation exactly once, resume.

Ranks are simulated in one process by building each rank's loader (with real DataLoader worker processes), which is
exactly what each torchrun process does; the multi-process runs are in test_train.py.
"""
import re
from collections import Counter

import pytest
import torch

from distributed_train.data import (Piece, batches_before, cut_ranges, eval_loader, even_split,
                                    train_batches_per_rank, train_loader)
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
