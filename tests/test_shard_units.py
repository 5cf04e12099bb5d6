"""shard_tools building blocks on their own: labels CSV, one image, pixel statistics, duplicate grouping, split."""
from __future__ import annotations

import io
import itertools

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from shard_fixtures import decode, solid, textured, write_csv
from shard_tools.images import SkipImage, prepare
from shard_tools.labels import ImageFinder, LabelsError, class_order, load_rows
from shard_tools.plan import exact_sum, hex_hashes
from shard_tools import split
from shard_tools.split import _majority_class, assign_splits, count_duplicate_groups, group_near_duplicates
from shard_tools.stats import PixelSums


# --- labels -------------------------------------------------------------------------------------------------------
def test_ids_stay_strings_and_resolve_with_or_without_extension(tmp_path):
    images = tmp_path / "images"
    solid(images / "00042.jpg", (1, 2, 3))
    solid(images / "photo.png", (1, 2, 3), fmt="PNG")
    solid(images / "sub" / "deep.jpeg", (1, 2, 3))
    solid(images / "upper.JPG", (1, 2, 3))
    csv = write_csv(tmp_path / "l.csv", [("00042", "x"), ("photo.png", "y"), ("sub/deep", "x"), ("upper", "y")])
    rows, skipped, total = load_rows(str(images), str(csv))
    assert skipped == [] and total == 4
    assert [r.id for r in rows.itertuples()] == ["00042", "photo.png", "sub/deep", "upper"]
    stored = [r.path.split("images/")[1] for r in rows.itertuples()]
    assert stored == ["00042.jpg", "photo.png", "sub/deep.jpeg", "upper.JPG"]


def test_a_csv_without_header_keeps_its_first_row(tmp_path, capsys):
    """pandas' to_csv(header=False) writes no header: its first line must not be swallowed as one."""
    images = tmp_path / "images"
    for name in ("00001", "00002", "00003"):
        solid(images / f"{name}.jpg", (1, 2, 3))
    (tmp_path / "l.csv").write_text("00001,0\n00002,1\n00003,0\n")
    rows, skipped, total = load_rows(str(images), str(tmp_path / "l.csv"))
    assert [(r.row, r.id, r.label) for r in rows.itertuples()] == [(0, "00001", "0"), (1, "00002", "1"),
                                                                   (2, "00003", "0")]
    assert total == 3 and skipped == []
    assert "has no header line (its first cell, '00001', is an image" in capsys.readouterr().err
    (tmp_path / "h.csv").write_text("id,label\n00001,0\n")  # a real header stays a header, silently
    assert [r.id for r in load_rows(str(images), str(tmp_path / "h.csv"))[0].itertuples()] == ["00001"]
    assert capsys.readouterr().err == ""


def test_every_bad_row_is_skipped_with_a_reason(tmp_path):
    images = tmp_path / "images"
    solid(images / "a.jpg", (1, 2, 3))
    solid(tmp_path / "outside.jpg", (1, 2, 3))
    csv = write_csv(tmp_path / "l.csv", [("a", "x"), ("a", "y"), ("../outside", "x"), ("/etc/passwd", "x"),
                                         ("missing", "x"), ("b", ""), ("sub/../../outside", "x")])
    solid(images / "b.jpg", (1, 2, 3))
    rows, skipped, total = load_rows(str(images), str(csv))
    assert rows["row"].tolist() == [0] and total == 7
    reasons = {s.row: s.reason for s in skipped}
    assert "duplicate id" in reasons[1] and "outside" in reasons[2] and "absolute" in reasons[3]
    assert "not found" in reasons[4] and "empty label" in reasons[5] and "outside" in reasons[6]


def test_image_finder_falls_back_to_the_disk_for_what_its_folder_listing_misses(tmp_path):
    images = tmp_path / "images"
    solid(images / "a.jpg", (1, 2, 3))
    finder = ImageFinder(str(images))
    assert finder.find("a")[0] == str(images / "a.jpg")  # the folder is listed now
    solid(images / "late.png", (1, 2, 3), fmt="PNG")  # not in that listing (as another letter case would not be)
    assert finder.find("late")[0] == str(images / "late.png")
    path, reason = finder.find("sub/none")
    assert path is None and "not found" in reason and "sub/none.jpg" in reason


