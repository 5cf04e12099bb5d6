"""Webdataset pipelines for training and evaluation, with the same number of steps on every rank.

How one epoch's samples reach the ranks (no rank ever waits for another in an all-reduce, no sample is read twice):

    shards, in an order reshuffled from (seed, epoch)      -> one long sequence of samples (counts from the manifest)
    -> cut into consecutive ranges, one per (rank, worker) slot, rank-major, so nodes and then workers get neighbouring
       shards (webdataset's split_by_node -> split_by_worker, but at sample granularity, so uneven shards or fewer
       shards than slots still give every slot exactly its share)
    -> each slot: the samples of its ranges (ranged reads of exactly their bytes through each shard's sample index,
       or the tar streamed from its start when there is none) -> shuffle buffer -> raw batches -> skip (resume)
       -> decode (torchvision.io, libjpeg-turbo) + augment -> uint8 batch (the trainer's in a ring of shared-memory
          slots: batch_ring.py)
          (or, with --decode device, the batch's JPEG bytes in one block: device_decode.py decodes them on the GPU)

One training DataLoader serves a whole run (run_train_loader): its persistent workers cut each epoch's slots
themselves, from the (epoch, skip) an EpochCursor shares with them.

Training uses floor(samples / world / batch) batches per rank, so an epoch reads each sample at most once; only a
dataset smaller than one batch on every rank wraps around. Evaluation splits every sample over the slots exactly
once, with partial last batches. Batches stay uint8 until `normalize` on the device: 4x less to copy.
"""
from __future__ import annotations

import multiprocessing
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from torchvision.io import ImageReadMode
from torchvision.transforms import v2

from distributed_train.augment import seeded_cpu_rng, train_transform
from distributed_train.batch_ring import PREFETCH, BatchRing
from distributed_train.device_decode import UnreadableJPEG, pack_jpegs
from distributed_train.schedule import crop_size_at, train_batches_per_rank
from shard_tools.errors import ShardReadError, damaged_sample
from shard_tools.manifest import Manifest, ShardInfo
from shard_tools.indexed_reader import RangeReader
from shard_tools.redaction import redact

# torchvision 0.29 deprecates torchvision.io's decoders in favour of TorchCodec, which is not a dependency here.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning)

EVAL_RESIZE_RATIO = 0.875  # resize to size/0.875 then centre-crop `size`, as torchvision's reference scripts do


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of one shard, in the order they are stored."""

    url: str
    start: int
    stop: int
    shard: ShardInfo

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.shard.num_samples


# ---- which samples each (rank, worker) slot reads ------------------------------------------------------------------
def cut_ranges(shards: list[tuple[str, ShardInfo]], lengths: list[int]) -> list[list[Piece]]:
    """Consecutive ranges of the concatenated shards, one per entry of `lengths`, wrapping around at the end."""
    if sum(shard.num_samples for _, shard in shards) == 0:
        raise ValueError("the split has no samples")
    slots, si, offset = [], 0, 0
    for length in lengths:
        pieces = []
        while length > 0:
            url, shard = shards[si]
            n = shard.num_samples
            take = min(length, n - offset)
            if take > 0:
                pieces.append(Piece(url, offset, offset + take, shard))
            length, offset = length - take, offset + take
            if offset >= n:
                si, offset = (si + 1) % len(shards), 0
        slots.append(pieces)
    return slots


def even_split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def batches_before(consumed: int, worker: int, num_workers: int) -> int:
    """Batches worker `worker` produced when the rank has consumed `consumed` (the DataLoader takes them in turn)."""
    return consumed // num_workers + (worker < consumed % num_workers)


def epoch_shards(manifest: Manifest, split: str, seed: int, epoch: int, shuffle: bool) -> list[tuple[str, ShardInfo]]:
    shards = [(manifest.shard_url(shard), shard) for shard in manifest.split(split).shards]
    if shuffle:
        random.Random(f"shards-{seed}-{epoch}").shuffle(shards)
    return shards


# ---- one slot's stream ---------------------------------------------------------------------------------------------
@dataclass
class PieceReader:
    """Reads a Piece from a local file, http(s) or s3: through the shard's sample index when it has one, reading
    only the piece's own bytes (shard_tools.indexed_reader), else sequentially (shard_tools.shard_reader). Failed
    reads are retried; a shard that still fails is skipped and counted, or raises (`on_error`). With `verify`
    (--verify-shards), a piece that covers a whole shard is checked against the manifest's sha256."""

    on_error: str = "fail"
    verify: bool = False
    skipped: Any = None  # a multiprocessing.Value shared with the DataLoader workers
    use_index: bool = True
    _reader: RangeReader | None = field(default=None, init=False, repr=False, compare=False)

    def __call__(self, piece: Piece) -> Iterator[dict]:
        if self._reader is None:  # made in the process that reads: it caches the indexes that process loads
            self._reader = RangeReader(on_error=self.on_error, verify=self.verify, skip_counter=self.skipped,
                                       use_index=self.use_index)
        return self._reader(piece.url, piece.shard, piece.start, piece.stop)


