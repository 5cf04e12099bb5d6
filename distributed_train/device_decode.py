"""`--decode device`: decode and augment the training JPEGs on the training device instead of in DataLoader workers.

The workers then read the shards, draw each image's crop and flip, and send each batch's JPEG bytes as one block
(`EncodedBatch`), decoding nothing. The training process decodes the whole batch at once with nvJPEG
(`torchvision.io.decode_jpeg(list, device="cuda")`) and crops, resizes and flips it on the GPU in a few kernels
(`crop_batch`), a batch ahead on a background thread. Meant for GPUs with few CPU cores each: two workers pack far
more images than a GPU trains on, but the decoding then shares the GPU with training, and on an H200 the trainer
waited for data 80% of the time where 12 decoding workers kept it waiting 1% (BENCHMARKS.md, GPU session 12). On a
CPU-only run the same code decodes in the training process (for tests, not for speed; the trainer warns).

The augmentation is the workers' (RandomResizedCrop + horizontal flip, same parameters), drawn in the worker from
the batch's own seed, so a resumed run draws the same crops; it is not bit-identical to the workers' path (another
decoder, a float resize without rounding back to uint8).
"""
from __future__ import annotations

import io
import queue
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from distributed_train.augment import ASPECT_RATIOS, RandomResizedCropFlip
from shard_tools.errors import damaged_sample


class EncodedBatch(NamedTuple):
    """A training batch before decoding: every JPEG concatenated into one uint8 tensor (one shared-memory block to
    send from the worker instead of one per image), each one's length, and its crop box and flip, drawn in the worker
    like the workers' own path draws them (so no random state is touched on the training process's threads)."""

    data: torch.Tensor
    lengths: torch.Tensor
    boxes: torch.Tensor  # (N, 4): top, left, height, width of each RandomResizedCrop
    flips: torch.Tensor  # (N,) bool
    urls: tuple = ()  # each JPEG's shard, to name it if it turns out not to decode
    size: int = 0  # the crops' size when the worker chose it (--progressive), else 0: DeviceAugment's own


class UnreadableJPEG(Exception):
    """The `index`-th JPEG of a batch cannot be read; the caller knows which sample that is."""

    def __init__(self, index: int, error: BaseException):
        super().__init__(index, error)
        self.index, self.error = index, error


def pack_jpegs(jpegs: list[bytes], crop_scale: tuple[float, float], urls: tuple = (), size: int = 0) -> EncodedBatch:
    """Draws each image's crop and flip from torch's random state, as the transforms of the workers' path do (the
    caller seeds it per batch)."""
    sampler = RandomResizedCropFlip(size, crop_scale, ASPECT_RATIOS)  # its box(): RandomResizedCrop's draws, faster
    boxes = []
    for index, jpeg in enumerate(jpegs):
        try:
            width, height = Image.open(io.BytesIO(jpeg)).size  # reads the header only: the size the crop needs
        except Exception as e:  # PIL signals a damaged header with several exception types
            raise UnreadableJPEG(index, e) from None
        boxes.append(sampler.box(height, width))
    flips = torch.rand(len(jpegs)) < 0.5
    data = torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8)
    return EncodedBatch(data, torch.tensor([len(j) for j in jpegs]), torch.tensor(boxes), flips, tuple(urls),
                        size)


class DeviceAugment:
    """EncodedBatch -> (float NCHW batch on `device`, pixel values on the 0-255 scale as `data.normalize` takes them,
    and the CUDA event that marks it ready, or None on a CPU).

    On a GPU the work runs on a side stream of its own. torchvision's decoder writes its output from an internal
    stream, so its output memory must come from a pool that no queued training kernel still uses: the side stream's
    pool (the caching allocator never hands one stream's freed blocks to another), drained before each batch.
    """

    def __init__(self, image_size: int, device: torch.device):
        self.size, self.device = image_size, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, batch: EncodedBatch) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if self.stream is None:
            return self.decode_and_augment(batch), None
        self.stream.synchronize()  # the previous batch's crops are done: their memory is free to be rewritten
        with torch.cuda.stream(self.stream):
            images = self.decode_and_augment(batch)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return images, ready

    def decode_and_augment(self, batch: EncodedBatch) -> torch.Tensor:
        jpegs = list(torch.split(batch.data, batch.lengths.tolist()))  # views into the one block, no copies
        images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device)
        return crop_batch(images, batch.boxes, batch.flips, batch.size or self.size)


