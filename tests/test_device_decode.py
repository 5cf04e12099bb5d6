"""--decode device on the CPU: the packed batch, the seeded crops and flips, and the read-ahead thread."""
import io
import shutil
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.io import decode_jpeg

from distributed_train.augment import ASPECT_RATIOS
from distributed_train.data import train_loader
from distributed_train.device_decode import (DeviceAugment, DevicePrefetcher, crop_batch, crop_each, pack_jpegs,
                                             pad_to_batch)
from mushroom_demo.painter import smooth_noise
from shard_tools.manifest import Manifest
from shard_tools.errors import ShardReadError, one_line as error_line

CPU = torch.device("cpu")
SCALE = (0.25, 1.0)


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)  # left-to-right ramp: a flip shows
    pixels[..., 1:] = rng.integers(0, 255, (height, width, 2), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def packed(jpegs: list[bytes], seed: int):
    torch.manual_seed(seed)  # as SlotStream.make_batch seeds each batch
    return pack_jpegs(jpegs, SCALE)


@pytest.fixture(scope="module")
def jpegs():
    return [jpeg(w, h, i) for i, (w, h) in enumerate([(80, 60), (60, 80), (64, 64), (100, 70), (70, 100), (90, 90)])]


def test_packed_batch_splits_back_into_the_original_files(jpegs):
    batch = packed(jpegs, 7)
    parts = torch.split(batch.data, batch.lengths.tolist())
    assert [bytes(p.numpy()) for p in parts] == jpegs
    assert batch.boxes.shape == (len(jpegs), 4) and batch.flips.shape == (len(jpegs),)


def test_crops_and_flips_are_the_seeded_random_resized_crop(jpegs):
    batch = packed(jpegs, 11)
    images, ready = DeviceAugment(32, CPU)(batch)
    assert ready is None and images.shape == (len(jpegs), 3, 32, 32) and images.dtype == torch.float32

    # The same draws made independently on the decoded images: one RandomResizedCrop box per image, then one flip
    # coin per image.
    decoded = [decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8)) for j in jpegs]
    torch.manual_seed(11)
    boxes = [transforms.RandomResizedCrop.get_params(img, SCALE, ASPECT_RATIOS) for img in decoded]
    flips = (torch.rand(len(jpegs)) < 0.5).tolist()
    assert batch.boxes.tolist() == [list(b) for b in boxes] and batch.flips.tolist() == flips
    assert 0 < sum(flips) < len(flips), "pick a seed that flips some images and not others"
    assert torch.equal(images, crop_batch(decoded, batch.boxes, batch.flips, 32))
    for out, flip in zip(images, flips):
        ramp = out[0].mean(0)  # the red ramp rises left to right unless flipped
        assert (ramp[-1] < ramp[0]) == flip


