"""The trainer end to end: 2-process torchrun (gloo) on uneven shards, gradients, resumption, preemption, W&B,
evaluate and predict. Small widths and images keep each run to seconds on a 2-core CPU."""
import contextlib
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASSES, PYTHON, class_image, python_env
from distributed_train import EXIT_DIVERGED, EXIT_PREEMPTED
from distributed_train.checkpoint import model_from_checkpoint
from distributed_train.data import eval_loader, stats_tensors
from distributed_train.evaluate import evaluate
from distributed_train.config import resolve_precision
from shard_tools.manifest import Manifest
from wandb_records import history

TINY = ["--arch", "resnet26", "--width", "0.125", "--image-size", "32", "--batch-size", "8"]
TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def train_cmd(data, run_dir, *extra, launcher=(PYTHON,)):
    return [*launcher, "-m", "distributed_train", "--data", str(data), "--run-dir", str(run_dir), *TINY, *extra]


def run(cmd, timeout=240, env=None, **kw):
    result = subprocess.run(cmd, env=env or python_env(), capture_output=True, text=True, timeout=timeout, **kw)
    return result


def records(run_dir, kind):
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


@pytest.fixture(scope="module")
def ddp_run(uneven_shards, tmp_path_factory):
    """One 2-process run, 4 epochs, shared by the tests that only read its outputs."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    result = run(train_cmd(uneven_shards, run_dir, "--epochs", "4", "--workers", "2", "--log-every", "2",
                           "--lr", "0.05", "--clip-grad-norm", "5", "--wandb", "offline", launcher=TORCHRUN))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result.stdout


def test_two_rank_run_steps_validates_once_and_learns(ddp_run):
    run_dir, stdout = ddp_run
    config = json.loads(Path(run_dir, "config.json").read_text())
    assert config["world_size"] == 2
    # 144 train samples / 2 ranks / batch 8 = 9 steps per epoch on every rank (ranks that disagreed would hang)
    train = records(run_dir, "train")
    assert train[-1]["step"] == 36
    val = records(run_dir, "val")
    assert [v["count"] for v in val] == [31] * 4, "every validation sample counted exactly once"
    assert sum(map(sum, val[-1]["confusion"])) == 31
    first, last = np.mean([r["loss"] for r in train[:2]]), np.mean([r["loss"] for r in train[-2:]])
    assert last < first * 0.8, f"training loss did not go down: {first:.3f} -> {last:.3f}"
    assert val[-1]["top1"] >= 0.9
    assert set(val[-1]) >= {"top1", "top5", "loss", "per_class_accuracy", "confusion"}
    assert Path(run_dir, "confusion_matrix.png").stat().st_size > 0
    assert Path(run_dir, "training_curves.png").stat().st_size > 0


def test_checkpoint_is_self_contained_and_weights_only(ddp_run):
    run_dir, _ = ddp_run
    state = torch.load(Path(run_dir, "checkpoints", "latest.pt"), weights_only=True)
    assert state["step"] == 36 and state["epoch"] == 4
    meta = state["meta"]
    assert meta["classes"] == CLASSES and len(meta["mean"]) == 3 and meta["arch"] == "resnet26"
    assert meta["wandb_id"]
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config"} <= set(state)
    # saved at each epoch's end (steps 9, 18, 27, 36); keep_checkpoints=3 drops the oldest
    assert sorted(p.name for p in Path(run_dir, "checkpoints").glob("step-*.pt")) == \
        [f"step-{s:08d}.pt" for s in (18, 27, 36)]


def test_best_checkpoint_holds_the_best_validation_steps_weights(ddp_run, uneven_shards):
    run_dir, _ = ddp_run
    val = records(run_dir, "val")
    best_step = next(v["step"] for v in val if v["top1"] == max(u["top1"] for u in val))  # the first of equals
    best = torch.load(Path(run_dir, "checkpoints", "best.pt"), weights_only=True)
    assert best["step"] == best_step and best["best_top1"] == max(v["top1"] for v in val)
    # its weights, evaluated here, give the loss logged at that step and not the loss of any other
    model, meta = model_from_checkpoint(best, torch.device("cpu"))
    manifest = Manifest.read(str(uneven_shards))
    loader = eval_loader(manifest, "val", rank=0, world_size=1, batch_size=8,
                         image_size=meta["image_size"], workers=0)
    precision = resolve_precision("auto", torch.device("cpu"))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    mean, std = stats_tensors(meta["mean"], meta["std"], "cpu")
    loss = evaluate(model, loader, manifest.num_classes, torch.device("cpu"), mean, std, autocast)["loss"]
    closest = min(val, key=lambda v: abs(v["loss"] - loss))
    assert closest["step"] == best_step and closest["loss"] == pytest.approx(loss, rel=1e-2), (loss, val)


def test_wandb_offline_run_holds_the_logged_metrics(ddp_run):
    run_dir, _ = ddp_run
    [run_file] = glob.glob(str(Path(run_dir, "wandb", "offline-run-*", "run-*.wandb")))
    rows = history(run_file)
    train_losses = [r["train/loss"] for r in rows if "train/loss" in r]
    val_top1 = [r["val/top1"] for r in rows if "val/top1" in r]
    logged = records(run_dir, "train")
    assert train_losses == pytest.approx([r["loss"] for r in logged])
    assert val_top1 == pytest.approx([r["top1"] for r in records(run_dir, "val")])
    assert any("val/confusion_matrix_table/_type" in r for r in rows), "confusion matrix plot not logged"
    assert any(any(k.startswith("val/acc_") for k in r) for r in rows), "per-class accuracy not logged"


def test_evaluate_cli_counts_every_sample_and_names_bad_input(ddp_run, uneven_shards, damaged_shards):
    run_dir, _ = ddp_run
    result = run([PYTHON, "-m", "distributed_train.evaluate", "--checkpoint", str(run_dir / "checkpoints/best.pt"),
                  "--data", str(uneven_shards), "--json", "--workers", "0"])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["count"] == 31 and report["top1"] >= 0.9
    missing_split = run([PYTHON, "-m", "distributed_train.evaluate", "--checkpoint", str(run_dir / "checkpoints/best.pt"),
                         "--data", str(uneven_shards), "--split", "test", "--workers", "0"])
    assert missing_split.returncode == 2 and "Traceback" not in missing_split.stderr
    assert "no 'test' split (it has: train, val)" in missing_split.stderr
    damaged = run([PYTHON, "-m", "distributed_train.evaluate", "--checkpoint", str(run_dir / "checkpoints/best.pt"),
                   "--data", str(damaged_shards), "--workers", "1"])
    assert damaged.returncode == 3 and "Traceback" not in damaged.stderr
    assert damaged.stderr.startswith("evaluate: error: sample 000000155 of ") and "val-000001.tar cannot be decoded" in damaged.stderr
    # under torchrun only one rank reads the damaged sample; the other, waiting in the all-reduce, says why it stops
    two_ranks = run([*TORCHRUN, "-m", "distributed_train.evaluate", "--checkpoint", str(run_dir / "checkpoints/best.pt"),
                     "--data", str(damaged_shards), "--workers", "0"])
    before_torchrun = two_ranks.stderr.split("ChildFailedError")[0]
    assert two_ranks.returncode != 0 and before_torchrun.count("val-000001.tar cannot be decoded") == 1
    assert "stops: another rank left the job" in before_torchrun, two_ranks.stderr[-3000:]
    assert "Traceback" not in before_torchrun.split("torch/distributed/elastic")[0], two_ranks.stderr[-3000:]


def test_predict_names_the_right_class_and_rejects_non_images(ddp_run, tmp_path):
    run_dir, _ = ddp_run
    rng = np.random.default_rng(123)
    paths = []
    for label in range(3):
        path = tmp_path / f"class{label}.png"  # not JPEG on purpose: predict decodes any image file
        Image.fromarray(class_image(label, rng)).save(path)
        paths.append(str(path))
    bogus = tmp_path / "notes.jpg"
    bogus.write_text("not an image")
    result = run([PYTHON, "-m", "distributed_train.predict", "--checkpoint", str(run_dir / "checkpoints/best.pt"),
                  *paths, str(bogus), "--json", "--top-k", "2"])
    assert result.returncode == 1, "a failed file must make the exit code non-zero"
    predictions = [json.loads(line) for line in result.stdout.splitlines()]
    assert [p["predictions"][0]["class"] for p in predictions] == CLASSES
    assert all(len(p["predictions"]) == 2 for p in predictions)
    assert "notes.jpg: error: not a readable image" in result.stderr
    assert "Traceback" not in result.stderr


def test_ddp_gradients_equal_single_process_and_accumulation(tmp_path):
    script = str(Path(__file__).with_name("ddp_grad_check.py"))
    outs = {}
    for mode, launcher in (("ddp", TORCHRUN), ("accum", [PYTHON]), ("full", [PYTHON])):
        outs[mode] = tmp_path / f"{mode}.pt"
        result = run([*launcher, script, mode, str(outs[mode])])
        assert result.returncode == 0, result.stderr[-3000:]
    grads = {mode: torch.load(path, weights_only=True) for mode, path in outs.items()}
    for mode in ("ddp", "accum"):
        for name, g in grads["full"].items():
            assert torch.allclose(grads[mode][name], g, rtol=1e-4, atol=1e-6), f"{mode}: gradient of {name} differs"


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# every recipe extra whose randomness a resumed run must replay: per-image (workers), per-batch mixing (training
# process), crop sizes that change between epochs, and class weights
RECIPE_EXTRAS = ["--auto-augment", "trivialaugment", "--random-erase", "0.5", "--mixup", "0.2", "--cutmix", "1.0",
                 "--class-balance", "sqrt", "--progressive", "32:48", "--eval-image-size", "56"]


@pytest.mark.parametrize("decode,extras", [("workers", []), ("device", []), ("workers", RECIPE_EXTRAS)],
                         ids=["workers", "device", "recipe-extras"])
def test_kill_and_restart_resumes_mid_epoch_to_the_same_weights(uneven_shards, tmp_path, decode, extras):
    # --decode device reads batches ahead on a thread and drops them at a stop: the resumed run must not notice
    args = ["--max-steps", "12", "--checkpoint-every", "3", "--workers", "2", "--wandb", "disabled",
            "--batch-size", "16", "--image-size", "48", "--log-every", "1", "--decode", decode, "--ema-decay", "0.9",
            *extras]
    straight = tmp_path / "straight"
    result = run(train_cmd(uneven_shards, straight, *args))
    assert result.returncode == 0, result.stderr[-3000:]
    # without a GPU, --decode device decodes on the training thread: said once, in one line (and only then)
    warned = [line for line in result.stderr.splitlines() if "--decode device without a GPU" in line]
    assert len(warned) == (decode == "device" and not torch.cuda.is_available()), result.stderr[-3000:]

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen(train_cmd(uneven_shards, resumed, *args), env=python_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = resumed / "checkpoints" / "latest.pt"
    wait_for(latest.exists, 120, "the first checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to save anything more
    proc.wait()
    killed_at = torch.load(latest, weights_only=True)["step"]
    assert killed_at < 12, "the run finished before it could be killed; the test proves nothing"

    result = run(train_cmd(uneven_shards, resumed, *args))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming at step {killed_at}" in result.stdout
    steps = [r["step"] for r in records(resumed, "train")]
    assert steps[steps.index(killed_at) + 1] == killed_at + 1, "the step count did not continue"

    a = torch.load(straight / "checkpoints/latest.pt", weights_only=True)
    b = torch.load(latest, weights_only=True)
    assert a["step"] == b["step"] == 12
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor.float(), b["model"][name].float(), atol=1e-5), f"{name} differs after resume"
    # the EMA too, so its update count (which sets the warmup decay) was saved and restored
    assert a["ema"]["n_averaged"].item() == b["ema"]["n_averaged"].item() == 12
    for name, tensor in a["ema"].items():
        assert torch.allclose(tensor.float(), b["ema"][name].float(), atol=1e-5), f"EMA {name} differs after resume"


def test_sigterm_on_one_rank_stops_all_ranks_with_a_checkpoint(uneven_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = train_cmd(uneven_shards, run_dir, "--epochs", "50", "--workers", "1", "--wandb", "disabled",
                    "--log-every", "1", "--checkpoint-every", "1000", launcher=TORCHRUN)
    proc = subprocess.Popen(cmd, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 120, "training to start")
    os.kill(worker_pids(proc.pid)[-1], signal.SIGTERM)  # one rank only: the others must learn it at the next step
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert f"exiting with code {EXIT_PREEMPTED}" in out
    assert f"exitcode  : {EXIT_PREEMPTED}" in out or f"exitcode: {EXIT_PREEMPTED}" in out.replace("  ", " ")
    state = torch.load(run_dir / "checkpoints/latest.pt", weights_only=True)
    assert state["step"] >= 3 and state["step"] < 50 * 9


def test_stop_file_makes_a_single_process_exit_with_the_requeue_code(uneven_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(uneven_shards, run_dir, "--epochs", "50", "--workers", "0", "--wandb",
                                      "disabled", "--log-every", "1"),
                            env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 120, "training to start")
    (run_dir / "STOP").touch()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out[-2000:]
    stopped_at = torch.load(run_dir / "checkpoints/latest.pt", weights_only=True)["step"]
    assert stopped_at >= 2
    # the next start removes the stale STOP file and continues from there
    result = run(train_cmd(uneven_shards, run_dir, "--max-steps", str(stopped_at + 2), "--workers", "0",
                           "--wandb", "disabled"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming at step {stopped_at}" in result.stdout
    assert not (run_dir / "STOP").exists()


def test_a_diverging_run_stops_every_rank_with_its_own_exit_code(uneven_shards, tmp_path):
    """lr 1e30 turns the weights to inf within a few steps: both ranks must agree to stop (no hang in the next
    all-reduce), save nothing, and exit with EXIT_DIVERGED, not the requeue code."""
    run_dir = tmp_path / "run"
    result = run(train_cmd(uneven_shards, run_dir, "--lr", "1e30", "--max-steps", "40", "--log-every", "1",
                           "--checkpoint-every", "1000", "--workers", "0", "--wandb", "disabled", launcher=TORCHRUN),
                 timeout=120)
    assert f"exitcode  : {EXIT_DIVERGED}" in result.stderr or f"exitcode: {EXIT_DIVERGED}" in result.stderr, \
        result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.count("error: training diverged") == 1, "reported once, by rank 0"
    assert 'distributed_train/' not in result.stderr.split("ChildFailedError")[0], "no traceback from a rank"
    logged = records(run_dir, "train")
    assert 1 <= len(logged) < 40 and all(math.isfinite(r["loss"]) for r in logged)
    assert not (run_dir / "checkpoints" / "latest.pt").exists()


def test_a_rank_that_fails_is_named_once_and_the_others_say_why_they_stop(damaged_shards, tmp_path):
    """One rank meets a damaged sample: it prints the one-line error; the rank waiting for it in a collective says
    that another rank left, without a page of gloo traceback that would bury the cause."""
    result = run(train_cmd(damaged_shards, tmp_path / "run", "--max-steps", "20", "--workers", "0", "--wandb",
                           "disabled", launcher=TORCHRUN), timeout=120)
    assert result.returncode != 0
    before_torchrun = result.stderr.split("ChildFailedError")[0]
    assert before_torchrun.count("train-000000.tar cannot be decoded") == 1, result.stderr[-3000:]
    assert "stops: another rank left the job (its error is printed above)" in before_torchrun, result.stderr[-3000:]
    assert "Traceback" not in before_torchrun.split("torch/distributed/elastic")[0], result.stderr[-3000:]


def test_resuming_with_other_settings_refuses_warns_or_adapts(uneven_shards, tmp_path):
    """Another optimizer cannot take over the saved state (refused in one line); bf16 -> fp16 starts a fresh loss
    scale; a new --lr is not applied to a restored schedule, and the run says so."""
    run_dir = tmp_path / "run"
    common = ["--workers", "0", "--wandb", "disabled"]
    assert run(train_cmd(uneven_shards, run_dir, "--max-steps", "2", "--precision", "bf16", *common)).returncode == 0

    other_optimizer = run(train_cmd(uneven_shards, run_dir, "--max-steps", "4", "--optimizer", "adamw", *common))
    assert other_optimizer.returncode != 0
    assert "optimizer: checkpoint 'sgd' vs now 'adamw'" in other_optimizer.stderr
    assert "Traceback" not in other_optimizer.stderr

    # another model or class list would load the wrong weights: refused in one line, before anything is written
    renamed = tmp_path / "renamed"
    shutil.copytree(uneven_shards, renamed)
    manifest = Manifest.read(str(renamed))
    manifest.classes = ["rouge", "vert", "bleu"]
    manifest.write(str(renamed))
    for data, flags, expected in (
            (uneven_shards, ["--arch", "resnet50", "--width", "0.25"],
             "(arch: checkpoint 'resnet26' vs now 'resnet50'; width: checkpoint 0.125 vs now 0.25)"),
            (renamed, [], "(classes: checkpoint ['red', 'green', 'blue'] vs now ['rouge', 'vert', 'bleu'])")):
        refused = run([*train_cmd(data, run_dir, "--max-steps", "4", *common), *flags])
        assert refused.returncode != 0 and expected in refused.stderr, refused.stderr[-2000:]
        assert "cannot be resumed with these settings" in refused.stderr and "Traceback" not in refused.stderr
        assert torch.load(run_dir / "checkpoints/latest.pt", weights_only=True)["step"] == 2

    resumed = run(train_cmd(uneven_shards, run_dir, "--max-steps", "4", "--precision", "fp16", "--lr", "0.3",
                            "--log-every", "1", *common))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step 2" in resumed.stdout and "fp16" in resumed.stdout
    assert "settings are not used: peak lr 0.3 (the checkpoint's: 0.003125)" in resumed.stderr
    assert "lr 0.003125" in resumed.stdout, "the start line names the lr actually used"
    assert torch.load(run_dir / "checkpoints/latest.pt", weights_only=True)["scaler"], "fp16 saved its loss scale"
    # a longer run recomputes the schedule: the lr jump is reported in one line, with the lr the run then logs
    # (2 steps: warmup 1, then cosine to 0 at step 2; 4 steps: at step 3 the lr is 0.25 x the peak)
    [jump] = [line for line in resumed.stderr.splitlines() if "schedule ran to 2 steps" in line]
    before, after = map(float, re.search(r"now give 4: .* lr jumps from (\S+) to (\S+) after step 3$", jump).groups())
    [logged] = [r["lr"] for r in records(run_dir, "train") if r["step"] == 3]
    assert before == 0 and after == pytest.approx(logged, rel=1e-3) and logged == pytest.approx(0.003125 * 0.25)


def test_bad_data_location_is_a_one_line_error(tmp_path):
    result = run(train_cmd(tmp_path / "nowhere", tmp_path / "run", "--wandb", "disabled"))
    assert result.returncode == 2
    assert "no manifest at" in result.stderr and "Traceback" not in result.stderr


def worker_pids(agent_pid: int) -> list[int]:
    """The rank processes torchrun started, ordered by rank (children of the agent, by start order)."""
    def children(pid):
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        return sorted(map(int, out))
    wait_for(lambda: len(children(agent_pid)) >= 2, 30, "worker processes")
    return children(agent_pid)


def test_a_killed_dataloader_worker_ends_the_run_with_one_line(uneven_shards, tmp_path):
    """SIGKILL a real DataLoader worker mid-epoch (what the OOM killer does): the run ends with one line saying what
    to lower and that the run dir resumes, not with a page of traceback."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(uneven_shards, run_dir, "--epochs", "50", "--workers", "1", "--wandb",
                                      "disabled", "--log-every", "1"),
                            env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().strip(), 120, "training to start")
    own_cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    killed = set()
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:  # again if a kill landed between two epochs' workers
        for pid in map(int, subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                           text=True).stdout.split()):
            with contextlib.suppress(OSError):  # workers are forks of the trainer: same command line
                if Path(f"/proc/{pid}/cmdline").read_bytes() == own_cmdline:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    assert killed, "no DataLoader worker was found to kill"
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    # torch words it by where the trainer notices: "(pid N) is killed by signal", "(pid(s) N) exited
    # unexpectedly", or a connection reset while fetching the batch's shared memory from the dead worker
    [line] = [l for l in err.splitlines() if "DataLoader worker" in l]
    pid = re.search(r"DataLoader worker \(pid(?:\(s\))? (\d+)\)", line)
    assert (pid and int(pid.group(1)) in killed) or "a DataLoader worker died while handing over a batch" in line
    assert line.startswith("distributed_train: error: ") and "fewer --workers" in line
    assert "same --run-dir resumes" in line


