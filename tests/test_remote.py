"""shard_tools' transport, shard reader and upload over loopback: an HTTP server with injected faults, and moto's S3 server."""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from remote_servers import ShardHTTPServer, s3_bucket, s3_server  # noqa: F401  (fixtures)
from shard_tools import shard_reader, transport
from shard_tools.redaction import redact
from shard_tools.errors import ShardIntegrityError, ShardReadError
from shard_tools.upload import UploadError, upload_dataset
from shard_tools.manifest import ChannelStats, Manifest, ManifestError, ShardInfo, SplitInfo

pytestmark = pytest.mark.remote

SHARD_SIZES = {"train-000000.tar": 5, "train-000001.tar": 6, "val-000000.tar": 3}
FAST = dict(backoff=0.01, timeout=2.0)  # retries without waiting, and a short socket timeout


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A tiny finished dataset: shards written by webdataset's TarWriter, ~24 KiB samples (so that half a shard
    ends mid-sample), and a manifest with their real sizes and sha256."""
    root = tmp_path_factory.mktemp("dataset")
    row = 0
    splits = {}
    for name, count in SHARD_SIZES.items():
        split = splits.setdefault(name.split("-")[0], SplitInfo(num_samples=0, class_counts=[0, 0]))
        with wds.TarWriter(str(root / name)) as sink:
            for _ in range(count):
                payload = hashlib.sha256(str(row).encode()).digest() * 768  # 24 KiB, distinct per row
                sink.write({"__key__": f"{row:09d}", "jpg": payload, "cls": row % 2, "json": {"row": row}})
                split.class_counts[row % 2] += 1
                row += 1
        data = (root / name).read_bytes()
        split.shards.append(ShardInfo(name, count, len(data), hashlib.sha256(data).hexdigest()))
        split.num_samples += count
    (root / "train_info.json").write_text(json.dumps({"num_samples": splits["train"].num_samples}))
    Manifest(
        classes=["even", "odd"],
        splits=splits,
        stats=ChannelStats(mean=[0.5] * 3, std=[0.25] * 3, pixels=1),
        image_size=64,
        duplicate_groups=0,
    ).write(str(root))
    return root


def expected_keys(dataset: Path, name: str) -> list[str]:
    return [s["__key__"] for s in shard_reader.iter_shard_samples(str(dataset / name))]


@pytest.fixture
def http(dataset):
    with ShardHTTPServer(dataset) as server:
        yield server


def counter():
    return multiprocessing.Value("i", 0)


def keys(samples) -> list[str]:
    return [s["__key__"] for s in samples]


# --- locations and secrets -----------------------------------------------------------------------------------------
def test_is_url_and_join():
    assert transport.is_url("s3://bucket/prefix") and transport.is_url("https://host/data")
    assert not transport.is_url("/data/shards") and not transport.is_url("file:///data/shards")
    assert transport.join("s3://bucket/prefix/", "a.tar") == "s3://bucket/prefix/a.tar"
    assert transport.join("file:///data/shards", "a.tar") == "/data/shards/a.tar"


def test_redact_hides_userinfo_query_values_and_aws_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-secret-value")
    text = (
        "failed https://alice:hunter2@store.example/ds/train-000000.tar?X-Amz-Signature=abcdef&X-Amz-Credential=AKIA1 "
        "with key wJalrXUtnFEMI-secret-value"
    )
    out = redact(text)
    for secret in ("alice", "hunter2", "abcdef", "AKIA1", "wJalrXUtnFEMI-secret-value"):
        assert secret not in out
    assert "store.example/ds/train-000000.tar" in out  # what is needed to find the shard stays


# --- HTTP ----------------------------------------------------------------------------------------------------------
def test_read_bytes_and_manifest_over_http(http, dataset):
    assert transport.read_bytes(f"{http.url}/manifest.json") == (dataset / "manifest.json").read_bytes()
    manifest = Manifest.read(http.url)
    assert manifest.shard_urls("train") == [f"{http.url}/train-000000.tar", f"{http.url}/train-000001.tar"]
    with pytest.raises(FileNotFoundError):
        transport.read_bytes(f"{http.url}/nothing-here.json")
    with pytest.raises(ManifestError, match="no manifest"):
        Manifest.read(f"{http.url}/missing-dataset")


def test_http_shard_yields_every_sample_with_its_bytes(http, dataset):
    samples = list(shard_reader.iter_shard_samples(f"{http.url}/train-000001.tar", **FAST))
    local = list(shard_reader.iter_shard_samples(str(dataset / "train-000001.tar")))
    assert len(samples) == SHARD_SIZES["train-000001.tar"]
    assert [(s["__key__"], s["jpg"], s["cls"], s["json"]) for s in samples] == [
        (s["__key__"], s["jpg"], s["cls"], s["json"]) for s in local
    ]
    assert all(s["__url__"] == f"{http.url}/train-000001.tar" for s in samples)


def test_slice_start_stop(http, dataset):
    all_keys = expected_keys(dataset, "train-000001.tar")
    got = keys(shard_reader.iter_shard_samples(f"{http.url}/train-000001.tar", start=2, stop=5, **FAST))
    assert got == all_keys[2:5]


def test_connection_dropped_mid_shard_resumes_without_duplicates(http, dataset):
    http.fail("train-000001.tar", "drop", times=2)
    skipped = counter()
    got = keys(shard_reader.iter_shard_samples(f"{http.url}/train-000001.tar", retries=3, skip_counter=skipped, **FAST))
    assert got == expected_keys(dataset, "train-000001.tar")  # each sample once, in order
    assert http.requests_for("train-000001.tar") == 3 and skipped.value == 0


def test_resume_respects_the_slice(http, dataset):
    http.fail("train-000001.tar", "drop", times=1)
    got = keys(shard_reader.iter_shard_samples(f"{http.url}/train-000001.tar", start=1, stop=6, **FAST))
    assert got == expected_keys(dataset, "train-000001.tar")[1:6]
    assert http.requests_for("train-000001.tar") == 2


def test_http_5xx_is_retried(http, dataset):
    http.fail("val-000000.tar", "503", times=2)
    got = keys(shard_reader.iter_shard_samples(f"{http.url}/val-000000.tar", retries=2, on_error="fail", **FAST))
    assert got == expected_keys(dataset, "val-000000.tar")


def test_persistent_failure_is_skipped_counted_and_logged(http, dataset, caplog):
    http.fail("train-000001.tar", "drop")
    skipped = counter()
    with caplog.at_level(logging.WARNING, logger="shard_tools.shard_reader"):
        got = keys(shard_reader.iter_shard_samples(f"{http.url}/train-000001.tar", retries=2, skip_counter=skipped, **FAST))
    full = expected_keys(dataset, "train-000001.tar")
    assert got == full[: len(got)] and len(got) < len(full)  # the prefix that arrived, once
    assert skipped.value == 1
    assert http.requests_for("train-000001.tar") == 3
    assert any("skipping shard" in r.message and "train-000001.tar" in r.message for r in caplog.records)


def test_persistent_failure_raises_in_fail_mode(http):
    http.fail("train-000000.tar", "503")
    with pytest.raises(ShardReadError, match="train-000000.tar.*503"):
        list(shard_reader.iter_shard_samples(f"{http.url}/train-000000.tar", retries=1, on_error="fail", **FAST))
    assert http.requests_for("train-000000.tar") == 2


def test_stalled_server_times_out_instead_of_hanging(http):
    http.fail("val-000000.tar", "stall")
    skipped = counter()
    list(shard_reader.iter_shard_samples(f"{http.url}/val-000000.tar", retries=1, skip_counter=skipped, backoff=0.01,
                                   timeout=0.5))
    # the client gave up on its own: the server is still holding both stalled responses open
    assert skipped.value == 1 and http.requests_for("val-000000.tar") == 2
    assert http.stalls_expired() == 0


def test_stopping_the_server_mid_epoch_skips_the_rest(http, dataset):
    manifest = Manifest.read(str(dataset))
    shards = [dict(url=f"{http.url}/{sh.name}", stop=sh.num_samples) for sh in manifest.split("train").shards]
    skipped = counter()
    pipeline = wds.DataPipeline(
        lambda: iter(shards),  # dict(url=..., stop=...) per shard
        shard_reader.resilient_tarfile_to_samples(retries=2, skip_counter=skipped, **FAST),
    )
    got = []
    for sample in pipeline:
        got.append(sample["__key__"])
        if len(got) == 1:
            http.stop()  # refused from now on; what the first shard already sent may still arrive
    assert len(got) == len(set(got)) >= 1
    assert not set(got) & set(expected_keys(dataset, "train-000001.tar"))
    assert skipped.value in (1, 2)  # the second shard for sure, the first one if it had not fully arrived


def test_skip_counter_crosses_dataloader_workers(http, dataset):
    torch = pytest.importorskip("torch")
    manifest = Manifest.read(str(dataset))
    shards = [dict(url=f"{http.url}/{sh.name}", stop=sh.num_samples) for sh in manifest.split("train").shards]
    http.fail("train-000000.tar", "503")
    skipped = counter()
    pipeline = wds.DataPipeline(
        lambda: iter(shards),
        wds.split_by_worker,
        shard_reader.resilient_tarfile_to_samples(retries=1, skip_counter=skipped, **FAST),
        wds.map(lambda sample: sample["__key__"]),
    )
    got = list(torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2))
    assert sorted(got) == expected_keys(dataset, "train-000001.tar")
    assert skipped.value == 1  # incremented in a worker process, read here


def test_truncated_tar_is_an_error(http, dataset):
    data = (dataset / "train-000000.tar").read_bytes()
    (dataset / "cut.tar").write_bytes(data[: len(data) * 2 // 3])  # served with a correct Content-Length
    try:
        with pytest.raises(ShardReadError, match="cut.tar"):
            list(shard_reader.iter_shard_samples(f"{http.url}/cut.tar", retries=1, on_error="fail", **FAST))
        # a shard that ends cleanly but short of the manifest's count is truncated too
        with pytest.raises(ShardReadError, match="ended after 5 samples, expected 7"):
            list(shard_reader.iter_shard_samples(f"{http.url}/train-000000.tar", stop=7, retries=0, on_error="fail",
                                           **FAST))
    finally:
        (dataset / "cut.tar").unlink()


def test_sha256_verified_while_streaming(http, dataset):
    shard = Manifest.read(str(dataset)).split("train").shards[1]
    url = f"{http.url}/{shard.name}"
    assert len(list(shard_reader.iter_shard_samples(url, verify_sha256=shard.sha256, **FAST))) == shard.num_samples
    wrong = hashlib.sha256(b"another shard").hexdigest()
    with pytest.raises(ShardIntegrityError, match=f"shard {shard.name}: sha256 mismatch"):
        list(shard_reader.iter_shard_samples(url, verify_sha256=wrong, on_error="skip", **FAST))


def test_sha256_after_a_retry_covers_the_whole_shard(http, dataset):
    shard = Manifest.read(str(dataset)).split("train").shards[1]
    http.fail(shard.name, "drop", times=1)
    got = list(shard_reader.iter_shard_samples(f"{http.url}/{shard.name}", verify_sha256=shard.sha256, on_error="fail",
                                         **FAST))
    assert len(got) == shard.num_samples


def test_errors_never_show_credentials(http):
    url = http.url.replace("http://", "http://reader:s3cr3t-pass@") + "/missing.tar"
    with pytest.raises(ShardReadError, match="not found") as info:
        list(shard_reader.iter_shard_samples(url, retries=0, on_error="fail", **FAST))
    assert "s3cr3t-pass" not in str(info.value) and "missing.tar" in str(info.value)


def test_other_schemes_go_through_fsspec(dataset):
    dest = "memory://shard-tools-test/ds"
    upload_dataset(str(dataset), dest, overwrite=True)
    manifest = Manifest.read(dest)
    shard = manifest.split("val").shards[0]
    got = list(shard_reader.iter_shard_samples(f"{dest}/{shard.name}", stop=shard.num_samples, verify_sha256=shard.sha256))
    assert keys(got) == expected_keys(dataset, shard.name)


# --- S3 (moto server) ----------------------------------------------------------------------------------------------
def upload_objects(dataset: Path, bucket: str, prefix: str) -> str:
    import boto3

    client = boto3.client("s3")
    for path in sorted(dataset.iterdir()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"


def test_read_and_stream_from_s3(s3_server, s3_bucket, dataset):
    base = upload_objects(dataset, s3_bucket, "ds")
    assert transport.read_bytes(f"{base}/manifest.json") == (dataset / "manifest.json").read_bytes()
    manifest = Manifest.read(base)
    for shard, url in zip(manifest.split("train").shards, manifest.shard_urls("train")):
        got = list(shard_reader.iter_shard_samples(url, stop=shard.num_samples, verify_sha256=shard.sha256, **FAST))
        assert keys(got) == expected_keys(dataset, shard.name)
    with pytest.raises(FileNotFoundError):
        transport.read_bytes(f"{base}/no-such-key")
    with pytest.raises(ManifestError, match="no manifest"):
        Manifest.read(f"s3://{s3_bucket}/elsewhere")


def test_plain_webdataset_reads_s3_after_register(s3_server, s3_bucket, dataset):
    base = upload_objects(dataset, s3_bucket, "ds")
    shard_reader.register_gopen_schemes()
    got = keys(wds.DataPipeline(wds.SimpleShardList([f"{base}/val-000000.tar"]), wds.tarfile_to_samples()))
    assert got == expected_keys(dataset, "val-000000.tar")


def test_unreachable_s3_endpoint_is_skipped_not_hung(s3_server, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    skipped = counter()
    assert list(shard_reader.iter_shard_samples("s3://bucket/train-000000.tar", retries=1, skip_counter=skipped,
                                          **FAST)) == []
    assert skipped.value == 1
    with pytest.raises(OSError, match="127.0.0.1"):  # an OSError, which Manifest.read turns into a one-line error
        transport.read_bytes("s3://bucket/manifest.json", retries=1, backoff=0.01, timeout=2.0)


def test_upload_to_a_folder(dataset, tmp_path):
    order = upload_dataset(str(dataset), str(tmp_path / "copy"))
    assert order[-1] == "manifest.json"
    assert Manifest.read(str(tmp_path / "copy")).to_dict() == Manifest.read(str(dataset)).to_dict()
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted(p.name for p in dataset.iterdir())
    before = sorted(p.name for p in (tmp_path / "copy").iterdir())
    for same in (str(tmp_path / "copy"), str(tmp_path / "copy") + "/", str(tmp_path / "copy" / "manifest.json")):
        with pytest.raises(UploadError, match="is the dataset being uploaded"):  # --overwrite would delete its manifest
            upload_dataset(str(tmp_path / "copy"), same, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == before


def test_upload_writes_manifest_last(s3_server, s3_bucket, dataset, monkeypatch):
    dest = f"s3://{s3_bucket}/ds"
    manifest = Manifest.read(str(dataset))
    shard_keys = {f"ds/{sh.name}" for split in manifest.splits.values() for sh in split.shards}
    real_put = transport.put_file
    seen_at_manifest = []

    def spying_put(local_file, dest_url):
        if dest_url.endswith("/manifest.json"):
            seen_at_manifest.extend(s3_server.keys(s3_bucket))  # what a reader could list just before
        real_put(local_file, dest_url)

    monkeypatch.setattr(transport, "put_file", spying_put)
    order = upload_dataset(str(dataset), dest)
    assert order[-1] == "manifest.json"
    assert shard_keys | {"ds/train_info.json"} <= set(seen_at_manifest) and "ds/manifest.json" not in seen_at_manifest
    assert Manifest.read(dest).to_dict() == manifest.to_dict()
    with pytest.raises(UploadError, match="already holds a dataset"):
        upload_dataset(str(dataset), dest)
    upload_dataset(str(dataset), dest, overwrite=True)


def test_upload_failing_midway_leaves_no_manifest(s3_server, s3_bucket, dataset, monkeypatch):
    real_put = transport.put_file
    calls = []

    def failing_put(local_file, dest_url):
        calls.append(dest_url)
        if len(calls) == 2:
            raise OSError("connection reset while uploading")
        real_put(local_file, dest_url)

    monkeypatch.setattr(transport, "put_file", failing_put)
    with pytest.raises(UploadError, match="connection reset"):
        upload_dataset(str(dataset), f"s3://{s3_bucket}/ds")
    uploaded = s3_server.keys(s3_bucket)
    assert uploaded == ["ds/train-000000.tar"]  # the first shard made it, nothing claims the dataset is there


def test_upload_cli(s3_server, s3_bucket, dataset):
    cmd = [sys.executable, "-m", "shard_tools", "upload", str(dataset), f"s3://{s3_bucket}/cli"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert first.returncode == 0, first.stderr
    assert "cli/manifest.json" in s3_server.keys(s3_bucket)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert second.returncode == 1
    assert second.stderr.strip().startswith("shard_tools: error:") and "--overwrite" in second.stderr
    assert "Traceback" not in second.stderr and s3_server.SECRET_KEY not in first.stdout + first.stderr
    missing = subprocess.run(cmd[:-1] + ["s3://no-such-bucket-here/ds"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "NoSuchBucket" in missing.stderr and "Traceback" not in missing.stderr


class _FailsHalfway:
    """An S3 body that raises `error` once half the object has been read, as botocore does when the connection
    stalls or drops mid-object."""

    def __init__(self, body, size: int, error: Exception):
        self.body, self.left, self.error = body, size // 2, error

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise self.error
        data = self.body.read(self.left if n < 0 else min(n, self.left))
        self.left -= len(data)
        return data

    def close(self):
        self.body.close()


@pytest.mark.parametrize("error", ["ReadTimeoutError", "IncompleteReadError", "ResponseStreamingError"])
def test_s3_streaming_errors_mid_shard_are_retried(s3_server, s3_bucket, dataset, monkeypatch, error):
    """botocore raises these from the body's read(), after get_object succeeded: the retry must cover them."""
    from botocore import exceptions

    make = {"ReadTimeoutError": lambda: exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1"),
            "IncompleteReadError": lambda: exceptions.IncompleteReadError(actual_bytes=1, expected_bytes=2),
            "ResponseStreamingError": lambda: exceptions.ResponseStreamingError(error="connection reset")}[error]
    base = upload_objects(dataset, s3_bucket, "ds")
    shard = Manifest.read(base).split("train").shards[1]
    opened = []
    real_open = transport._S3.open

    def open_s3(self, url, timeout, **range_kw):
        body = real_open(self, url, timeout, **range_kw)
        opened.append(url)
        return _FailsHalfway(body, shard.bytes, make()) if len(opened) == 1 else body

    monkeypatch.setattr(transport._S3, "open", open_s3)
    got = list(shard_reader.iter_shard_samples(f"{base}/{shard.name}", stop=shard.num_samples, verify_sha256=shard.sha256,
                                         on_error="fail", **FAST))
    assert keys(got) == expected_keys(dataset, shard.name) and len(opened) == 2