def smooth_images(sizes, seed: int = 0) -> list[torch.Tensor]:
    """Photo-like uint8 (3, H, W) images: smooth colour fields with one sharp vertical edge."""
    rng = np.random.default_rng(seed)
    images = []
    for h, w in sizes:
        pixels = np.stack([smooth_noise(rng, h, w, 4) for _ in range(3)]) * 255
        pixels[:, :, w // 3:] *= 0.4
        images.append(torch.from_numpy(pixels.clip(0, 255).astype(np.uint8)))
    return images


def random_boxes(images, seed: int):
    torch.manual_seed(seed)
    boxes = torch.tensor([transforms.RandomResizedCrop.get_params(img, SCALE, ASPECT_RATIOS) for img in images])
    return boxes, torch.rand(len(images)) < 0.5


@pytest.mark.parametrize("size, mean_limit, p99_limit", [(128, 0.01, 0.01), (48, 1.5, 8.0)])
def test_the_batched_crop_matches_the_per_image_path(size, mean_limit, p99_limit):
    """One roi_align for the whole batch against a crop + antialiased resize per image. Upscaled crops (to 128 px)
    are the same bilinear interpolation inside; only their outer pixels differ, where roi_align samples past the
    crop's edge into the image and the per-image path clamps at it. Downscaled ones (to 48 px) differ by the
    filter: roi_align averages a box of samples, the per-image path weighs with a triangle."""
    images = smooth_images([(96, 128), (128, 96), (110, 110), (96, 150)])
    boxes, flips = random_boxes(images, 3)
    batched, each = crop_batch(images, boxes, flips, size), crop_each(images, boxes, flips, size)
    assert batched.shape == each.shape == (4, 3, size, size) and batched.dtype == torch.float32
    inner = (batched - each)[:, :, 1:-1, 1:-1].abs().flatten()
    assert inner.mean() <= mean_limit and inner.quantile(0.99) <= p99_limit
    assert (batched - each).abs().max() < 128  # outer pixels too: nothing sampled from the padding


def test_strongly_downscaled_crops_are_antialiased():
    """Crops of pixel noise shrunk 3-6x: an antialiased resize averages the noise away, plain bilinear sampling (one
    sample per output pixel) keeps it. The batched path must average as the per-image path does."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8)
              for h, w in [(96, 128), (128, 96), (110, 110), (96, 150)]]
    boxes, flips = random_boxes(images, 3)
    batched, each = crop_batch(images, boxes, flips, 16), crop_each(images, boxes, flips, 16)
    assert (batched - each)[:, :, 1:-1, 1:-1].abs().mean() < 10  # 5.4 here; 37 without antialiasing
    assert batched.std() < 1.5 * each.std()  # 14.8 vs 11.0 here; 49.6 without


def test_an_image_crops_the_same_alone_and_in_a_batch_of_larger_ones():
    """Padding to the largest image repeats each image's edge: a crop that touches the bottom-right corner of a
    small image samples the image, not the padding, however large its batch-mates are."""
    small, large = smooth_images([(40, 50), (90, 120)], seed=1)
    box = torch.tensor([[20, 30, 20, 20]])  # bottom-right corner of `small`, upscaled 20 -> 64
    no_flip = torch.tensor([False])
    alone = crop_batch([small], box, no_flip, 64)
    together = crop_batch([small, large], torch.cat([box, box]), torch.tensor([False, False]), 64)
    assert torch.equal(together[0], alone[0])
    # Both paths clamp at the image's own edge. They differ only along the crop's top and left edges, which lie
    # inside the image: the 2 outer pixels there sample past the crop's edge (upscaled 3.2x).
    assert torch.allclose(alone[..., 2:, 2:], crop_each([small], box, no_flip, 64)[..., 2:, 2:], atol=1e-3)


def test_pad_to_batch_repeats_each_images_last_row_and_column():
    small, large = (torch.arange(3 * h * w, dtype=torch.uint8).view(3, h, w) for h, w in ((2, 3), (4, 5)))
    batch = pad_to_batch([small, large])
    assert batch.shape == (2, 3, 4, 5) and torch.equal(batch[1], large)
    assert torch.equal(batch[0, :, :2, :3], small)
    assert torch.equal(batch[0, :, :, 3:], batch[0, :, :, 2:3].expand(3, 4, 2))  # last column, repeated
    assert torch.equal(batch[0, :, 2:, :], batch[0, :, 1:2, :].expand(3, 2, 5))  # last row, repeated


def test_flips_mirror_the_crop():
    images = smooth_images([(64, 80), (80, 64)], seed=2)
    boxes, _ = random_boxes(images, 4)
    straight = crop_batch(images, boxes, torch.tensor([False, False]), 40)
    mixed = crop_batch(images, boxes, torch.tensor([True, False]), 40)
    assert torch.equal(mixed[0], straight[0].flip(-1)) and torch.equal(mixed[1], straight[1])


def test_same_seed_same_batch_other_seed_other_crops(jpegs):
    augment = DeviceAugment(32, CPU)
    a, _ = augment(packed(jpegs, 1))
    b, _ = augment(packed(jpegs, 1))
    c, _ = augment(packed(jpegs, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= a.min() and a.max() <= 255


def encoded_batches(jpegs, count):
    for i in range(count):
        yield packed(jpegs, i), torch.full((len(jpegs),), i), [f"key-{i}"] * len(jpegs)


def test_prefetcher_yields_every_batch_in_order_decoded(jpegs):
    augment = DeviceAugment(32, CPU)
    prefetcher = DevicePrefetcher(encoded_batches(jpegs, 5), augment)
    out = list(prefetcher)
    prefetcher.close()
    assert [int(labels[0]) for _, labels, _ in out] == [0, 1, 2, 3, 4]
    assert all(torch.equal(images, augment(packed(jpegs, i))[0]) for i, (images, _, _) in enumerate(out))


def test_prefetcher_raises_the_loaders_error_on_the_training_thread(jpegs):
    def failing():
        yield from encoded_batches(jpegs, 2)
        raise OSError("shard unreadable")

    prefetcher = DevicePrefetcher(failing(), DeviceAugment(32, CPU))
    got = []
    with pytest.raises(OSError, match="shard unreadable"):
        for batch in prefetcher:
            got.append(batch)
    assert len(got) == 2
    prefetcher.close()


def test_close_mid_stream_stops_the_thread(jpegs):
    def endless():
        while True:
            yield from encoded_batches(jpegs, 1)

    prefetcher = DevicePrefetcher(endless(), DeviceAugment(32, CPU), depth=2)
    for i, _ in enumerate(prefetcher):
        if i == 3:
            break
    prefetcher.close()
    assert not prefetcher.thread.is_alive()
    assert not any(t.name == "device-decode" for t in threading.enumerate())


def test_a_jpeg_that_only_fails_to_decode_is_named_by_its_key(jpegs):
    """A sound header over damaged data passes the worker (it reads headers only); the batched decode then fails
    without saying which image, so the prefetcher finds it and names its key."""
    damaged = jpegs[2][: len(jpegs[2]) // 2]  # truncated: header intact
    torch.manual_seed(0)
    batch = pack_jpegs([jpegs[0], jpegs[1], damaged], SCALE, ("a.tar", "a.tar", "b.tar"))
    prefetcher = DevicePrefetcher(iter([(batch, torch.zeros(3), ["k0", "k1", "k2"])]), DeviceAugment(32, CPU))
    with pytest.raises(ShardReadError, match=r"^sample k2 of b.tar cannot be decoded \(.+\): the shard is damaged"):
        list(prefetcher)
    prefetcher.close()


def test_a_damaged_header_is_named_by_the_worker_with_its_shard(damaged_shards):
    loader, _ = train_loader(Manifest.read(str(damaged_shards)), rank=0, world_size=1,
                             batch_size=4, accum_steps=1, image_size=24, workers=1, seed=0, epoch=0,
                             decode_on_device=True)
    with pytest.raises(ShardReadError) as e:
        list(loader)
    assert "sample 000000003 of " in error_line(e.value) and "train-000000.tar cannot be decoded" in error_line(e.value)


def test_damage_past_the_header_is_named_with_its_shard_after_the_dataloader(uneven_shards, tmp_path):
    """The whole path: the worker packs a JPEG whose header is sound, the batched decode fails, and the error names
    the sample and the shard it came from (carried through the DataLoader in the EncodedBatch)."""
    data = tmp_path / "shards"
    shutil.copytree(uneven_shards, data)
    shard = data / "train-000000.tar"
    raw = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".jpg")][3]
    half = member.offset_data + member.size // 2
    raw[half:member.offset_data + member.size] = bytes(member.offset_data + member.size - half)  # same size
    shard.write_bytes(raw)
    loader, _ = train_loader(Manifest.read(str(data)), rank=0, world_size=1, batch_size=4, accum_steps=1,
                             image_size=24, workers=1, seed=0, epoch=0, decode_on_device=True)
    prefetcher = DevicePrefetcher(loader, DeviceAugment(24, CPU))
    with pytest.raises(ShardReadError) as e:
        list(prefetcher)
    prefetcher.close()
    assert error_line(e.value).startswith("sample 000000003 of ") and "train-000000.tar cannot be decoded" in str(e.value)