SMALL = ["--width", "0.25", "--image-size", "32", "--workers", "0", "--wandb", "disabled", "--log-every", "1"]


def test_accumulation_with_adamw_end_to_end(uneven_shards, tmp_path):
    """--accum-steps 2 x batch 8 with AdamW: 4 steps read 64 distinct samples, the auto lr follows the global batch
    of 16, and the checkpoint holds AdamW's state. (Equal gradients are checked in ddp_grad_check.py.)"""
    run_dir = tmp_path / "run"
    result = run(train_cmd(uneven_shards, run_dir, *SMALL, "--accum-steps", "2", "--optimizer", "adamw",
                           "--max-steps", "4", "--record-samples"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 16, lr 6.25e-05" in result.stdout  # 1e-3 x 16 / 256
    assert [r["step"] for r in records(run_dir, "train")] == [1, 2, 3, 4]
    keys = (run_dir / "samples" / "epoch-0000-rank-00000.txt").read_text().split()
    assert len(keys) == len(set(keys)) == 4 * 2 * 8
    state = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 4 and state["config"]["optimizer"] == "adamw"
    moments = [s for s in state["optimizer"]["state"].values()]
    assert moments and all("exp_avg_sq" in s and s["step"].item() == 4 for s in moments)


def test_compiled_model_trains_like_the_eager_one(uneven_shards, tmp_path):
    """--compile (inductor) takes the same steps as eager mode: same weights after 3 steps, within float error."""
    weights = {}
    for mode in ("--compile", "--no-compile"):
        run_dir = tmp_path / mode.strip("-")
        result = run(train_cmd(uneven_shards, run_dir, *SMALL, "--max-steps", "3", "--precision", "fp32", mode),
                     timeout=900)  # inductor compiles C++ kernels before the first step
        assert result.returncode == 0, result.stderr[-3000:]
        weights[mode] = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["model"]
    compiled, eager = weights["--compile"], weights["--no-compile"]
    assert compiled.keys() == eager.keys()
    for name in eager:
        assert torch.allclose(compiled[name].float(), eager[name].float(), rtol=1e-3, atol=1e-4), name
