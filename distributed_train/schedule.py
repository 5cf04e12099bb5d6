"""How long a run's epochs are and what crop size each one trains at: plain arithmetic on the settings, without
torch, shared by the settings' validation (config.py) and the data pipeline (data.py)."""
from __future__ import annotations

SIZE_STEP = 16  # progressive crop sizes are multiples of this: few shapes for cuDNN's autotuner and torch.compile


def train_batches_per_rank(num_samples: int, world_size: int, batch_size: int, accum_steps: int = 1) -> int:
    """Micro-batches every rank runs per epoch: whole optimizer steps, at least one."""
    micro = num_samples // world_size // batch_size
    return max(accum_steps, micro - micro % accum_steps)


def parse_progressive(text: str) -> tuple[int, int]:
    """--progressive 'MIN:MAX' -> (MIN, MAX); ValueError naming the rule it breaks."""
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"{text!r}: give MIN:MAX crop sizes in pixels, e.g. 160:192") from None
    if not (0 < low <= high) or low % SIZE_STEP or high % SIZE_STEP:
        raise ValueError(f"{text!r}: MIN and MAX must be multiples of {SIZE_STEP} with 0 < MIN <= MAX")
    return low, high


def crop_size_at(epoch: int, low: int, high: int, epochs: int) -> int:
    """The training crop size of `epoch` (0-based) of `epochs`: from `low` to `high` in steps of 16 px, each size
    for an equal share of the epochs (so the last share trains at `high`, the size evaluation is closest to)."""
    levels = (high - low) // SIZE_STEP + 1
    level = min(levels - 1, epoch * levels // max(1, epochs))
    return low + SIZE_STEP * level
