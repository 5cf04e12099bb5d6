"""Leakage-safe train/val assignment: near-duplicate images are grouped, and whole groups go to one split.

1. Grouping: two images whose 64-bit perceptual hashes differ in at most `max_distance` bits are linked, and linked
   images form a group (connected components, so A~B and B~C put A, B, C together). Exact copies are merged first
   (one sort); the distinct values are then linked by multi-index hashing: the hash is cut into k parts, and two
   hashes within d bits differ in at most d parts, so they agree exactly on some k - d of them (pigeonhole). For
   every choice of k - d parts, values that agree on those bits land in one bucket, and only the pairs of a bucket
   are compared. k is sized to the data, so that buckets stay small as n grows (each key has more bits than log2 n);
   pairs inside a bucket that already belong to one group are never generated, which keeps dense clusters (dark
   photos, a burst of one scene) from costing their size squared once per key. Buckets come from one SIMD sort per
   key, and groups are joined in a union-find forest whose merges cost the pairs joined, not the n values.
2. Splitting: stratified per class and deterministic for a seed. Groups are visited in a seeded random order; a group
   counts towards the class most of its images carry, and goes to val when that brings the class's val count closer
   to its quota round(val_fraction * class size), never taking a class's last training image.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

DEFAULT_MAX_DISTANCE = 5  # real photos: re-saved copies differ in 0-4 bits, the closest other shots in 5+, most in 10+
PAIR_BLOCK = 1 << 20  # candidate pairs compared per numpy pass: bounds the memory of a big bucket
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads a key's bits over the top bits of the product


def group_near_duplicates(hashes: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE,
                          parts: int | None = None) -> np.ndarray:
    """Group id per item (the smallest index in its group) for uint64 `hashes`. `parts` forces k (see above; any
    k in max_distance..64 gives the same groups, k = max_distance compares all pairs); by default the cheapest."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    unique, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    labels = np.arange(len(unique))
    if max_distance > 0 and len(unique) > 1:
        labels = _link_close(unique, max_distance, parts)
    smallest = np.full(len(unique), len(hashes), dtype=np.int64)
    np.minimum.at(smallest, labels, first)  # a group is named by its first item, whatever the value order
    return smallest[labels][inverse.ravel()]


def choose_parts(n: int, max_distance: int) -> int:
    """The k with the least estimated work: C(k, d) keys, each costing a pass over the n values plus the pairs
    that share a key (about n^2 / 2^bits of random hashes). k = d is the all-pairs comparison."""
    best_cost, best_k = math.inf, max_distance
    for k in range(max_distance, 65):
        keys = math.comb(k, max_distance)
        if keys * n >= best_cost:  # more parts only add keys
            break
        cost = keys * (n + n * n / 2 ** (64 * (k - max_distance) / k))
        if cost < best_cost:
            best_cost, best_k = cost, k
    return best_k


def _key_masks(parts: int, max_distance: int):
    """One 64-bit mask per choice of `parts - max_distance` of the `parts` contiguous bit ranges."""
    ranges = [sum(1 << int(b) for b in bits) for bits in np.array_split(np.arange(64), parts)]
    for chosen in itertools.combinations(ranges, parts - max_distance):
        yield np.uint64(sum(chosen))


def _link_close(values: np.ndarray, max_distance: int, parts: int | None) -> np.ndarray:
    """Component root (its smallest index) of each distinct value in the graph of pairs <= max_distance apart."""
    n = len(values)
    parts = choose_parts(n, max_distance) if parts is None else parts
    if not max_distance <= parts <= 64:
        raise ValueError(f"parts must be in {max_distance}..64, got {parts}")
    parent = np.arange(n)  # union-find forest: a group's root is its smallest index and points at itself
    labels = parent.copy()  # each value's root, refreshed once per key (a merge touches only the roots it joins)
    slot_bits = min(32, max(1, math.ceil(math.log2(n)) + 2))  # ~4 slots a value; 32: slot and index share a uint64
    for mask in _key_masks(parts, max_distance):
        slots = ((values & mask) * _MIX) >> np.uint64(64 - slot_bits)
        for a, b in _candidate_pairs(*_shared_slots(slots), labels):
            close = np.bitwise_count(values[a] ^ values[b]) <= max_distance
            if close.any():
                _union(parent, labels[a[close]], labels[b[close]])
        labels = _flatten(parent)
    return labels