def read_pieces(pieces: list[Piece], count: int, read_piece: Callable[[Piece], Iterator[dict]], repeat: bool):
    """Raw samples of `pieces`, in order, `count` in all. With `repeat`, a shortfall (a shard skipped after read
    errors) is made up by reading the pieces again, so the rank still runs its agreed number of steps."""
    produced = 0
    while produced < count:
        before = produced
        for p in pieces:
            for sample in read_piece(p):
                yield sample
                produced += 1
                if produced == count:
                    return
        if not repeat:
            return  # evaluation: what could be read is all there is, each sample once
        if produced == before:
            raise ShardReadError("no sample could be read from this worker's shards: "
                                 + redact(", ".join(sorted({p.url for p in pieces}))))


class Preprocess:
    """JPEG bytes -> uint8 CHW tensor. Training: RandomResizedCrop + flip (+ the recipe's extras, augment.py);
    evaluation: resize to image_size / crop_pct, then centre crop."""

    def __init__(self, train: bool, image_size: int, min_crop_scale: float = 0.25, *,
                 crop_pct: float = EVAL_RESIZE_RATIO, **extras):
        self.image_size, self.crop_scale = image_size, (min_crop_scale, 1.0)
        if train:
            self.transform = train_transform(image_size, min_crop_scale, **extras)
        else:
            self.transform = v2.Compose([
                v2.Resize(round(image_size / crop_pct), antialias=True),
                v2.CenterCrop(image_size),
            ])

    def __call__(self, jpeg: bytes) -> torch.Tensor:
        # bytearray: torch.frombuffer wants a writable buffer; the copy is a few KB
        return self.transform(decode_rgb(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)))


def decode_rgb(data: torch.Tensor) -> torch.Tensor:
    """JPEG bytes (a uint8 CPU tensor) -> uint8 RGB CHW: decode_jpeg(data, mode=ImageReadMode.RGB), through the op it
    wraps. The wrapper logs API usage and issues its deprecation warning on every call, ~20 us of the ~260 us a 160 px
    photo takes (benchmarks/bench_peers.py, a0); tests/test_data.py checks that the two agree."""
    return torch.ops.image.decode_jpeg(data, ImageReadMode.RGB.value, False)  # False: no EXIF rotation, as its default


class SlotStream(IterableDataset):
    """What one rank streams in one epoch: worker w of the DataLoader reads slot `slots[w]`."""

    def __init__(self, slots: list[list[Piece]], counts: list[int], preprocess: Preprocess, batch_size: int,
                 train: bool, seed: tuple, shuffle_buffer: int = 1000, skip_batches: int = 0,
                 read_piece: Callable[[Piece], Iterator[dict]] = PieceReader(), encoded: bool = False,
                 ring: BatchRing | None = None):
        self.slots, self.counts, self.preprocess = slots, counts, preprocess
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.shuffle_buffer, self.skip_batches, self.read_piece = shuffle_buffer, skip_batches, read_piece
        self.encoded = encoded  # send the JPEG bytes undecoded (--decode device)
        self.ring = ring  # None: every batch in a fresh shared-memory block

    def __iter__(self):
        info = get_worker_info()
        num_workers = info.num_workers if info else 1
        # The DataLoader takes batch j from worker j % W. Resuming after k batches, worker 0 must play the slot that
        # would have produced batch k, so the order of the remaining batches is the uninterrupted run's.
        worker = ((info.id if info else 0) + self.skip_batches) % num_workers
        samples = read_pieces(self.slots[worker], self.counts[worker], self.read_piece, repeat=self.train)
        if self.train:
            samples = shuffled(samples, self.seed, worker, self.shuffle_buffer)
        raw_batches = wds.batched(self.batch_size, collation_fn=None, partial=not self.train)(samples)
        skip = batches_before(self.skip_batches, worker, num_workers)
        for index, raw in enumerate(raw_batches):
            if index >= skip:  # skipped batches are never decoded: resuming mid-epoch is cheap
                yield self.make_batch(raw, (*self.seed, worker, index))

    def make_batch(self, raw: list[dict], seed: tuple):
        # Augmentation randomness depends only on (seed, epoch, rank, worker, batch index): a resumed run draws the
        # same crops as an uninterrupted one.
        labels, keys = [int(s["cls"]) for s in raw], [s["__key__"] for s in raw]
        with seeded_cpu_rng(seed):
            if self.encoded:  # --decode device: crops drawn here, decoded on the GPU
                try:
                    images = pack_jpegs([s["jpg"] for s in raw], self.preprocess.crop_scale,
                                        tuple(s.get("__url__") for s in raw), self.preprocess.image_size)
                except UnreadableJPEG as e:
                    bad = raw[e.index]
                    raise damaged_sample(bad["__key__"], bad.get("__url__"), e.error) from None
            elif self.ring is not None and get_worker_info() is not None:
                return self.ring.put([self.decode(s) for s in raw], labels, keys)  # the trainer: batch_ring.py
            else:
                # default_collate stacks straight into shared memory inside a worker: no extra copy to send the batch
                images = default_collate([self.decode(s) for s in raw])
        return images, torch.tensor(labels, dtype=torch.long), keys

    def decode(self, sample: dict) -> torch.Tensor:
        try:
            return self.preprocess(sample["jpg"])
        except RuntimeError as e:  # torchvision's decoder on corrupt or truncated JPEG data
            raise damaged_sample(sample["__key__"], sample.get("__url__"), e) from None