def test_image_finder_column_wise_finds_what_find_finds(tmp_path):
    images = tmp_path / "images"
    for name in ("a.jpg", "a.png", "b.webp", "c.d.jpg", "e.jpg", ".hidden.jpg", "f.JPEG", "sub/g.jpg"):
        solid(images / name, (1, 2, 3))
    ids = ["a", "a.png", "b", "c.d", "c.d.jpg", "e.jpg", ".hidden", "f", "sub/g", "sub/../a", "../a", "/a", "", ".",
           "missing", "e.png", "a.jpg.jpg"]
    finder = ImageFinder(str(images))
    paths, reasons = finder.find_all(pd.Series(ids, dtype=str))
    assert list(zip(paths, reasons)) == [finder.find(i) for i in ids]
    assert paths[0].endswith("/a.jpg") and paths[2].endswith("/b.webp") and paths[7].endswith("/f.JPEG")


def test_plan_helpers_are_exact():
    big = np.full(4, 2**62 + 12345, dtype=np.int64)
    assert exact_sum(big) == 4 * (2**62 + 12345)  # past 2^63: int64 addition would wrap
    hashes = np.array([0, 1, 0xFEDCBA9876543210, 2**64 - 1], dtype=np.uint64)
    assert hex_hashes(hashes).tolist() == [f"{int(h):016x}" for h in hashes]


@pytest.mark.parametrize("labels, expected", [
    (["10", "9", "2", "0"], ["0", "2", "9", "10"]),  # integers: numeric order, so index i means label i
    (["b", "a", "10", "9"], ["10", "9", "a", "b"]),  # not all integers: plain string order
])
def test_class_order_is_documented_and_stable(labels, expected):
    assert class_order(labels) == expected
    assert class_order(reversed(labels)) == expected


@pytest.mark.parametrize("content, needle", [
    ("", "is empty"),
    ("id,label\n", "no rows"),
    ("only_one_column\na\n", "needs two columns"),
])
def test_unusable_csv_is_one_clear_error(tmp_path, content, needle):
    (tmp_path / "images").mkdir()
    (tmp_path / "l.csv").write_text(content)
    with pytest.raises(LabelsError, match=needle):
        load_rows(str(tmp_path / "images"), str(tmp_path / "l.csv"))


def test_named_columns(tmp_path):
    solid(tmp_path / "images" / "7.jpg", (1, 2, 3))
    csv = write_csv(tmp_path / "l.csv", [("x", "7", "cat")], header=("junk", "file", "species"))
    rows, _, _ = load_rows(str(tmp_path / "images"), str(csv), id_column="file", label_column="species")
    assert (rows["id"][0], rows["label"][0]) == ("7", "cat")
    with pytest.raises(LabelsError, match="no column 'kind'"):
        load_rows(str(tmp_path / "images"), str(csv), id_column="file", label_column="kind")


# --- one image ----------------------------------------------------------------------------------------------------
def histogram(pixels: np.ndarray) -> list[int]:
    return [int(x) for c in range(3) for x in np.bincount(pixels[..., c].ravel(), minlength=256)]


def test_rgb_jpeg_within_size_is_stored_as_its_original_bytes(tmp_path):
    path = tmp_path / "a.jpg"
    textured(1).save(path, quality=77)
    stored = prepare(str(path), size=64, quality=90, max_pixels=None)
    assert stored.passthrough and stored.data == path.read_bytes()
    assert stored.histogram == histogram(decode(stored.data))


def test_resize_shrinks_the_shorter_side_and_never_upscales(tmp_path):
    big = tmp_path / "big.jpg"
    textured(2, (300, 120)).save(big)
    small = solid(tmp_path / "small.png", (10, 20, 30), size=(30, 20), fmt="PNG")
    stored = prepare(str(big), size=60, quality=90, max_pixels=None)
    assert not stored.passthrough and Image.open(io.BytesIO(stored.data)).size == (150, 60)
    stored = prepare(str(small), size=60, quality=90, max_pixels=None)
    assert Image.open(io.BytesIO(stored.data)).size == (30, 20)
    # the statistics see exactly the pixels the trainer decodes from the stored bytes
    assert stored.histogram == histogram(decode(stored.data))


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    stored = prepare(str(path), size=256, quality=95, max_pixels=None)
    px = decode(stored.data)
    assert not stored.passthrough and px.shape == (40, 20, 3)
    assert px[5, 10, 0] > 200 and px[5, 10, 2] < 50  # top is red (the old left)
    assert px[35, 10, 2] > 200 and px[35, 10, 0] < 50  # bottom is blue


@pytest.mark.parametrize("fmt, mode", [("PNG", "RGBA"), ("WEBP", "RGB"), ("JPEG", "CMYK"), ("JPEG", "L"),
                                       ("PNG", "P"), ("PNG", "I;16")])
