"""Leakage-safe train/val assignment: near-duplicate images are grouped, and whole groups go to one split.

1. Grouping: two images whose 64-bit perceptual hashes differ in at most `max_distance` bits are linked, and linked
   images form a group (connected components, so A~B and B~C put A, B, C together). Exact copies are merged first
   (one sort); the distinct values are then linked by multi-index hashing: the hash is cut into k parts, and two
   hashes within d bits differ in at most d parts, so they agree exactly on some k - d of them (pigeonhole). For
   every choice of k - d parts (a key), values that agree on those bits land in one bucket, and only the pairs of a
   bucket are compared. k is sized to the data, so that buckets stay small as n grows. Most buckets hold one or two
   values, and their pairs cost one numpy pass over the shared values; in the few big buckets (dense clusters: dark
   photos, a burst of one scene) pairs inside a group already joined are never generated, which keeps them from
   costing their size squared once per key. Two values share a key only if they agree on its first part, so the
   keys are searched in partitions of the values cut by that part's top bits, small enough for the caches. In a
   partition a key costs one SIMD sort, and groups are joined in union-find forests whose merges cost the pairs
   joined, not the n values.
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
SHORT_RUN = 8  # a bucket of up to this many values compares all its pairs; a bigger one only pairs across groups
PARTITION = 1 << 17  # values searched together (see _link_close): their arrays fit in a core's caches
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads a key's bits over the top bits of the product


def group_near_duplicates(hashes: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE,
                          parts: int | None = None) -> np.ndarray:
    """Group id per item (the smallest index in its group) for uint64 `hashes`. `parts` forces k (see above; any
    k in max_distance..64 gives the same groups, k = max_distance compares all pairs); by default the cheapest."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    unique, first, inverse = distinct(hashes)
    labels = np.arange(len(unique))
    if max_distance > 0 and len(unique) > 1:
        labels = _link_close(unique, max_distance, parts)
    smallest = np.full(len(unique), len(hashes), dtype=np.int64)
    np.minimum.at(smallest, labels, first)  # a group is named by its first item, whatever the value order
    return smallest[labels][inverse.ravel()]


def distinct(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """np.unique(hashes, return_index=True, return_inverse=True) for uint64 `hashes`, by one SIMD sort: each hash's
    high bits and its index share a uint64, so the sort orders by value and, among equal values, by index. Only runs
    whose high bits tie (equal values, or values that differ in the low bits alone) are sorted again, by value and
    index. np.unique orders by a stable argsort of the 64-bit values: a merge sort, where np.sort of uint64 is SIMD."""
    n = len(hashes)
    if n == 0:
        return hashes.copy(), np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)
    bits = max(1, (n - 1).bit_length())
    low = np.uint64((1 << bits) - 1)
    order = (np.sort((hashes & ~low) | np.arange(n, dtype=np.uint64)) & low).astype(np.intp)
    ordered = hashes[order]
    tie = (ordered[1:] ^ ordered[:-1]) <= low  # equal high bits
    tied = np.flatnonzero(np.r_[tie, False] | np.r_[False, tie])
    if len(tied):  # runs sit in value order already: sorting all tied positions together sorts each run
        by_value = np.lexsort((order[tied], ordered[tied]))
        order[tied], ordered[tied] = order[tied][by_value], ordered[tied][by_value]
    new = np.r_[True, ordered[1:] != ordered[:-1]]
    inverse = np.empty(n, dtype=np.intp)
    inverse[order] = np.cumsum(new) - 1
    return ordered[new], order[new], inverse


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


def _keys_by_first_part(parts: int, max_distance: int) -> dict[int, list[np.uint64]]:
    """The keys (one 64-bit mask per choice of `parts - max_distance` of the `parts` contiguous bit ranges), by the
    mask of the first range each key contains (0 for k = d, whose one key is empty: every value in one bucket)."""
    ranges = [sum(1 << int(b) for b in bits) for bits in np.array_split(np.arange(64), parts)]
    keys: dict[int, list[np.uint64]] = {}
    for chosen in itertools.combinations(ranges, parts - max_distance):
        keys.setdefault(chosen[0] if chosen else 0, []).append(np.uint64(sum(chosen)))
    return keys


