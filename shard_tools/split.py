"""Leakage-safe train/val assignment: near-duplicate images are grouped, and whole groups go to one split.

1. Grouping: two images whose 64-bit perceptual hashes differ in at most `max_distance` bits are linked, and linked
   images form a group (union-find, so A~B and B~C put A, B, C together). To avoid comparing all n^2 pairs the hash
   is cut into `max_distance + 1` bands: by the pigeonhole principle two hashes within the distance agree exactly on
   at least one band, so only images sharing a band value are compared.
2. Splitting: stratified per class and deterministic for a seed. Groups are visited in a seeded random order; a group
   counts towards the class most of its images carry, and goes to val when that brings the class's val count closer
   to its quota round(val_fraction * class size), never taking a class's last training image.
"""
from __future__ import annotations

import math

import numpy as np

DEFAULT_MAX_DISTANCE = 5  # real photos: re-saved copies differ in 0-4 bits, the closest other shots in 5+, most in 10+


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving
        i = parent[i]
    return i


def _union(parent: np.ndarray, a: int, b: int) -> None:
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)  # the smallest index is the root: group ids do not depend on visit order


def group_near_duplicates(hashes: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE) -> np.ndarray:
    """Group id per item (the smallest index in its group) for uint64 `hashes`."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    # Identical hashes first (cheap and common: exact copies): each item points at the first item with its hash,
    # which is a valid union-find forest. Then only the distinct values are compared.
    unique, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    parent = first[inverse].copy()
    if max_distance > 0 and len(unique) > 1:
        for bits in np.array_split(np.arange(64), max_distance + 1):
            keys = (unique >> np.uint64(bits[0])) & np.uint64((1 << len(bits)) - 1)
            for a, b in _close_pairs(unique, keys, max_distance):
                _union(parent, int(first[a]), int(first[b]))
    # Every item's root at once: pointer jumping on the forest (roots point at themselves), O(n log depth).
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent.astype(np.int64)
        parent = grand


SMALL_BUCKET = 32  # buckets up to this size are compared all together, one offset at a time


def _close_pairs(hashes: np.ndarray, keys: np.ndarray, max_distance: int):
    """Pairs (i, j) of `hashes` with the same band value in `keys` and at most `max_distance` bits apart.

    Sorted by key, a bucket's members are neighbours: the pairs of all small buckets at once are the items `d`
    apart with equal keys, for d = 1, 2, ... (a few numpy passes instead of a Python loop over thousands of buckets);
    each big bucket (one band value shared by many pictures, e.g. dark ones) is compared as one block."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1], True])
    sizes = np.diff(starts)
    small = np.repeat(sizes <= SMALL_BUCKET, sizes)
    members, member_keys = order[small], sorted_keys[small]
    for d in range(1, min(SMALL_BUCKET, len(members))):
        same = member_keys[:-d] == member_keys[d:]
        if not same.any():
            break
        a, b = members[:-d][same], members[d:][same]
        close = np.bitwise_count(hashes[a] ^ hashes[b]) <= max_distance
        yield from zip(a[close].tolist(), b[close].tolist())
    for lo, hi in zip(starts[:-1][sizes > SMALL_BUCKET], starts[1:][sizes > SMALL_BUCKET]):
        block = order[lo:hi]
        h = hashes[block]
        close = np.bitwise_count(h[:, None] ^ h[None, :]) <= max_distance
        for a, b in zip(*np.nonzero(np.triu(close, k=1))):
            yield int(block[a]), int(block[b])


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def assign_splits(classes: np.ndarray, groups: np.ndarray, num_classes: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean array, True = validation, for items with class index `classes` and group ids `groups`."""
    classes, groups = np.asarray(classes), np.asarray(groups)
    is_val = np.zeros(len(classes), dtype=bool)
    if val_fraction <= 0:
        return is_val
    group_ids, inverse = np.unique(groups, return_inverse=True)
    # A group with mixed labels counts for its majority class (ties: the lower class index); it is never split.
    votes = np.zeros((len(group_ids), num_classes), dtype=np.int64)
    np.add.at(votes, (inverse, classes), 1)
    majority, sizes = votes.argmax(axis=1), votes.sum(axis=1)
    class_size = np.bincount(majority, weights=sizes, minlength=num_classes).astype(int)
    quota = [_round_half_up(val_fraction * n) for n in class_size]
    taken = [0] * num_classes
    to_val = np.zeros(len(group_ids), dtype=bool)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(group_ids))
    for g, c, s in zip(order.tolist(), majority[order].tolist(), sizes[order].tolist()):
        closer = abs(taken[c] + s - quota[c]) < abs(taken[c] - quota[c])
        if closer and taken[c] + s < class_size[c]:
            to_val[g] = True
            taken[c] += s
    return to_val[inverse]


def count_duplicate_groups(groups: np.ndarray) -> tuple[int, int]:
    """(groups with >= 2 images, images in such groups)."""
    sizes = np.bincount(np.unique(groups, return_inverse=True)[1])
    return int((sizes >= 2).sum()), int(sizes[sizes >= 2].sum())