def _shared_slots(slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, slot) of every value whose slot (uint64, < 2^32) holds another value too. One sort of (slot, index)
    packed into a uint64, which numpy sorts with SIMD at a cost per value that barely grows with n; a count table of
    2^slot_bits entries would miss the cache on every access once n is in the millions (4x the cost per value
    at 10M as at 1M, measured)."""
    packed = np.sort((slots << np.uint64(32)) | np.arange(len(slots), dtype=np.uint64))
    sorted_slots = packed >> np.uint64(32)
    same_as_next = sorted_slots[1:] == sorted_slots[:-1]
    shared = np.r_[same_as_next, False] | np.r_[False, same_as_next]
    return (packed[shared] & np.uint64(0xFFFFFFFF)).astype(np.intp), sorted_slots[shared]


def _candidate_pairs(shared: np.ndarray, slots: np.ndarray, labels: np.ndarray):
    """Pairs (a, b) of the values `shared` (with their `slots`) in one slot whose groups differ, in blocks of about
    PAIR_BLOCK pairs.

    Sorted by (slot, group), a value's partners are the positions from the end of its group to the end of its slot's
    run, so a slot whose values already form one group yields nothing."""
    if len(shared) < 2:
        return
    order = np.argsort((slots << np.uint64(32)) | labels[shared].astype(np.uint64))
    idx, s, g = shared[order], slots[order], labels[shared[order]]
    new_slot = np.r_[True, s[1:] != s[:-1]]
    slot_end = _run_ends(new_slot)
    group_end = _run_ends(new_slot | np.r_[True, g[1:] != g[:-1]])
    partners = slot_end - group_end
    total = np.cumsum(partners)
    start = 0
    while start < len(idx):
        done = total[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(total, done + PAIR_BLOCK, side="right")))
        count = partners[start:stop]
        a = np.repeat(np.arange(start, stop), count)
        b = group_end[a] + np.arange(len(a)) - np.repeat(np.cumsum(count) - count, count)
        yield idx[a], idx[b]
        start = stop


def _run_ends(starts: np.ndarray) -> np.ndarray:
    """For each position, the end (exclusive) of the run it is in; `starts` flags each run's first position."""
    first = np.flatnonzero(starts)
    sizes = np.diff(np.r_[first, len(starts)])
    return np.repeat(first + sizes, sizes)


def _union(parent: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """Join the groups of u[i] and v[i] in the forest `parent`; each joined group's root is its smallest root. Costs
    the size of u and v, not of the forest (relabelling every value after each merge cost O(n) per block of pairs)."""
    ru, rv = _find(parent, u), _find(parent, v)
    roots, inverse = np.unique(np.concatenate([ru, rv]), return_inverse=True)
    parent[roots] = roots[_components(inverse[: len(ru)], inverse[len(ru):], len(roots))]


def _find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    while True:
        up = parent[x]
        if np.array_equal(up, x):
            return x
        x = up


def _flatten(parent: np.ndarray) -> np.ndarray:
    """Point every node straight at its root (in place); -> the roots."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent.copy()
        parent[:] = up


def _components(u: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    """Smallest node of each node's component for the edges (u, v) on nodes 0..n-1: hook every root to the smallest
    root it has an edge to, then jump pointers until every node points at its root; repeat while edges cross."""
    comp = np.arange(n)
    while True:
        cu, cv = comp[u], comp[v]
        crossing = cu != cv
        if not crossing.any():
            return comp
        u, v, cu, cv = u[crossing], v[crossing], cu[crossing], cv[crossing]
        np.minimum.at(comp, np.maximum(cu, cv), np.minimum(cu, cv))
        while True:
            jumped = comp[comp]
            if np.array_equal(jumped, comp):
                break
            comp = jumped


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
