"""A human-readable summary of a dataset's manifest."""
from __future__ import annotations

from shard_tools.manifest import Manifest


def describe(m: Manifest) -> str:
    lines = [f"{m.num_classes} classes, images with shorter side <= {m.image_size} px"]
    width = max(len(c) for c in m.classes)
    splits = list(m.splits)
    lines.append("  " + "class".ljust(width + 6) + "".join(s.rjust(8) for s in splits))
    for i, name in enumerate(m.classes):
        lines.append(f"  {i:>3}  {name.ljust(width)} " + "".join(f"{m.splits[s].class_counts[i]:>8}" for s in splits))
    lines.append("  " + "total".ljust(width + 6) + "".join(f"{m.splits[s].num_samples:>8}" for s in splits))
    for s in splits:
        shards = m.splits[s].shards
        mb = sum(sh.bytes for sh in shards) / 1e6
        span = f" ({shards[0].name} .. {shards[-1].name})" if shards else ""
        lines.append(f"{s}: {len(shards)} shards, {mb:.1f} MB{span}")
    fmt = lambda v: "[" + ", ".join(f"{x:.4f}" for x in v) + "]"  # noqa: E731
    lines.append(f"train mean {fmt(m.stats.mean)} std {fmt(m.stats.std)} (RGB, 0-1 scale, {m.stats.pixels:,} pixels)")
    src = m.source
    lines.append(f"near-duplicate groups: {m.duplicate_groups} ({src.get('duplicate_images', '?')} images), "
                 f"each kept within one split")
    if "rows" in src:
        lines.append(f"rows: written {src['written']} + skipped {src['skipped']} = {src['rows']}")
    return "\n".join(lines)