def test_other_formats_behind_a_jpg_name_are_converted(tmp_path, fmt, mode):
    path = tmp_path / "x.jpg"
    img = Image.new("RGB", (32, 24), (30, 160, 60))
    if mode == "I;16":
        img = Image.fromarray(np.full((24, 32), 40000, dtype=np.uint16))
    else:
        img = img.convert(mode)
    img.save(path, format=fmt)
    stored = prepare(str(path), size=256, quality=95, max_pixels=None)
    px = decode(stored.data)
    assert not stored.passthrough and px.shape == (24, 32, 3)
    expected = {"L": [int(Image.new("RGB", (1, 1), (30, 160, 60)).convert("L").getpixel((0, 0)))] * 3,
                "I;16": [40000 >> 8] * 3}.get(mode, [30, 160, 60])
    assert np.abs(px.reshape(-1, 3).mean(0) - expected).max() < 6


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated"),
    (lambda p: p.write_text("not an image"), "not an image"),
    (lambda p: p.unlink(), "not found"),
])
def test_broken_files_raise_skip_with_a_reason(tmp_path, make, needle):
    path = tmp_path / "x.jpg"
    textured(3, (200, 150)).save(path)
    make(path)
    with pytest.raises(SkipImage, match=needle):
        prepare(str(path), 64, 90, None)


def test_pixel_limit_stops_decompression_bombs(tmp_path):
    path = solid(tmp_path / "x.jpg", (1, 2, 3), size=(100, 100))
    for limit in (9_999, 4_999):  # PIL only warns between 1x and 2x the limit: both must be skips
        with pytest.raises(SkipImage, match="pixel limit"):
            prepare(str(path), 64, 90, max_pixels=limit)
    assert prepare(str(path), 64, 90, max_pixels=10_000).data


def test_perceptual_hash_matches_resized_copies_not_other_images(tmp_path):
    original = textured(4, (320, 240))
    original.save(tmp_path / "a.jpg", quality=95)
    original.resize((160, 120)).save(tmp_path / "b.jpg", quality=60)
    textured(5, (320, 240)).save(tmp_path / "c.jpg", quality=95)
    a, b, c = (prepare(str(tmp_path / f"{n}.jpg"), 64, 90, None).phash for n in "abc")
    assert bin(a ^ b).count("1") <= 3
    assert bin(a ^ c).count("1") > 12


# --- statistics ---------------------------------------------------------------------------------------------------
def test_pixel_sums_are_exact_and_merge_in_any_order():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (rng.integers(1, 40), rng.integers(1, 40), 3), dtype=np.uint8) for _ in range(7)]
    parts = []
    for img in images:
        p = PixelSums()
        p.add_histogram(histogram(img))
        parts.append(p)
    merged = [sum(perm, PixelSums()) for perm in itertools.islice(itertools.permutations(parts), 20)]
    assert all(m == merged[0] for m in merged)
    flat = np.concatenate([i.reshape(-1, 3) for i in images]).astype(np.float64) / 255
    stats = merged[0].channel_stats()
    assert stats.pixels == len(flat)
    np.testing.assert_allclose(stats.mean, flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.std, flat.std(0), rtol=1e-12)
    assert PixelSums.from_dict(merged[0].to_dict()) == merged[0]


def test_std_has_no_cancellation_on_a_nearly_constant_channel():
    p = PixelSums()
    p.add_histogram(histogram(np.full((2000, 2000, 3), 250, dtype=np.uint8)))
    p.add_histogram(histogram(np.full((1, 1, 3), 251, dtype=np.uint8)))
    n = 2000 * 2000 + 1
    exact = np.sqrt((n - 1) / n**2) / 255  # variance of n-1 values at 0 and one at 1 (shift does not matter)
    np.testing.assert_allclose(p.channel_stats().std, [exact] * 3, rtol=1e-9)


# --- grouping and split -------------------------------------------------------------------------------------------
def test_grouping_is_transitive_and_uses_the_distance():
    base = np.uint64(0x0123456789ABCDEF)
    flip = lambda h, *bits: np.uint64(int(h) ^ sum(1 << b for b in bits))  # noqa: E731
    hashes = np.array([base, flip(base, 1, 2, 3), flip(base, 1, 2, 3, 40, 41, 42), flip(base, *range(20, 40)),
                       base], dtype=np.uint64)
    groups = group_near_duplicates(hashes, max_distance=4)
    assert list(groups) == [0, 0, 0, 3, 0]  # 0~1~2 by chains of 3 bits, 4 is an exact copy, 3 is far away
    assert count_duplicate_groups(groups) == (1, 4)
    assert list(group_near_duplicates(hashes, max_distance=0)) == [0, 1, 2, 3, 0]


