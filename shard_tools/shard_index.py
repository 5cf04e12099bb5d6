"""A shard's sample index: where each sample's files lie inside the tar, so a reader can fetch exactly the bytes of
samples [a, b) with one ranged read and cut them apart without parsing a tar header.

The index is a small sidecar next to its shard (`train-000000.tar` -> `train-000000.idx`), listed in the manifest
with its sha256. The shard itself stays an ordinary tar that webdataset, timm or `tar -x` read unchanged.

Layout (little-endian):
    8 bytes      MAGIC
    4 bytes      n = length of the JSON header
    n bytes      {"members": ["cls", "jpg", "json"], "keys": ["000000001", ...]}
    8 (N+1)      int64 byte offset where each sample's first tar header starts; the last entry is the end of the
                 last sample's data (the tar's end-of-archive blocks follow)
    8 N M 2      int64 (offset, size) of the data of each sample's M members, in `members` order

Every sample must hold the same members (shard_tools' writer always writes jpg, cls and json).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"SHIDX\x00\x01\n"
BLOCK = 512  # tar block: every member's data is padded to a multiple of it


class BadIndex(ValueError):
    """An index file that cannot be decoded."""


def index_name(shard_name: str) -> str:
    """`train-000000.tar` -> `train-000000.idx`."""
    return (shard_name[:-4] if shard_name.endswith(".tar") else shard_name) + ".idx"


def padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def split_name(name: str) -> tuple[str, str]:
    """A tar member name as webdataset groups it: (key, extension), split at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        raise BadIndex(f"tar member {name!r} has no extension")
    return (f"{folder}/{stem}" if folder else stem), ext


@dataclass
class ShardIndex:
    members: list[str]  # file extensions of every sample, e.g. ["cls", "jpg", "json"]
    keys: list[str]
    starts: np.ndarray  # int64 (N+1,)
    data: np.ndarray  # int64 (N, M, 2): offset, size

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def from_members(cls, entries: list[tuple[str, int, int]]) -> "ShardIndex":
        """From the tar's members in file order: (name, data offset, data size)."""
        groups: list[tuple[str, int, list]] = []  # (key, offset of its first header, [(ext, offset, size)])
        end = 0
        for name, offset, size in entries:
            key, ext = split_name(name)
            if not groups or groups[-1][0] != key:
                groups.append((key, end, []))  # members are contiguous: a sample starts where the last one ended
            groups[-1][2].append((ext, offset, size))
            end = offset + padded(size)
        members = [ext for ext, _, _ in groups[0][2]] if groups else []
        for key, _, row in groups:
            if [ext for ext, _, _ in row] != members:
                raise BadIndex(f"sample {key} has members {[ext for ext, _, _ in row]}, not {members}")
        data = np.array([[(o, s) for _, o, s in row] for _, _, row in groups], dtype=np.int64)
        starts = np.array([start for _, start, _ in groups] + [end], dtype=np.int64)
        return cls(members, [key for key, _, _ in groups], starts, data.reshape(len(groups), len(members), 2))

    def to_bytes(self) -> bytes:
        header = json.dumps({"members": self.members, "keys": self.keys}, separators=(",", ":")).encode()
        return (MAGIC + struct.pack("<I", len(header)) + header + self.starts.astype("<i8").tobytes()
                + self.data.astype("<i8").tobytes())

    @classmethod
    def from_bytes(cls, blob: bytes, where: str = "index") -> "ShardIndex":
        try:
            if blob[:8] != MAGIC:
                raise BadIndex("not a shard index (wrong magic bytes)")
            (n,) = struct.unpack_from("<I", blob, 8)
            header = json.loads(blob[12:12 + n])
            members, keys = list(header["members"]), list(header["keys"])
            count = len(keys)
            starts = np.frombuffer(blob, "<i8", count + 1, 12 + n).astype(np.int64)
            data = np.frombuffer(blob, "<i8", count * len(members) * 2, 12 + n + 8 * (count + 1))
            if 12 + n + 8 * (count + 1) + data.nbytes != len(blob):
                raise BadIndex("size does not match its header")
            return cls(members, keys, starts, data.astype(np.int64).reshape(count, len(members), 2))
        except (BadIndex, ValueError, KeyError, TypeError, struct.error) as e:
            raise BadIndex(f"{where}: unreadable shard index ({e})") from None

    def chunk_end(self, first: int, stop: int, max_bytes: int) -> int:
        """The end of the longest run of samples from `first` (at most `stop`) that fits in `max_bytes`; at least
        one sample, so a sample larger than `max_bytes` is still read."""
        limit = self.starts[first] + max_bytes
        end = int(np.searchsorted(self.starts, limit, side="right")) - 1
        return min(stop, max(first + 1, end))

    def samples(self, blob, first: int, end: int, url: str):
        """The webdataset samples [first, end) cut out of `blob`, the bytes [starts[first], starts[end]) of the
        shard."""
        base = int(self.starts[first])
        view = memoryview(blob)
        for i in range(first, end):
            sample = {"__key__": self.keys[i], "__url__": url}
            for ext, (offset, size) in zip(self.members, self.data[i].tolist()):
                sample[ext] = bytes(view[offset - base:offset - base + size])
            yield sample


class IndexRecorder:
    """Collects (name, data offset, size) of every member a tarfile.TarFile writes, by wrapping its addfile."""

    def __init__(self, tar):
        self.entries: list[tuple[str, int, int]] = []
        addfile = tar.addfile

        def recording_addfile(tarinfo, fileobj=None):
            addfile(tarinfo, fileobj)
            # after addfile, tar.offset is the end of this member's padded data
            self.entries.append((tarinfo.name, tar.offset - padded(tarinfo.size), tarinfo.size))

        tar.addfile = recording_addfile

    def index(self) -> ShardIndex:
        return ShardIndex.from_members(self.entries)
