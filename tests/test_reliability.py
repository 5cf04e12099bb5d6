"""Reliability drills: a run dir used twice, a stale lock, a checkpoint that cannot be written."""
from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import PYTHON, python_env
from distributed_train import EXIT_PREEMPTED
from distributed_train.checkpoint import SaveError
from distributed_train.run_lock import LOCK_NAME, Holder, RunDirBusy, RunDirLock
from test_train import TORCHRUN, run, train_cmd, wait_for, worker_pids

QUICK = ["--workers", "0", "--wandb", "disabled"]


def write_holder(run_dir, **overrides) -> Holder:
    now = time.time()
    holder = Holder(**{"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": "", "started": now - 60,
                       "heartbeat": now, **overrides})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps(holder.__dict__))
    return holder


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---- the lock on its own ---------------------------------------------------------------------------------------------
def test_a_second_lock_on_the_same_run_dir_is_refused_until_the_first_is_released(tmp_path):
    first = RunDirLock(str(tmp_path))
    assert first.acquire() is None
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RunDirBusy, match=f"pid {os.getpid()} on {socket.gethostname()}"):
        RunDirLock(str(tmp_path)).acquire()  # flock: a second open file in the same process conflicts too
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    second = RunDirLock(str(tmp_path))
    assert second.acquire() is None
    second.release()


@pytest.mark.parametrize("use_os_lock", [True, False], ids=["os-lock", "heartbeat"])
def test_a_live_holder_on_another_host_keeps_the_run_dir(tmp_path, use_os_lock):
    """Some shared file systems grant flock per node only: a fresh heartbeat from another host still counts."""
    write_holder(tmp_path, host="other-node", pid=4242, slurm_job_id="777")
    with pytest.raises(RunDirBusy, match="pid 4242 on other-node, SLURM job 777"):
        RunDirLock(str(tmp_path), use_os_lock=use_os_lock).acquire()


@pytest.mark.parametrize("use_os_lock", [True, False], ids=["os-lock", "heartbeat"])
@pytest.mark.parametrize("stale", ["old heartbeat", "dead pid on this host", "same SLURM job (requeue)"])
def test_a_stale_holder_is_taken_over_with_a_warning(tmp_path, monkeypatch, use_os_lock, stale):
    monkeypatch.setenv("SLURM_JOB_ID", "555")
    if stale == "old heartbeat":
        write_holder(tmp_path, host="other-node", pid=4242, heartbeat=time.time() - 3600)
    elif stale == "dead pid on this host":
        write_holder(tmp_path, pid=dead_pid())
    else:
        write_holder(tmp_path, host="other-node", pid=4242, slurm_job_id="555")
    lock = RunDirLock(str(tmp_path), use_os_lock=use_os_lock)
    warning = lock.acquire()
    assert warning and "took over" in warning and "no longer running" in warning
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_the_heartbeat_keeps_the_holder_fresh(tmp_path):
    lock = RunDirLock(str(tmp_path), use_os_lock=False, heartbeat_s=0.05)
    lock.acquire()
    first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first
    lock.release()