def shuffled(samples, seed: tuple, worker: int, buffer: int):
    """A training slot's samples in the order they are batched: webdataset's shuffle buffer, seeded from
    (seed, epoch, rank) and the worker. The order depends on the positions only, never on the samples' bytes."""
    rng = random.Random("shuffle-" + "-".join(map(str, (*seed, worker))))
    return wds.shuffle(buffer, initial=buffer, rng=rng)(samples)


def slot_order(samples: list, seed: tuple, worker: int, buffer: int) -> list:
    return list(shuffled(iter(samples), seed, worker, buffer))


# ---- loaders -------------------------------------------------------------------------------------------------------
class EpochCursor:
    """Which epoch the workers stream next, and how many of its batches they skip: set by the training process
    before each `iter(loader)`, read by the workers when the DataLoader re-creates their iterators. Shared memory,
    so persistent workers (made once per run) see every epoch's values."""

    def __init__(self, epoch: int = 0, skip: int = 0):
        self.epoch, self.skip = multiprocessing.Value("q", epoch), multiprocessing.Value("q", skip)

    def set(self, epoch: int, skip: int) -> None:
        self.epoch.value, self.skip.value = epoch, skip


class TrainStream(IterableDataset):
    """One rank's training samples for the epoch `cursor` names, cut into slots in the worker itself: one dataset (and
    one set of workers) serves every epoch of a run. `planned`: epochs whose slots were cut elsewhere, as
    {epoch: (slots rank-major, samples per worker)} (replan.py: the rest of an epoch begun under another layout)."""

    def __init__(self, manifest: Manifest, cursor: EpochCursor, *, rank: int, world_size: int, batch_size: int,
                 accum_steps: int, image_size: int, workers: int, seed: int, min_crop_scale: float = 0.25,
                 shuffle_buffer: int = 1000, read_piece=PieceReader(), decode_on_device: bool = False,
                 planned: dict | None = None, extras: dict | None = None, progressive: tuple | None = None,
                 reuse_buffers: bool = False):
        self.manifest, self.cursor, self.rank, self.world_size = manifest, cursor, rank, world_size
        self.batch_size, self.seed, self.shuffle_buffer, self.read_piece = batch_size, seed, shuffle_buffer, read_piece
        self.slots_per_rank = max(1, workers)
        self.steps = train_batches_per_rank(manifest.split("train").num_samples, world_size, batch_size, accum_steps)
        self.image_size, self.min_crop_scale = image_size, min_crop_scale
        self.extras = extras or {}  # augment.train_transform's: auto_augment, random_erase, fill
        self.progressive = progressive  # (smallest, largest crop size, epochs of the run), or None: image_size
        self._preprocess: dict[int, Preprocess] = {}
        self.decode_on_device, self.planned = decode_on_device, planned or {}
        largest = max(image_size, *progressive[:2]) if progressive else image_size
        self.ring = BatchRing(workers, batch_size, largest) \
            if reuse_buffers and workers > 0 and not decode_on_device else None

    def preprocess(self, epoch: int) -> Preprocess:
        """The augmentation of `epoch`: its crop size is --progressive's for that epoch, else image_size."""
        size = crop_size_at(epoch, *self.progressive) if self.progressive else self.image_size
        if size not in self._preprocess:
            self._preprocess[size] = Preprocess(True, size, self.min_crop_scale, **self.extras)
        return self._preprocess[size]

    def slots(self, epoch: int) -> tuple[list[list[Piece]], list[int], tuple]:
        """This rank's slots of `epoch`, the samples per worker, and the seed of their shuffles."""
        if epoch in self.planned:
            slots, per_worker = self.planned[epoch]
            seed = (self.seed, epoch, self.rank, "rest")
        else:
            per_worker = [b * self.batch_size for b in even_split(self.steps, self.slots_per_rank)]
            slots = cut_ranges(epoch_shards(self.manifest, "train", self.seed, epoch, shuffle=True),
                               per_worker * self.world_size)
            seed = (self.seed, epoch, self.rank)
        return slots[self.rank * self.slots_per_rank:(self.rank + 1) * self.slots_per_rank], per_worker, seed

    def micro_batches(self, epoch: int) -> int:
        return sum(self.planned[epoch][1]) // self.batch_size if epoch in self.planned else self.steps

    def epoch_stream(self, epoch: int, skip: int) -> SlotStream:
        mine, per_worker, seed = self.slots(epoch)
        # At an epoch's end workers finish one by one and the DataLoader gives their requests to the others, which
        # could then run further ahead than the ring allows (batch_ring.py); with batch counts within one of each
        # other, no worker has more than PREFETCH batches left when the first one finishes.
        balanced = max(per_worker) - min(per_worker) <= self.batch_size
        return SlotStream(mine, per_worker, self.preprocess(epoch), self.batch_size, train=True, seed=seed,
                          shuffle_buffer=self.shuffle_buffer, skip_batches=skip, read_piece=self.read_piece,
                          encoded=self.decode_on_device, ring=self.ring if balanced else None)

    def __iter__(self):
        return iter(self.epoch_stream(self.cursor.epoch.value, self.cursor.skip.value))


