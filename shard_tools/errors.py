"""The errors a user can act on, shared by both packages' command lines.

Library code raises these; only a CLI's `main()` turns them into a one-line message and an exit code
(`shard_tools.cli.run_main`). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import re

from shard_tools.redaction import redact


class Error(Exception):
    """Base class: the message says what went wrong and what to do."""

    exit_code = 1


class UsageError(Error):
    """Settings, arguments or input files that cannot be used at all: fix the command and run it again."""

    exit_code = 2


class DataError(Error):
    """The dataset turned out unreadable or damaged while running (a shard after all retries, a JPEG)."""

    exit_code = 3


class CheckpointError(UsageError):
    """A checkpoint that cannot be loaded, or one that does not fit the run resuming from it."""


class ShardReadError(DataError, OSError):
    """A shard could not be read completely. An OSError too, so I/O code treats it like any other read failure."""


class ShardIntegrityError(ShardReadError):
    """A shard's bytes do not match the sha256 recorded in the manifest."""


class DamagedSample(ShardReadError):
    """A sample whose JPEG does not decode. Made by `damaged_sample`; the one-argument constructor lets torch re-raise
    it in the training process when a DataLoader worker raised it."""


def damaged_sample(key: str, url: str | None, error: BaseException) -> DamagedSample:
    """Which sample, where, why, and what to run."""
    reason = (str(error).strip().splitlines() or [""])[-1].split(", ")[-1]  # torchvision prefixes its source line
    where = f" of {redact(url)}" if url else ""
    return DamagedSample(f"sample {key}{where} cannot be decoded ({reason}): the shard is damaged; "
                         "`python -m shard_tools verify DATA` checks every shard, then rebuild or re-upload it")


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message as one line: its first line, or, for an error re-raised from a DataLoader worker (whose
    message carries the worker's traceback), the traceback's last line without the exception's qualified name."""
    text = str(error).strip() or type(error).__name__
    if "Traceback (most recent call last)" in text:
        return re.sub(r"^[\w.]+: ", "", text.splitlines()[-1])[:limit]
    return text.splitlines()[0][:limit]