def _partitions(values: np.ndarray, part: int) -> tuple[np.ndarray, list[int]]:
    """(order, bounds): the values cut by the top bits of the bit range `part` into partitions of about PARTITION
    values; partition i is values[order[bounds[i]:bounds[i + 1]]]. A radix sort of 16-bit numbers: linear in n."""
    cut = min(part.bit_count(), 16, max(0, round(math.log2(len(values) / PARTITION))))
    if cut == 0:
        return np.arange(len(values)), [0, len(values)]
    where = ((values >> np.uint64(part.bit_length() - cut)) & np.uint64((1 << cut) - 1)).astype(np.uint16)
    return np.argsort(where, kind="stable"), [0] + np.cumsum(np.bincount(where, minlength=1 << cut)).tolist()


def _link_close(values: np.ndarray, max_distance: int, parts: int | None) -> np.ndarray:
    """Component root (its smallest index) of each distinct value in the graph of pairs <= max_distance apart.

    Keys are visited by the first bit range p they contain. Two values share such a key only if they agree on p, so
    for those keys the values are cut into partitions by p's top bits, and each partition is searched alone: its
    arrays stay in the caches, where passes over all n values miss them at every step once n is in the millions
    (3.3x the cost per value at 10M as at 1M, measured). The joins a partition finds go into the forest of all
    values once per p."""
    n = len(values)
    parts = choose_parts(n, max_distance) if parts is None else parts
    if not max_distance <= parts <= 64:
        raise ValueError(f"parts must be in {max_distance}..64, got {parts}")
    roots = np.arange(n)  # a flat union-find forest: each value points at its group's root, the smallest index
    for part, masks in _keys_by_first_part(parts, max_distance).items():
        order, bounds = _partitions(values, part)
        ordered_values, ordered_labels = values[order], _roots_of(roots, order)
        child, root = [], []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            if stop - start > 1:
                moved, to = _link_partition(ordered_values[start:stop], ordered_labels[start:stop], masks,
                                            max_distance)
                child.append(order[start + moved])
                root.append(order[start + to])
        if child:
            _union(roots, np.concatenate(child), np.concatenate(root))
            roots = roots[roots]  # _union repoints roots only, to roots: one step flattens the forest again
    return roots


def _roots_of(roots: np.ndarray, order: np.ndarray) -> np.ndarray:
    """roots[order], gathering only the values already joined to another: most values are still their own root,
    and at 10M values a gather of every root misses the caches at each one."""
    joined = roots != np.arange(len(roots))
    out = order.copy()
    pick = np.flatnonzero(joined[order])
    out[pick] = roots[order[pick]]
    return out