def _loader(stream: IterableDataset, workers: int, pin_memory: bool, persistent: bool = False) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=PREFETCH if workers else None, persistent_workers=persistent and workers > 0)


def run_train_loader(manifest: Manifest, cursor: EpochCursor, *, workers: int, pin_memory: bool = False,
                     **stream_kw) -> DataLoader:
    """The one training loader of a rank for a whole run: its workers live across epochs. Before each
    `iter(loader)`, `cursor.set(epoch, skip)` chooses what that pass streams (`TrainStream` takes the other
    arguments). Its batches live in a ring of shared-memory slots: each is valid until the next-but-one is asked for
    (batch_ring.py)."""
    return _loader(TrainStream(manifest, cursor, workers=workers, reuse_buffers=True, **stream_kw), workers,
                   pin_memory, persistent=True)


def train_loader(manifest: Manifest, *, rank: int, world_size: int, batch_size: int, accum_steps: int,
                 image_size: int, workers: int, seed: int, epoch: int, skip_batches: int = 0,
                 min_crop_scale: float = 0.25, shuffle_buffer: int = 1000, pin_memory: bool = False,
                 read_piece=PieceReader(), decode_on_device: bool = False, reuse_buffers: bool = False,
                 **augment) -> tuple[DataLoader, int]:
    """A loader of one rank for one epoch, and the number of micro-batches it yields (equal on every rank).
    With `decode_on_device` its batches hold EncodedBatch instead of images (see device_decode.py). With
    `reuse_buffers`, a batch is valid only until the next-but-one is asked for (batch_ring.py). `augment`:
    TrainStream's `extras` and `progressive`."""
    stream = TrainStream(manifest, EpochCursor(epoch, skip_batches), rank=rank, world_size=world_size,
                         batch_size=batch_size, accum_steps=accum_steps, image_size=image_size, workers=workers,
                         seed=seed, min_crop_scale=min_crop_scale, shuffle_buffer=shuffle_buffer,
                         read_piece=read_piece, decode_on_device=decode_on_device, reuse_buffers=reuse_buffers,
                         **augment)
    return _loader(stream, workers, pin_memory), stream.steps - skip_batches


def eval_loader(manifest: Manifest, split: str, *, rank: int, world_size: int, batch_size: int,
                image_size: int, workers: int, pin_memory: bool = False, read_piece=PieceReader(),
                crop_pct: float = EVAL_RESIZE_RATIO) -> DataLoader:
    """Every sample of `split` exactly once across all ranks and workers; ranks may get different batch counts."""
    slots_per_rank = max(1, workers)
    num_samples = manifest.split(split).num_samples
    counts = even_split(num_samples, world_size * slots_per_rank)
    slots = cut_ranges(epoch_shards(manifest, split, 0, 0, shuffle=False), counts)
    lo, hi = rank * slots_per_rank, (rank + 1) * slots_per_rank
    stream = SlotStream(slots[lo:hi], counts[lo:hi], Preprocess(False, image_size, crop_pct=crop_pct),
                        batch_size, train=False, seed=(0,), read_piece=read_piece)
    return _loader(stream, workers, pin_memory)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW on the device -> float, on the 0-1 scale, standardised with the manifest's channel stats."""
    return images.float().div_(255).sub_(mean).div_(std)


def stats_tensors(mean: list[float], std: list[float], device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))
