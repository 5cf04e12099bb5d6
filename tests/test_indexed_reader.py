"""Sample indexes: written by build, listed in the manifest (version 2; version 1 still reads), tars unchanged for
webdataset, and the indexed reader: the same samples as the sequential one, only a slot's own bytes (locally, over
HTTP Range and S3 ranged GETs), retries, sha256, and the sequential fallback (no index, a server without Range)."""
from __future__ import annotations

import hashlib
import logging
import multiprocessing

import pytest
import webdataset as wds

from conftest import tar_index, write_dataset
from remote_servers import ShardHTTPServer, s3_bucket, s3_server  # noqa: F401  (fixtures)
from shard_fixtures import textured_dataset
from shard_tools import indexed_reader, transport
from shard_tools.build import build_dataset
from shard_tools.errors import ShardIntegrityError, ShardReadError
from shard_tools.indexed_reader import RangeReader, iter_indexed_samples, read_index
from shard_tools.manifest import Manifest, ManifestError
from shard_tools.shard_index import ShardIndex, index_name
from shard_tools.shard_reader import iter_shard_samples

FAST = dict(backoff=0.01, timeout=2.0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Indexed shards of 7, 1 and 12 samples, and the same shards without indexes (a version 1 style dataset)."""
    root = tmp_path_factory.mktemp("indexed")
    write_dataset(root / "with", {"train": [7, 1, 12]}, size=24)
    write_dataset(root / "without", {"train": [7, 1, 12]}, size=24, index=False)
    return root


def as_tuples(samples):
    return [(s["__key__"], s["jpg"], s["cls"], s["json"]) for s in samples]


def sequential(url, start=0, stop=None):
    return as_tuples(iter_shard_samples(url, start=start, stop=stop, on_error="fail"))


def counting_reads(monkeypatch) -> list[tuple[int, int]]:
    reads = []
    real = transport.read_range

    def read_range(url, start, length, **kw):
        reads.append((start, length))
        return real(url, start, length, **kw)

    monkeypatch.setattr(transport, "read_range", read_range)
    return reads


# --- the index and the manifest ------------------------------------------------------------------------------------
def test_build_writes_an_index_per_shard_listed_with_its_sha256(tmp_path):
    images, labels = textured_dataset(tmp_path, 14, labels=("a", "b"))
    build_dataset(images, labels, tmp_path / "out", val_fraction=0.3, shard_size=4, progress=False)
    m = Manifest.read(str(tmp_path / "out"))
    assert m.version == 2
    for split in m.splits.values():
        for sh in split.shards:
            blob = (tmp_path / "out" / sh.index).read_bytes()
            assert sh.index == index_name(sh.name) and hashlib.sha256(blob).hexdigest() == sh.index_sha256
            # the writer's offsets equal those python's tar parser finds
            assert blob == tar_index(tmp_path / "out" / sh.name)
            # an ordinary tar: webdataset reads it unchanged, to the same samples as the index
            plain = as_tuples(wds.WebDataset(str(tmp_path / "out" / sh.name), shardshuffle=False))
            indexed = as_tuples(iter_indexed_samples(m.shard_url(sh), read_index(m.shard_url(sh), sh), start=0,
                                                     stop=sh.num_samples, shard_bytes=sh.bytes, on_error="fail"))
            assert indexed == plain and len(plain) == sh.num_samples


def test_version_1_manifests_still_read_and_unknown_versions_are_refused(shards):
    d = Manifest.read(str(shards / "without")).to_dict()
    for sh in d["splits"]["train"]["shards"]:
        del sh["index"], sh["index_sha256"]
    v1 = Manifest.from_dict(d | {"version": 1})
    assert v1.version == 1 and all(sh.index == "" for sh in v1.split("train").shards)
    with pytest.raises(ManifestError, match="version 3 is not supported"):
        Manifest.from_dict(d | {"version": 3})


def test_index_round_trips_and_rejects_garbage(shards):
    blob = (shards / "with" / "train-000002.idx").read_bytes()
    index = ShardIndex.from_bytes(blob)
    assert len(index) == 12 and index.members == ["cls", "jpg", "json"] and index.to_bytes() == blob
    with pytest.raises(ValueError, match="unreadable shard index"):
        ShardIndex.from_bytes(blob[:-8])


# --- the indexed reader --------------------------------------------------------------------------------------------
def test_every_slice_gives_the_sequential_samples_and_reads_only_its_bytes(shards, monkeypatch):
    m = Manifest.read(str(shards / "with"))
    sh = m.split("train").shards[2]
    url, index = m.shard_url(sh), read_index(m.shard_url(sh), sh)
    reads = counting_reads(monkeypatch)
    for start in range(sh.num_samples):
        for stop in range(start + 1, sh.num_samples + 1):
            reads.clear()
            got = as_tuples(iter_indexed_samples(url, index, start=start, stop=stop, shard_bytes=sh.bytes,
                                                 on_error="fail", chunk_bytes=3000))
            assert got == sequential(url, start, stop)
            # contiguous reads covering exactly the slice's samples: read amplification 1.00x
            assert sum(n for _, n in reads) == index.starts[stop] - index.starts[start]
            assert reads[0][0] == index.starts[start]
            assert all(a + n == b for (a, n), (b, _) in zip(reads, reads[1:]))


def test_reads_are_merged_into_large_ones(shards, monkeypatch):
    m = Manifest.read(str(shards / "with"))
    sh = m.split("train").shards[2]
    reads = counting_reads(monkeypatch)
    list(RangeReader()(m.shard_url(sh), sh, 0, sh.num_samples))
    assert len(reads) == 1  # 12 samples, far less than a chunk: one read


def test_reads_over_http_ranges_only_the_slice_and_resume_after_a_drop(shards):
    m = Manifest.read(str(shards / "with"))
    sh = m.split("train").shards[2]
    index = read_index(m.shard_url(sh), sh)
    with ShardHTTPServer(shards / "with") as server:
        url = f"{server.url}/{sh.name}"
        server.fail(sh.name, "drop", times=1)
        got = as_tuples(iter_indexed_samples(url, index, start=5, stop=9, shard_bytes=sh.bytes, on_error="fail",
                                             **FAST))
        assert got == sequential(str(shards / "with" / sh.name), 5, 9)
        assert server.requests_for(sh.name) == 2  # dropped once, retried once
        expected = int(index.starts[9] - index.starts[5])
        assert server.bytes_sent_by_range(sh.name) == expected + expected // 2  # the half before the drop, then all


def test_a_server_without_range_support_falls_back_to_the_sequential_path(shards, caplog):
    m = Manifest.read(str(shards / "with"))
    sh = m.split("train").shards[2]
    reader = RangeReader(**FAST)
    with ShardHTTPServer(shards / "with", ranges=False) as server, caplog.at_level(logging.WARNING):
        url = f"{server.url}/{sh.name}"
        assert as_tuples(reader(url, sh, 3, 10)) == sequential(str(shards / "with" / sh.name), 3, 10)
        assert "ignores HTTP Range requests" in caplog.text
        before = server.requests_for(sh.name)
        assert as_tuples(reader(url, sh, 0, 2)) == sequential(str(shards / "with" / sh.name), 0, 2)
        assert server.requests_for(sh.name) == before + 1  # the server is remembered: no second wasted request


def test_reads_from_s3_with_ranged_gets(s3_server, s3_bucket, shards, monkeypatch):
    m = Manifest.read(str(shards / "with"))
    sh = m.split("train").shards[0]
    for name in (sh.name, sh.index):
        transport.put_file(str(shards / "with" / name), f"s3://{s3_bucket}/ds/{name}")
    reads = counting_reads(monkeypatch)
    url = f"s3://{s3_bucket}/ds/{sh.name}"
    got = as_tuples(RangeReader(**FAST)(url, sh, 2, 6))
    assert got == sequential(str(shards / "with" / sh.name), 2, 6)
    index = read_index(url, sh)
    assert reads == [(index.starts[2], index.starts[6] - index.starts[2])]


def test_without_an_index_the_sequential_path_reads(shards, monkeypatch):
    m = Manifest.read(str(shards / "without"))
    sh = m.split("train").shards[0]
    reads = counting_reads(monkeypatch)
    assert as_tuples(RangeReader()(m.shard_url(sh), sh, 1, 5)) == sequential(m.shard_url(sh), 1, 5)
    assert reads == []


def test_sha256_is_verified_on_the_indexed_path(shards, tmp_path):
    m = Manifest.read(str(shards / "with"))
    sh = m.split("train").shards[0]
    data = bytearray((shards / "with" / sh.name).read_bytes())
    index = read_index(m.shard_url(sh), sh)
    first_jpg = int(index.data[0, index.members.index("jpg"), 0])
    data[first_jpg + 10] ^= 0xFF  # same size and offsets, different bytes
    (tmp_path / sh.name).write_bytes(data)
    (tmp_path / sh.index).write_bytes((shards / "with" / sh.index).read_bytes())
    damaged = str(tmp_path / sh.name)
    assert len(list(RangeReader(verify=False)(damaged, sh, 0, sh.num_samples))) == sh.num_samples
    with pytest.raises(ShardIntegrityError, match="sha256 mismatch"):
        list(RangeReader(verify=True)(damaged, sh, 0, sh.num_samples))


def test_a_wrong_index_is_an_integrity_error_and_a_missing_one_falls_back(shards, tmp_path, caplog):
    m = Manifest.read(str(shards / "with"))
    sh = m.split("train").shards[0]
    (tmp_path / sh.name).write_bytes((shards / "with" / sh.name).read_bytes())
    url = str(tmp_path / sh.name)
    with caplog.at_level(logging.WARNING):
        assert as_tuples(RangeReader()(url, sh, 0, 3)) == sequential(url, 0, 3)
    assert "index of" in caplog.text and "reading the shard sequentially" in caplog.text
    (tmp_path / sh.index).write_bytes((shards / "with" / "train-000002.idx").read_bytes())
    with pytest.raises(ShardIntegrityError, match="sha256 differs"):
        list(RangeReader()(url, sh, 0, 3))


def test_a_truncated_shard_is_retried_then_skipped_and_counted(shards, tmp_path, caplog):
    m = Manifest.read(str(shards / "with"))
    sh = m.split("train").shards[2]
    index = read_index(m.shard_url(sh), sh)
    (tmp_path / sh.name).write_bytes((shards / "with" / sh.name).read_bytes()[: int(index.starts[6])])
    url = str(tmp_path / sh.name)
    skipped = multiprocessing.Value("i", 0)
    got = list(iter_indexed_samples(url, index, start=0, stop=12, shard_bytes=sh.bytes, on_error="skip",
                                    skip_counter=skipped, chunk_bytes=1, retries=1, **FAST))
    assert [s["__key__"] for s in got] == index.keys[:6] and skipped.value == 1  # each sample at most once
    with pytest.raises(ShardReadError, match="truncated"):
        list(iter_indexed_samples(url, index, start=0, stop=12, shard_bytes=sh.bytes, on_error="fail", retries=0))


def test_chunk_end_takes_whole_samples_and_at_least_one():
    index = ShardIndex.from_members([(f"{k}.jpg", 512 + 1024 * k, 100) for k in range(5)])
    assert [int(x) for x in index.starts] == [0, 1024, 2048, 3072, 4096, 5120]
    assert index.chunk_end(0, 5, 10) == 1  # one sample even when it is larger than the chunk
    assert index.chunk_end(1, 5, 2048) == 3
    assert index.chunk_end(1, 2, 1 << 20) == 2
    assert indexed_reader.CHUNK_BYTES >= 1 << 20


def test_verify_checks_each_index_against_its_shard(tmp_path, capsys):
    from shard_tools.__main__ import main

    images, labels = textured_dataset(tmp_path, 8, labels=("a", "b"))
    build_dataset(images, labels, tmp_path / "out", val_fraction=0.25, shard_size=3, progress=False)
    assert main(["verify", str(tmp_path / "out")]) == 0
    m = Manifest.read(str(tmp_path / "out"))
    sh = m.split("train").shards[0]
    index = ShardIndex.from_bytes((tmp_path / "out" / sh.index).read_bytes())
    index.keys[0], index.keys[1] = index.keys[1], index.keys[0]  # a consistent file that lies about the shard
    blob = index.to_bytes()
    (tmp_path / "out" / sh.index).write_bytes(blob)
    assert main(["verify", str(tmp_path / "out")]) == 1
    assert "sha256 differs from the manifest" in capsys.readouterr().out
    sh.index_sha256 = hashlib.sha256(blob).hexdigest()
    m.write(str(tmp_path / "out"))
    assert main(["verify", str(tmp_path / "out")]) == 1
    assert f"{sh.index}: does not match the samples of {sh.name}" in capsys.readouterr().out