def _all_pairs_groups(hashes: np.ndarray, max_distance: int) -> list[int]:
    """Reference: compare every pair, then name each connected component by its smallest index."""
    n = len(hashes)
    label = np.arange(n)
    close = np.bitwise_count(hashes[:, None] ^ hashes[None, :]) <= max_distance
    while True:  # min-label propagation until nothing changes
        lower = np.where(close, label[None, :], n).min(axis=1)
        if np.array_equal(lower, label):
            return label.tolist()
        label = lower


def _flipped(rng, hashes: np.ndarray, max_bits: int) -> np.ndarray:
    """Each hash with 0..max_bits random bits flipped."""
    out = hashes.copy()
    for i, count in enumerate(rng.integers(0, max_bits + 1, len(out))):
        for bit in rng.choice(64, count, replace=False):
            out[i] ^= np.uint64(1 << int(bit))
    return out


def _hash_set(kind: str, rng) -> np.ndarray:
    if kind == "random":  # about 1 in 10 near a few of the others, the rest unrelated
        base = rng.integers(0, 2**64, 500, dtype=np.uint64)
        return np.concatenate([base, _flipped(rng, base[:60], 7)])
    if kind == "clustered":  # bursts of one scene, a dense block of dark frames, exact copies
        bursts = _flipped(rng, np.repeat(rng.integers(0, 2**64, 40, dtype=np.uint64), 8), 6)
        dark = _flipped(rng, np.full(300, 0xFF, dtype=np.uint64), 3)
        return np.concatenate([bursts, dark, bursts[:20], np.zeros(30, dtype=np.uint64)])
    # one big bucket of the old 6 x 11-bit banding: 120 hashes share their lowest 11 bits, and each copy differs from
    # its original by one bit in each other band, so only that bucket can pair them
    base = rng.integers(0, 2**63, 120, dtype=np.uint64) & ~np.uint64(0x7FF)
    bands = np.array_split(np.arange(64), 6)[1:]
    noisy = [np.uint64(int(h) ^ sum(1 << int(rng.choice(band)) for band in bands)) for h in base]
    return np.concatenate([base, np.array(noisy, dtype=np.uint64)])


@pytest.mark.parametrize("short_run", [8, 2], ids=["runs-pair-by-pair", "runs-by-groups"])
@pytest.mark.parametrize("partition", [1 << 17, 16], ids=["one-partition", "partitions-of-16"])
@pytest.mark.parametrize("kind", ["random", "clustered", "shared-band"])
def test_grouping_equals_all_pairs_comparison(kind, partition, short_run, monkeypatch):
    # small partitions: the path that millions of hashes take (each key searched within the values that agree on
    # the top bits of the key's first part), on sets small enough for the all-pairs reference. SHORT_RUN = 2 sends
    # every slot of 3+ values down the path by groups, which the default leaves to dense clusters
    monkeypatch.setattr(split, "PARTITION", partition)
    monkeypatch.setattr(split, "SHORT_RUN", short_run)
    rng = np.random.default_rng(["random", "clustered", "shared-band"].index(kind))
    hashes = _hash_set(kind, rng)
    hashes = hashes[rng.permutation(len(hashes))]
    for max_distance in (1, 3, 5, 8):
        expected = _all_pairs_groups(hashes, max_distance)
        if max_distance == 5:
            assert len(set(expected)) < len(hashes) - 10  # the set does have groups at the default distance
        # every way of cutting the hash (k = d compares all pairs; the default is sized to the data) finds them
        for parts in (None, max_distance, max_distance + 1, max_distance + 2, max_distance + 4):
            groups = group_near_duplicates(hashes, max_distance, parts=parts)
            assert groups.tolist() == expected, (max_distance, parts)