def crop_batch(images: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) images of any sizes -> float (N, 3, size, size): each image's crop box resized to size x size
    and flipped where `flips` says, for the whole batch in a few kernels, whatever its size.

    The resize is one `roi_align` call over the padded batch. It averages ceil(box / size) x ceil(box / size)
    bilinear samples per output pixel (a box filter over the source pixels an output pixel covers), close to the
    antialiased resize of `crop_each`, and plain bilinear interpolation for upscales. The flips are one gather.
    """
    device = images[0].device
    n = len(images)
    columns = torch.arange(size, device=device).expand(n, size)
    columns = torch.where(flips.to(device)[:, None], columns.flip(1), columns)
    top, left, height, width = boxes.to(device, torch.float32).unbind(1)
    rois = torch.stack([torch.arange(n, device=device, dtype=torch.float32), left, top, left + width, top + height], 1)
    out = roi_align(pad_to_batch(images).float(), rois, output_size=size, sampling_ratio=-1, aligned=True)
    return out.gather(3, columns[:, None, None, :].expand_as(out))


def pad_to_batch(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 (3, H, W) images -> one (N, 3, max H, max W) batch. Each image's last row and column fill its padding:
    `roi_align` interpolates between an image's last pixel and the one past it for samples near its bottom or
    right edge, which must then be the edge pixel again (as `F.interpolate` clamps), not padding."""
    sizes = [image.shape[1:] for image in images]
    batch = images[0].new_empty((len(images), 3, max(h for h, _ in sizes), max(w for _, w in sizes)))
    for i, (image, (h, w)) in enumerate(zip(images, sizes)):
        batch[i, :, :h, :w] = image
    if all(size == batch.shape[2:] for size in sizes):
        return batch
    heights, widths = torch.tensor(sizes, device=batch.device).unbind(1)
    rows = torch.minimum(torch.arange(batch.shape[2], device=batch.device), heights[:, None] - 1)
    cols = torch.minimum(torch.arange(batch.shape[3], device=batch.device), widths[:, None] - 1)
    batch = batch.gather(2, rows[:, None, :, None].expand_as(batch))
    return batch.gather(3, cols[:, None, None, :].expand_as(batch))


def crop_each(images: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """What `crop_batch` does, image by image: crop, flip and an antialiased bilinear resize (as the workers' path
    does, in float). Four small kernels per image launched from Python; the reference the tests and bench_gpu.py
    compare `crop_batch` with."""
    out = []
    for image, (top, left, height, width), flip in zip(images, boxes.tolist(), flips.tolist()):
        crop = image[:, top:top + height, left:left + width]
        if flip:
            crop = crop.flip(-1)
        out.append(F.interpolate(crop[None].float(), size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False))
    return torch.cat(out)


def hand_over(images: torch.Tensor, ready: torch.cuda.Event | None) -> torch.Tensor:
    """Make the current (training) stream wait for a decoded batch, and keep its memory from being reused by the
    side stream until the training stream is done with it."""
    if ready is not None:
        stream = torch.cuda.current_stream(images.device)
        stream.wait_event(ready)
        images.record_stream(stream)
    return images


def first_undecodable(batch: EncodedBatch) -> int | None:
    """Index of the first JPEG of the batch that the CPU decoder rejects (a batched decode does not say which)."""
    for index, jpeg in enumerate(torch.split(batch.data, batch.lengths.tolist())):
        try:
            decode_jpeg(jpeg, mode=ImageReadMode.RGB)
        except RuntimeError:
            return index
    return None


_END = object()


class DevicePrefetcher:
    """(images, labels, keys) from a loader of (EncodedBatch, labels, keys), decoded `depth` batches ahead on a
    background thread.

    torchvision's nvJPEG call returns only when its batch is decoded, so on the training thread it would stop kernel
    launches for the whole decode; on this thread it overlaps the training steps (torch releases the GIL inside
    the decoder and while launching kernels). `close()` stops the thread; batches read ahead are dropped, which
    keeps resuming exact (the trainer counts only the batches it consumed).
    """

    def __init__(self, loader, augment: DeviceAugment, depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._produce, args=(loader, augment), daemon=True,
                                       name="device-decode")
        self.thread.start()

    def _produce(self, loader, augment: DeviceAugment) -> None:
        if augment.device.type == "cuda":
            torch.cuda.set_device(augment.device)  # a new thread starts on GPU 0, not on this rank's GPU
        try:
            for encoded, labels, keys in loader:
                if self.stopping.is_set():
                    return
                try:
                    decoded = augment(encoded)
                except RuntimeError as e:  # a damaged JPEG, or one the device's decoder does not take
                    bad = first_undecodable(encoded)
                    if bad is None:
                        raise
                    raise damaged_sample(keys[bad], encoded.urls[bad] if encoded.urls else None, e) from None
                self._put((*decoded, labels, keys))
        except BaseException as error:  # re-raised on the training thread
            self._put(error)
        self._put(_END)

    def _put(self, item) -> None:
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        while (item := self.queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            images, ready, labels, keys = item
            yield hand_over(images, ready), labels, keys

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
