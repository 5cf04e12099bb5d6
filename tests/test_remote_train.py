"""Training from shards that are not on local disk: a loopback HTTP server and moto's S3 server (marker `remote`)."""
import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, python_env
from remote_servers import ShardHTTPServer, s3_bucket, s3_server  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.remote

TINY = ["--arch", "resnet26", "--width", "0.125", "--image-size", "32", "--batch-size", "8", "--wandb", "offline"]


def train(data: str, run_dir: Path, *extra, timeout=300):
    cmd = [PYTHON, "-m", "distributed_train", "--data", data, "--run-dir", str(run_dir), *TINY, *extra]
    return subprocess.run(cmd, env=python_env(), capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_train_from_http_with_shard_verification(uneven_shards, tmp_path):
    with ShardHTTPServer(uneven_shards) as server:
        result = train(server.url, tmp_path / "run", "--epochs", "1", "--workers", "2", "--verify-shards")
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics(tmp_path / "run", "val")[-1]["count"] == 31
    assert metrics(tmp_path / "run", "train")[-1]["shards_skipped"] == 0


def test_a_shard_that_keeps_failing_is_retried_then_skipped_and_counted(uneven_shards, tmp_path):
    with ShardHTTPServer(uneven_shards) as server:
        server.fail("train-000003.tar", "drop")  # the largest shard: half its bytes, then the connection drops
        result = train(server.url, tmp_path / "run", "--epochs", "1", "--workers", "1", "--log-every", "1",
                       "--on-shard-error", "skip")
        retries = server.requests_for("train-000003.tar")
    assert result.returncode == 0, result.stderr[-3000:]
    assert retries >= 4, "the failing shard was not retried"
    assert "skipping shard" in result.stderr and "train-000003.tar" in result.stderr
    train_rows = metrics(tmp_path / "run", "train")
    assert train_rows[-1]["shards_skipped"] >= 1
    # the rank still ran all its steps: the shortfall was made up from the shards that could be read
    assert train_rows[-1]["step"] == 144 // 8


def test_fail_mode_and_a_dead_server_end_the_run_with_a_clear_error_not_a_hang(uneven_shards, tmp_path):
    with ShardHTTPServer(uneven_shards) as server:
        server.fail("train-000003.tar", "drop")
        failed = train(server.url, tmp_path / "fail", "--epochs", "1", "--workers", "1",
                       "--on-shard-error", "fail")
    assert failed.returncode == 3
    assert "train-000003.tar" in failed.stderr.splitlines()[-1]

    server = ShardHTTPServer(uneven_shards)
    proc = subprocess.Popen([PYTHON, "-m", "distributed_train", "--data", server.url, "--run-dir",
                             str(tmp_path / "dead"), *TINY, "--epochs", "20", "--workers", "1", "--log-every", "1",
                             "--on-shard-error", "skip"],
                            env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics_file = tmp_path / "dead" / "metrics.jsonl"
    import time
    deadline = time.time() + 120
    while not (metrics_file.exists() and metrics_file.read_text().strip()) and time.time() < deadline:
        time.sleep(0.1)
    server.stop()  # mid-epoch: every later request is refused
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 3, err[-3000:]
    assert "could be read" in err.splitlines()[-1]
    assert "Traceback" not in err


def test_build_to_s3_then_train_from_s3(s3_server, s3_bucket, tmp_path):
    from mushroom_demo.painter import generate_demo_dataset

    labels = generate_demo_dataset(tmp_path / "demo", per_class=12, size=64, seed=0)
    url = f"s3://{s3_bucket}/mushrooms"
    build = subprocess.run([PYTHON, "-m", "shard_tools", "build", "--images", str(Path(labels).parent / "images"),
                            "--labels", str(labels), "--out", url, "--size", "48", "--shard-size", "10",
                            "--val-fraction", "0.25"],
                           env=python_env(), capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    result = train(url, tmp_path / "run", "--epochs", "1", "--workers", "1", "--batch-size", "4", "--verify-shards")
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert state["config"]["data"] == url
    assert_secret_nowhere(s3_server.SECRET_KEY, tmp_path / "run", result)


def assert_secret_nowhere(secret: str, run_dir: Path, result) -> None:
    """Not in the console, nor in any file of the run: config.json, checkpoints, metrics.jsonl, the W&B run."""
    assert secret not in result.stdout + result.stderr
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"config.json", "latest.pt", "metrics.jsonl"} <= {p.name for p in files}
    assert any(p.suffix == ".wandb" for p in files), "no W&B run file to check"
    for path in files:
        assert secret.encode() not in path.read_bytes(), f"{path} holds the secret"
    for path in run_dir.glob("checkpoints/*.pt"):  # pickled strings could be stored in another form
        assert secret not in repr(torch.load(path, weights_only=True)), f"{path} holds the secret"


def test_credentials_in_the_data_url_reach_no_log_config_or_checkpoint(uneven_shards, tmp_path):
    """A URL that carries a password (HTTP Basic auth): the run works, and the password is written nowhere."""
    secret = "s3cr3t-Pa55word-in-url"
    with ShardHTTPServer(uneven_shards) as server:
        url = server.url.replace("http://", f"http://reader:{secret}@")
        result = train(url, tmp_path / "run", "--max-steps", "3", "--workers", "1", "--log-every", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"] == server.url.replace("http://", "http://***@")
    assert_secret_nowhere(secret, tmp_path / "run", result)
