"""`python -m shard_tools verify` wherever the trainer reads (local, HTTP, S3), and each of its sample checks."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import boto3
import numpy as np
from PIL import Image

from conftest import CLASSES, class_image, write_dataset
from remote_servers import ShardHTTPServer, s3_bucket, s3_server  # noqa: F401  (pytest fixtures)
from shard_tools.__main__ import main
from shard_tools.manifest import Manifest
from shard_tools.upload import upload_dataset


def problems(location, capsys) -> list[str]:
    code = main(["verify", location])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].endswith("OK" if code == 0 else "problems"), lines
    return lines[:-1]


def jpeg(label: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(class_image(label, np.random.default_rng(seed))).save(buf, format="JPEG")
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def rewrite_shard(root, name: str, samples: list[dict]) -> None:
    """Replace a shard with these samples (key -> members) and record its new size and sha256 (and no index) in the
    manifest, so that only the sample checks can object."""
    with tarfile.open(root / name, "w") as tar:
        for s in samples:
            for ext in ("jpg", "cls", "json"):
                add_member(tar, f"{s['key']}.{ext}", s[ext])
    manifest = Manifest.read(str(root))
    data = (root / name).read_bytes()
    for split in manifest.splits.values():
        for shard in split.shards:
            if shard.name == name:
                shard.bytes, shard.sha256 = len(data), hashlib.sha256(data).hexdigest()
                shard.index = shard.index_sha256 = ""  # the old index describes the old bytes
    manifest.write(str(root))


def sample(key: str, label: int, *, jpg: bytes | None = None, name: str | None = None) -> dict:
    return {"key": key, "jpg": jpeg(label, int(key)) if jpg is None else jpg, "cls": str(label).encode(),
            "json": json.dumps({"id": key, "label": name or CLASSES[label]}).encode()}


def test_verify_names_undecodable_mislabelled_and_duplicate_samples(tmp_path, capsys):
    root = tmp_path / "ds"
    write_dataset(root, {"train": [3, 3], "val": [3]})  # keys 000000000.. in row order, labels row % 3
    assert problems(str(root), capsys) == []
    rewrite_shard(root, "train-000001.tar", [
        sample("000000003", 0, jpg=b"\xff\xd8 this is not a JPEG"),
        sample("000000004", 1, name="blue"),  # class 1 is "green"
        sample("000000000", 2),  # the first sample of train-000000.tar again
    ])
    found = problems(str(root), capsys)
    assert found[0].startswith("train-000001.tar: sample 000000003: jpg does not decode")
    assert found[1] == "train-000001.tar: sample 000000004: label 'blue' does not match class 1 ('green')"
    assert found[2] == "train-000001.tar: sample 000000000: key appears twice in the dataset"
    assert len(found) == 3, found


def test_verify_over_http(tmp_path, uneven_shards, damaged_shards, capsys):
    with ShardHTTPServer(uneven_shards) as server:
        assert problems(server.url, capsys) == []
    with ShardHTTPServer(damaged_shards) as server:
        found = problems(server.url, capsys)
        server.fail("train-000003.tar", "drop")  # half the bytes, then the connection closes
        dropped = problems(server.url, capsys)
    for name in ("train-000000.tar", "val-000001.tar"):
        assert f"{name}: sha256 differs from the manifest (corrupted or replaced)" in found
        assert any(line.startswith(f"{name}: sample ") and "jpg does not decode" in line for line in found)
    assert len(found) == 4, found
    assert any(line.startswith("train-000003.tar: unreadable after") for line in dropped), dropped


def test_verify_over_s3(tmp_path, uneven_shards, s3_bucket, capsys):
    url = f"s3://{s3_bucket}/ds"
    upload_dataset(str(uneven_shards), url)
    assert problems(url, capsys) == []
    boto3.client("s3").delete_object(Bucket=s3_bucket, Key="ds/train-000004.tar")
    assert problems(url, capsys) == ["train-000004.tar: missing"]
