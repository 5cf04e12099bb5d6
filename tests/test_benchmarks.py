"""The GPU benchmark runs rarely and on borrowed time: a tiny CPU pass makes sure every part of it still works."""
import json
import subprocess
import sys

from conftest import REPO, python_env


def test_bench_gpu_script_runs_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "results.json"
    command = [sys.executable, "bench_gpu.py", "--device", "cpu", "--width", "0.125", "--batch-size", "8",
               "--image-size", "32", "--configs", "fp32,bf16 + channels_last,bf16 + channels_last@4", "--warmup", "1",
               "--steps", "1", "--rounds", "2", "--e2e-rounds", "2", "--unique", "10", "--size", "64",
               "--e2e-warmup", "2", "--e2e-steps", "4", "--log-every", "2", "--loaders", "workers:1,device:1",
               "--runs", "workers:1,synthetic", "--out", str(out), "--workdir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO / "benchmarks", env=python_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    # the batched crops against the workers' path (another decoder, a uint8 resize) and the per-image crops
    check = report["device_decode_check"]
    assert check["repeatable"], check
    for reference in ("vs_workers_path", "vs_crop_each"):
        assert 0 < check[reference]["mean_abs_diff"] < 2 and check[reference]["p99_abs_diff"] < 20, check
    assert all(check[k] > 0 for k in ("decode_ms", "decode_crop_each_ms", "decode_crop_batch_ms"))
    # the loaders alone: 10x the prefetch queue (1 worker x 4) after the first batch
    assert [(r["run"], r["batches"]) for r in report["loaders"]] == [("workers:1", 40), ("device:1", 40)]
    assert all(r["per_worker"] > 0 for r in report["loaders"])
    assert [r["config"] for r in report["model_only"]] == ["fp32@8", "bf16 + channels_last@8",
                                                           "bf16 + channels_last@4"]
    assert all(len(r["rounds"]) == 2 and r["images_per_s"] > 0 for r in report["model_only"])
    assert report["model_only"][1]["vs_reference"] == 1.0
    # the timed window is 10x the deepest queue (1 worker x prefetch factor 4), the runs alternate
    runs = report["end_to_end_runs"]
    assert [r["run"] for r in runs] == ["workers:1", "synthetic", "synthetic", "workers:1"]
    assert all(r["timed_steps"] == 40 and 0 <= r["data_wait"] <= 1 for r in runs)
    assert [r["run"] for r in report["end_to_end"]] == ["workers:1", "synthetic"]
    assert report["end_to_end"][1]["vs_synthetic"] == 1.0
    assert "per worker" in result.stdout and "x --synthetic" in result.stdout


def test_bench_scale_script_runs_every_part_on_a_small_size(tmp_path):
    command = [sys.executable, "bench_scale.py", "--grouping", "2000", "4000", "--rounds", "1", "--parts", "7",
               "--build", "200", "400", "--array", "2", "--tmp", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO / "benchmarks", env=python_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert out.count("us/hash") == 6 and out.count("serial (all but encode and write)") == 2
    assert "k=7    " in out.split("k forced")[1]
    assert "n=400 array path: plan" in out and "merge peak RSS" in out and "parent peak RSS grows" in out
    assert not list(tmp_path.iterdir())  # generated images and outputs are removed


def test_grouping_profile_and_change_scripts_run_on_a_small_size():
    # they reach into split.py's private helpers and its history: a refactor must not break them silently
    for script, args, expect in [("profile_grouping.py", ["3000"], "sharing their first key with another value"),
                                 ("bench_grouping_change.py", ["--before", "HEAD", "2000", "3000"], "same groups: True")]:
        result = subprocess.run([sys.executable, script, *args], cwd=REPO / "benchmarks", env=python_env(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert expect in result.stdout and "same groups: False" not in result.stdout


def test_bench_peers_preprocess_part_runs_without_the_peers(tmp_path):
    """(a0) of bench_peers.py, the part that needs no peer installed: torchvision's decode + v2 crop vs ours on a few
    JPEGs, and its parts."""
    import torch
    from torchvision.io import encode_jpeg
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(encode_jpeg(torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)).numpy())
    code = f"import bench_peers; from pathlib import Path; bench_peers.bench_preprocess(Path({str(tmp_path)!r}), 32, 2)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO / "benchmarks", env=python_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for expect in ("torchvision v2", "ours (Preprocess)", "decode_rgb only", "box: RandomResizedCropFlip.box",
                   "copied into NHWC (ring)", "x the time of torchvision's; the decode in"):
        assert expect in result.stdout, expect
