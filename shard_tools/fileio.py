"""Local-file mechanisms used everywhere: write a file atomically, hash bytes while they stream."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A hidden temporary path in `path`'s folder, renamed onto `path` only when the block ends without an error:
    readers see the old file or the whole new one, never part of one, and a failed write (a full disk) leaves no
    temporary file behind."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial",
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: others on a shared cluster must be able to read it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", *, fsync: bool = False) -> Iterator:
    """`atomic_path` as an open file. `fsync` for files that must survive a machine crash (the manifest)."""
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str, obj) -> None:
    """JSON that readers see whole or not at all, and that survives a machine crash once written (the manifest)."""
    with atomic_write(path, "w", fsync=True) as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


class HashingStream:
    """Wraps a binary stream; counts and sha256-hashes every byte read from or written to it on the way."""

    def __init__(self, stream: BinaryIO, name: str = "", hashing: bool = True):
        self.stream, self.name, self.bytes = stream, name, 0
        self.sha256 = hashlib.sha256() if hashing else None

    def __repr__(self) -> str:  # webdataset puts the stream into its error messages
        return self.name or repr(self.stream)

    def _count(self, data) -> None:
        if self.sha256 is not None:
            self.sha256.update(data)
        self.bytes += len(data)

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self._count(data)
        return data

    def write(self, data) -> int:
        self._count(data)
        return self.stream.write(data)

    def drain(self) -> None:
        """Read to EOF: tarfile stops at the end-of-archive marker, before the padding that the sha256 covers."""
        while self.read(1 << 20):
            pass

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()

    def close(self) -> None:
        self.stream.close()


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