@pytest.mark.parametrize("partition", [1 << 17, 64])
def test_grouping_of_a_dense_cluster_compares_blocks_of_pairs(partition, monkeypatch):
    # 2,000 distinct hashes within 3 bits of one value share every key: their pairs come in several blocks
    monkeypatch.setattr(split, "PAIR_BLOCK", 5000)
    monkeypatch.setattr(split, "PARTITION", partition)
    rng = np.random.default_rng(5)
    hashes = np.unique(_flipped(rng, np.full(2400, 0xF0F0, dtype=np.uint64), 3))
    hashes = np.concatenate([hashes, rng.integers(0, 2**64, 200, dtype=np.uint64)])
    expected = _all_pairs_groups(hashes, 5)
    for parts in (None, 5):  # 5: one key holding every pair
        assert group_near_duplicates(hashes, 5, parts=parts).tolist() == expected
    # 300 unrelated pairs of copies in that one key: each block holds some of them
    base = rng.integers(0, 2**64, 300, dtype=np.uint64)
    pairs = np.concatenate([base, base ^ np.uint64(1 << 9)])
    assert group_near_duplicates(pairs, 5, parts=5).tolist() == list(range(300)) * 2


def test_distinct_equals_numpy_unique():
    rng = np.random.default_rng(7)
    close_below = rng.integers(0, 2**64, 3000, dtype=np.uint64) & ~np.uint64(0xFFF) | np.arange(3000, dtype=np.uint64) % 6
    for hashes in (np.array([], dtype=np.uint64), np.array([9], dtype=np.uint64),
                   np.array([3, 3, 1, 3, 0, 1, 2**64 - 1], dtype=np.uint64),
                   rng.integers(0, 40, 2000).astype(np.uint64),  # every value tied, many copies of each
                   close_below,  # values that differ only in the bits the sort keeps for the index
                   np.concatenate([rng.integers(0, 2**64, 5000, dtype=np.uint64), np.zeros(500, dtype=np.uint64)])):
        hashes = hashes[rng.permutation(len(hashes))]
        for got, expected in zip(split.distinct(hashes), np.unique(hashes, return_index=True, return_inverse=True)):
            assert np.array_equal(got, expected)
    assert group_near_duplicates(np.array([], dtype=np.uint64)).tolist() == []


def test_split_is_stratified_deterministic_and_keeps_groups_whole():
    classes = np.repeat([0, 1, 2], [100, 60, 40])
    groups = np.arange(200)
    groups[10:14] = 10  # a group of 4 in class 0
    groups[150] = 10  # ... with one class-1 image: mixed labels stay together
    is_val = assign_splits(classes, groups, 3, 0.2, seed=7)
    assert np.array_equal(is_val, assign_splits(classes, groups, 3, 0.2, seed=7))
    assert not np.array_equal(is_val, assign_splits(classes, groups, 3, 0.2, seed=8))
    assert len(set(is_val[[10, 11, 12, 13, 150]])) == 1
    per_class = [int(is_val[classes == c].sum()) for c in range(3)]
    assert abs(per_class[0] - 20) <= 3 and abs(per_class[1] - 12) <= 1 and per_class[2] == 8


def test_a_group_counts_for_its_majority_class_with_ties_to_the_lower_class():
    # group 0 ties between classes 2 and 0, group 1 between 1 and 2, group 2 has a clear majority
    majority, sizes = _majority_class(np.array([0, 0, 1, 1, 1, 1, 2, 2, 2]), np.array([2, 0, 2, 1, 1, 2, 2, 0, 2]), 3, 3)
    assert majority.tolist() == [0, 1, 2] and sizes.tolist() == [2, 4, 3]
    rng = np.random.default_rng(3)
    for num_classes in (1, 3, 50):
        group = rng.integers(0, 40, 600)
        classes = rng.integers(0, num_classes, 600)
        votes = np.zeros((40, num_classes), dtype=np.int64)  # the plain reference: a groups x classes table
        np.add.at(votes, (group, classes), 1)
        majority, sizes = _majority_class(group, classes, 40, num_classes)
        assert majority.tolist() == votes.argmax(axis=1).tolist()  # argmax: the first (lowest) of tied classes
        assert sizes.tolist() == votes.sum(axis=1).tolist()


def test_split_never_takes_a_class_last_training_image():
    is_val = assign_splits(np.array([0, 1, 1]), np.array([0, 1, 2]), 2, 0.6, seed=0)
    assert not is_val[0] and is_val[1:].sum() == 1


def test_roots_of_equals_gathering_every_root():
    # a flat forest as _link_close keeps it: most values their own root, some joined to a smaller index
    rng = np.random.default_rng(11)
    roots = np.arange(5000)
    joined = rng.choice(np.arange(1, 5000), 600, replace=False)
    roots[joined] = rng.integers(0, joined)
    roots = np.minimum(roots, roots[roots])
    order = rng.permutation(5000)
    assert np.array_equal(split._roots_of(roots, order), roots[order])