# ---- the trainer ------------------------------------------------------------------------------------------------------
def test_a_second_trainer_on_a_busy_run_dir_exits_at_once_naming_the_holder(uneven_shards, tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([PYTHON, "-c", "import sys, time; from distributed_train.run_lock import RunDirLock; "
                               f"RunDirLock({str(run_dir)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
                              env=python_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        second = run(train_cmd(uneven_shards, run_dir, "--max-steps", "2", *QUICK))
        assert time.perf_counter() - start < 60
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    err = second.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("distributed_train: error: ") and "Traceback" not in err
    assert f"pid {holder.pid} on {socket.gethostname()}" in err and "another --run-dir" in err
    assert not (run_dir / "metrics.jsonl").exists(), "the refused trainer wrote into the run dir"
    # the holder was killed: its lock is stale now, and the next trainer takes over with a warning
    again = run(train_cmd(uneven_shards, run_dir, "--max-steps", "2", *QUICK))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"warning: took over {run_dir / LOCK_NAME}" in again.stderr and f"pid {holder.pid}" in again.stderr
    assert not (run_dir / LOCK_NAME).exists(), "a finished run leaves no lock behind"


def limit_file_size(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or "tmp" in p.name
                  or p.name.endswith((".partial", ".link")))


def test_a_checkpoint_that_cannot_be_written_stops_in_one_line_and_leaves_no_temp_file(uneven_shards, tmp_path):
    # A write error on the very first save: a file-size limit makes every checkpoint write fail half-way.
    run_dir = tmp_path / "full"
    result = run(train_cmd(uneven_shards, run_dir, "--max-steps", "4", "--checkpoint-every", "2", *QUICK),
                 preexec_fn=limit_file_size(200_000))
    assert result.returncode == SaveError.exit_code, result.stderr[-2000:]
    err = result.stderr.strip().splitlines()[-1]
    assert err == (f"distributed_train: error: cannot save checkpoint step 2 to {run_dir / 'checkpoints'}: File too "
                   "large; no checkpoint was saved before"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and leftovers(run_dir) == []
    assert not (run_dir / "checkpoints" / "latest.pt").exists()

    # An I/O error on a later save: step 4's file name is taken by a folder, so its rename fails.
    run_dir = tmp_path / "later"
    (run_dir / "checkpoints" / "step-00000004.pt").mkdir(parents=True)
    result = run(train_cmd(uneven_shards, run_dir, "--max-steps", "6", "--checkpoint-every", "2", *QUICK))
    assert result.returncode == SaveError.exit_code, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].endswith("Is a directory; latest.pt still holds step 2")
    assert leftovers(run_dir) == []
    assert torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["step"] == 2


def test_a_preemption_save_that_fails_does_not_ask_for_a_requeue(uneven_shards, tmp_path):
    """slurm/train.sbatch requeues only on exit code 75 or a latest.pt newer than the STOP file: neither may happen
    when the save on STOP failed, or the job would requeue forever without progress."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest.pt.link").mkdir()  # every save fails when it points latest.pt
    proc = subprocess.Popen(train_cmd(uneven_shards, run_dir, "--epochs", "50", "--log-every", "1",
                                      "--checkpoint-every", "100000", "--eval-every", "1000", *QUICK),
                            env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 120, "training to start")
    (run_dir / "STOP").touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == SaveError.exit_code != EXIT_PREEMPTED, err[-2000:]
    assert "stop requested: saving step" in out and "cannot save checkpoint step" in err
    assert not (run_dir / "checkpoints" / "latest.pt").exists()


# ---- resuming on another number of ranks -------------------------------------------------------------------------------
def epoch_keys(run_dir, epoch: int) -> list[str]:
    return [key for f in sorted((run_dir / "samples").glob(f"epoch-{epoch:04d}-rank-*.txt"))
            for key in f.read_text().split()]


def test_two_ranks_stopped_mid_epoch_finish_it_on_one_rank_with_every_sample_once(uneven_shards, tmp_path):
    """144 training samples, global batch 16: 9 steps per epoch. 2 ranks stop after step 4 of epoch 0; 1 rank
    finishes the epoch with a per-rank batch of 16 and trains on exactly the samples the 2 ranks had not used."""
    common = ["--workers", "1", "--wandb", "disabled", "--record-samples", "--eval-every", "100"]
    reference = tmp_path / "reference"
    assert run(train_cmd(uneven_shards, reference, "--max-steps", "9", *common, launcher=TORCHRUN)).returncode == 0
    run_dir = tmp_path / "run"
    first = run(train_cmd(uneven_shards, run_dir, "--max-steps", "4", *common, launcher=TORCHRUN))
    assert first.returncode == 0, first.stderr[-2000:]
    saved = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert (saved["epoch"], saved["batches_done"]) == (0, 4), "the test needs a stop in the middle of epoch 0"

    refused = run(train_cmd(uneven_shards, run_dir, "--max-steps", "9", *common, "--batch-size", "6",
                            "--accum-steps", "5"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1].startswith(
        "distributed_train: error: the checkpoint's global batch of 16 cannot be kept on 1 ranks with --batch-size 6")

    resumed = run(train_cmd(uneven_shards, run_dir, "--max-steps", "9", *common))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming a run of 2 ranks on 1: --batch-size 16 --accum-steps 1 keep its global batch" in resumed.stderr
    keys = epoch_keys(run_dir, 0)
    assert len(keys) == len(set(keys)) == 9 * 16, "a sample was used twice, or one was left out"
    assert set(keys) == set(epoch_keys(reference, 0)), "not the samples the uninterrupted epoch trains on"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["lr"] == json.loads((reference / "config.json").read_text())["lr"] and config["batch_size"] == 16
    assert torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["step"] == 9


def test_kill_9_of_one_rank_under_torchrun_max_restarts_resumes_to_the_same_final_step(uneven_shards, tmp_path):
    """The restarted ranks meet in the same agent store as before: dist.attempt_store keeps them from connecting to
    the killed attempt's addresses (without it this failed about 2 runs in 5 under load)."""
    run_dir = tmp_path / "run"
    cmd = train_cmd(uneven_shards, run_dir, "--max-steps", "30", "--workers", "0", "--wandb", "disabled",
                    "--log-every", "1", "--checkpoint-every", "2",
                    launcher=[PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "--max-restarts", "1"])
    proc = subprocess.Popen(cmd, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = run_dir / "checkpoints" / "latest.pt"
    wait_for(lambda: latest.exists() and torch.load(latest, weights_only=True)["step"] >= 4, 180, "a checkpoint")
    os.kill(worker_pids(proc.pid)[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "resuming at step" in out and "done: 30 steps" in out
    assert torch.load(latest, weights_only=True)["step"] == 30
    assert not (run_dir / LOCK_NAME).exists()