def _link_partition(values: np.ndarray, labels: np.ndarray, masks: list[np.uint64], max_distance: int):
    """Search one partition with `masks`, starting from the groups in `labels`; -> (moved, to): the positions whose
    group changed and a position of the group each joined."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    start = first[inverse]
    parent = start.copy()  # a forest of this partition's values in which each known group is already one tree
    bits = max(1, math.ceil(math.log2(len(values))))  # of a position, which shares a uint64 with the slot
    if bits > 32:
        raise ValueError(f"{len(values)} distinct hashes in one partition: at most 2^32 are supported")
    position = np.arange(len(values), dtype=np.uint64)
    for mask in masks:
        # as many slot bits as fit: values that share a slot but not a key are compared for nothing
        slots = ((values & mask) * _MIX) >> np.uint64(bits)
        for a, b in _candidate_pairs(np.sort((slots << np.uint64(bits)) | position), bits, parent):
            close = np.bitwise_count(values[a] ^ values[b]) <= max_distance
            if close.any():
                _union(parent, a[close], b[close])
    labels = _flatten(parent)
    moved = np.flatnonzero(labels != start)
    return moved, labels[moved]


def _candidate_pairs(packed: np.ndarray, bits: int, parent: np.ndarray):
    """Pairs (a, b) of positions that share a slot, from `packed`: (slot, position) in one sorted uint64 each, the
    position in the low `bits`. A value is paired with the next 1, 2, ... values of its slot's run, one numpy pass
    per distance over the values that reach that far: most shared slots hold two values, so most of the work is one
    pass over the shared ones. Runs longer than SHORT_RUN (a dense cluster: dark frames, a burst of one scene) go on
    by their groups in the forest `parent`, which skips the pairs of a group already joined."""
    same = np.zeros(len(packed), dtype=bool)  # same[i]: i and i + 1 share a slot (the last: False)
    slot = packed >> np.uint64(bits)
    np.equal(slot[1:], slot[:-1], out=same[:-1])
    live = np.flatnonzero(same)
    signed, low = packed.view(np.int64), (1 << bits) - 1
    distance = 1
    while len(live):
        if distance == SHORT_RUN:
            member = np.zeros(len(packed), dtype=bool)
            member[(live[:, None] + np.arange(distance + 1)).ravel()] = True
            chosen = signed[member]
            idx, slot = chosen & low, slot[member]
            group = _find(parent, idx)
            order = np.lexsort((group, slot))
            yield from _pairs_across_groups(idx[order], slot[order], group[order])
            return
        partner = live + distance
        yield signed[live] & low, signed[partner] & low
        live = live[same[partner]]
        distance += 1


def _pairs_across_groups(idx: np.ndarray, s: np.ndarray, g: np.ndarray):
    """Pairs (a, b) of positions `idx` in one slot `s` whose groups `g` differ (all sorted by slot, then group), in
    blocks of about PAIR_BLOCK pairs. A value's partners are the positions from the end of its group to the end of
    its slot's run, so a slot whose values already form one group yields nothing."""
    if len(idx) < 2:
        return
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
    differ = ru != rv  # most pairs a later key finds are joined already
    if not differ.any():
        return
    ru, rv = ru[differ], rv[differ]
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


def assign_splits(classes: np.ndarray, groups: np.ndarray, num_classes: int, val_fraction: float,
                  seed: int) -> np.ndarray:
    """Boolean array, True = validation, for items with class index `classes` and group ids `groups`."""
    classes, groups = np.asarray(classes), np.asarray(groups)
    is_val = np.zeros(len(classes), dtype=bool)
    if val_fraction <= 0:
        return is_val
    group_ids, inverse = np.unique(groups, return_inverse=True)
    majority, sizes = _majority_class(inverse, classes, len(group_ids), num_classes)
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


def _majority_class(group: np.ndarray, classes: np.ndarray, num_groups: int, num_classes: int):
    """(majority class, size) of each group 0..num_groups-1: a group with mixed labels counts for the class most of
    its images carry (ties: the lower class index). From the distinct (group, class) pairs and their counts, not a
    groups x classes table (8 bytes x ~255,000 groups x 100 classes was the parent's memory peak at 300,000 images)."""
    pairs, counts = np.unique(group.astype(np.int64) * num_classes + classes, return_counts=True)
    pair_group, pair_class = np.divmod(pairs, num_classes)
    best = np.lexsort((pair_class, -counts, pair_group))  # per group: most images first, then the lower class
    first = best[np.r_[True, pair_group[best][1:] != pair_group[best][:-1]]]
    return pair_class[first], np.bincount(group, minlength=num_groups)


def count_duplicate_groups(groups: np.ndarray) -> tuple[int, int]:
    """(groups with >= 2 images, images in such groups)."""
    sizes = np.bincount(np.unique(groups, return_inverse=True)[1])
    return int((sizes >= 2).sum()), int(sizes[sizes >= 2].sum())
