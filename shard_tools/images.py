"""One image file: open safely, orient, convert to RGB, shrink, encode; and a perceptual hash for near-duplicates.

Everything here runs inside worker processes, so it imports only PIL and numpy and never raises for bad input:
a file that cannot become a sample gives a `SkipImage` with a reason that ends up in OUT/skipped.csv.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not be padded with grey
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's default decompression-bomb limit (~89 megapixels)
HASH_SIDE = 8  # dHash of 8x8 gradients = 64 bits
EXIF_ORIENTATION = 0x0112


class SkipImage(Exception):
    """This file cannot become a sample; str(e) is the reason written to skipped.csv."""


@dataclass
class StoredImage:
    data: bytes  # the JPEG bytes that go into the shard
    histogram: list[int]  # 3 x 256 pixel-value counts (R, G, B) of exactly what decoding `data` gives
    passthrough: bool  # True when `data` is the original file, byte for byte
    phash: int  # perceptual hash of the picture, for near-duplicate grouping


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise SkipImage("file not found") from None
    except OSError as e:
        raise SkipImage(f"cannot read file: {e}") from None


def open_image(data: bytes, max_pixels: int | None) -> Image.Image:
    """Image.open with the pixel limit turned into an error (PIL only warns between 1x and 2x the limit)."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SkipImage(f"image is larger than the pixel limit of {max_pixels} (--max-pixels)") from None
    except UnidentifiedImageError:
        raise SkipImage("not an image file PIL can read") from None
    except OSError as e:
        raise SkipImage(f"unreadable or truncated image: {e}") from None


def orient(img: Image.Image) -> None:
    """Apply the EXIF orientation in place (a no-op without one, so no copy of the pixels)."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as e:  # malformed EXIF blocks raise all sorts of errors
        raise SkipImage(f"cannot apply the EXIF orientation: {e}") from None


def load(img: Image.Image) -> Image.Image:
    """Decode all pixels now, so truncated or corrupt data fails here with a reason."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as e:  # PIL signals broken streams with all three
        raise SkipImage(f"unreadable or truncated image data: {e}") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode (L, P, CMYK, RGBA, I;16, ...) -> RGB. Transparency is composited onto white, not dropped to black."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale PNG: scale to 8 bits, not clip
        return Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def shrunk_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the shorter side at most `size`, aspect kept; never larger than the input."""
    short = min(width, height)
    if short <= size:
        return width, height
    scale = size / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def is_passthrough(img: Image.Image, size: int) -> bool:
    """The original bytes are already what we would store: an RGB (YCbCr) baseline/progressive JPEG within the size
    and with no EXIF rotation pending (the trainer's decode_jpeg ignores EXIF, so a rotation must be baked in)."""
    return (
        img.format == "JPEG"  # not MPO (phones' multi-picture files) or anything else behind a .jpg name
        and img.mode == "RGB"
        and min(img.size) <= size
        and img.getexif().get(EXIF_ORIENTATION, 1) == 1
    )


def prepare(path: str, size: int, quality: int, max_pixels: int | None) -> StoredImage:
    """The stored form of one file, from ONE decode: its original bytes when already fine, else oriented, RGB,
    shrunk and re-encoded; plus the perceptual hash and the pixel histogram of what is stored."""
    original = read_file(path)  # read once: it is also the stored data when passed through
    img = open_image(original, max_pixels)
    with img:
        if is_passthrough(img, size):
            load(img)
            return StoredImage(original, img.histogram(), passthrough=True, phash=perceptual_hash(img))
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much smaller (the slow part of big
        # photos); draft never goes below the requested size, and LANCZOS does the rest.
        target = shrunk_size(*img.size, size)
        if img.format == "JPEG" and target != img.size:
            img.draft("RGB", target)
        load(img)
        orient(img)
        rgb = to_rgb(img)
        phash = perceptual_hash(rgb)
        target = shrunk_size(*rgb.size, size)
        if target != rgb.size:
            rgb = rgb.resize(target, Image.LANCZOS, reducing_gap=3.0)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=quality)
    data = buf.getvalue()
    # Statistics must be over the pixels the trainer will decode, i.e. of the *stored* JPEG, not of `rgb`.
    with Image.open(io.BytesIO(data)) as stored:
        return StoredImage(data, stored.histogram(), passthrough=False, phash=phash)


def perceptual_hash(img: Image.Image) -> int:
    """64-bit difference hash (dHash) of an oriented picture: 1 bit per horizontal brightness step on a 9x8
    grayscale thumbnail. The same photo at another size or JPEG quality gives the same or a nearby hash (small
    Hamming distance); different photos differ in ~half the bits."""
    gray = img.convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.LANCZOS, reducing_gap=2.0)
    px = np.asarray(gray, dtype=np.int16)
    bits = (px[:, 1:] > px[:, :-1]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")
