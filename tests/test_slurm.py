"""slurm/ scripts on a real SLURM cluster: two emulated nodes on this machine, started by tests/slurm_cluster.sh.

Needs root and Debian's packages (`.ci/install_slurm.sh`); without them the whole module is skipped with the reason,
except in CI (CI=true) as root, where scripts/test.sh installs them: a missing piece there fails the run.
Jobs run the interpreter of this test process (PYTHON=sys.executable), so they see the same installed project.
Every job has a SLURM time limit and the tests poll with their own deadline; nothing here waits forever.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "tests" / "slurm_cluster.sh"
TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"
SUBMIT_SHARD = REPO / "slurm" / "submit_shard.sh"
JOB_DEADLINE_S = 300  # per job; the SLURM limit (--time) is a little longer so our deadline fires first
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE"}
# A tiny model and few steps: the tests are about the batch scripts, not about learning.
TINY_TRAINER = "--width 0.125 --image-size 32 --workers 1 --log-every 1 --eval-every 100"


def why_no_cluster() -> str | None:
    if os.geteuid() != 0:
        return "SLURM tests need root (munged, slurmd and /etc/hosts entries); run as root or skip -m 'not slurm'"
    missing = [c for c in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if shutil.which(c) is None]
    if missing:
        return f"SLURM packages missing ({', '.join(missing)} not found): run .ci/install_slurm.sh"
    return None


def must_run() -> bool:
    """In CI as root scripts/test.sh has installed SLURM: a skip there would hide a broken install."""
    return os.environ.get("CI", "").lower() == "true" and os.geteuid() == 0


class Cluster:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.env = {**os.environ, "SLURM_CLUSTER_DIR": str(state_dir), "SLURM_CONF": str(state_dir / "slurm.conf")}

    def run(self, *cmd, env: dict | None = None, cwd: Path | None = None, timeout: float = 60,
            check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(c) for c in cmd], env={**self.env, **(env or {})}, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, check=check)

    def submit(self, script: Path, *sbatch_args, env: dict, log_dir: Path, script_args=()) -> str:
        out = self.run("sbatch", "--parsable", f"--time={JOB_DEADLINE_S // 60 + 1}", f"--output={log_dir}/job-%j.out",
                       *sbatch_args, script, *script_args, env=env, cwd=log_dir).stdout
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str] | None:
        """scontrol's fields for the job, or None once the controller has forgotten it (MinJobAge)."""
        r = self.run("scontrol", "show", "job", "--oneliner", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout)) if r.returncode == 0 else None

    def wait(self, job_id: str, log: Path, deadline_s: float = JOB_DEADLINE_S) -> dict:
        """Poll until the job has finished; returns its last fields plus MaxRestarts, the most restarts seen."""
        end, max_restarts, last = time.monotonic() + deadline_s, 0, None
        while time.monotonic() < end:
            fields = self.job(job_id)
            if fields is None:
                pytest.fail(f"job {job_id} vanished before it was seen finishing (last: {last})\n{tail(log)}")
            max_restarts = max(max_restarts, int(fields.get("Restarts", 0)))
            if fields["JobState"] in FINISHED_STATES:
                return {**fields, "MaxRestarts": max_restarts}
            last = fields["JobState"]
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        pytest.fail(f"job {job_id} still {last} after {deadline_s} s; cancelled\n{tail(log)}")


def tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return f"--- last lines of {path} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = why_no_cluster()
    if reason and must_run():
        pytest.fail(f"CI=true as root, so the SLURM tests must run, but: {reason}")
    if reason:
        pytest.skip(reason)
    cluster = Cluster(tmp_path_factory.mktemp("slurm") / "state")
    start = cluster.run(CLUSTER_SCRIPT, "start", timeout=120, check=False)
    if start.returncode != 0:
        logs = "\n".join(tail(p, 15) for p in sorted(cluster.state_dir.glob("*.log")))
        cluster.run(CLUSTER_SCRIPT, "stop", timeout=120, check=False)
        pytest.fail(f"tests/slurm_cluster.sh start failed:\n{start.stdout}{start.stderr}\n{logs}")
    yield cluster
    cluster.run(CLUSTER_SCRIPT, "stop", timeout=120, check=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """60 generated photos (5 classes) and their one-process build: small shards, so 3 slices get several each."""
    from mushroom_demo.painter import generate_demo_dataset

    root = tmp_path_factory.mktemp("slurm-data")
    generate_demo_dataset(root / "photos", per_class=12, size=48, seed=0)
    settings = ["--size", "32", "--shard-size", "8", "--seed", "0"]
    subprocess.run([sys.executable, "-m", "shard_tools", "build", "--images", root / "photos" / "images",
                    "--labels", root / "photos" / "labels.csv", "--out", root / "shards", "--workers", "1",
                    "--no-progress", *settings], check=True, capture_output=True, timeout=300)
    return {"photos": root / "photos", "shards": root / "shards", "settings": settings}


def train_env(run_dir: Path, data: Path, max_steps: int, extra: str, **more) -> dict:
    return {"PYTHON": sys.executable, "DATA": str(data), "RUN_DIR": str(run_dir), "ARCH": "resnet26",
            "MAX_STEPS": str(max_steps), "BATCH_SIZE": "8", "NPROC_PER_NODE": "2",
            "EXTRA_ARGS": f"{TINY_TRAINER} {extra}", **more}


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if r.get("kind") == "train"]


def test_rendezvous_spans_both_nodes(cluster, tmp_path):
    """train.sbatch's srun + torchrun line alone, with a probe module instead of the trainer: 2 nodes x 2 ranks."""
    env = {"PYTHON": sys.executable, "PYTHONPATH": str(REPO / "tests"), "MODULE": "slurm_probe",
           "NPROC_PER_NODE": "2", "RUN_DIR": str(tmp_path / "run")}
    job = cluster.submit(TRAIN_SBATCH, "--nodes=2", env=env, log_dir=tmp_path)
    log = tmp_path / f"job-{job}.out"
    result = cluster.wait(job, log)
    assert (result["JobState"], result["ExitCode"]) == ("COMPLETED", "0:0"), tail(log)

    probes = [dict(re.findall(r"(\w+)=(\S+)", path.read_text()))
              for path in sorted((tmp_path / "run").glob("probe-*.txt"))]
    assert sorted(int(p["rank"]) for p in probes) == [0, 1, 2, 3], tail(log)
    assert {p["world"] for p in probes} == {"4"} and {p["rank_sum"] for p in probes} == {"6"}, tail(log)
    ranks_per_node = {n: sum(p["node"] == n for p in probes) for n in ("node1", "node2")}
    assert ranks_per_node == {"node1": 2, "node2": 2}, tail(log)


def test_two_node_training_finishes_with_checkpoint(cluster, dataset, tmp_path):
    import torch

    run_dir = tmp_path / "run"
    env = train_env(run_dir, dataset["shards"], max_steps=4, extra="--wandb disabled")
    job = cluster.submit(TRAIN_SBATCH, "--nodes=2", env=env, log_dir=tmp_path)
    log = tmp_path / f"job-{job}.out"
    result = cluster.wait(job, log)
    assert (result["JobState"], result["ExitCode"]) == ("COMPLETED", "0:0"), tail(log)

    assert json.loads((run_dir / "config.json").read_text())["world_size"] == 4
    latest = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    assert latest["step"] == 4
    assert train_steps(run_dir)[-1] == 4


def test_usr1_checkpoints_requeues_and_resumes(cluster, dataset, tmp_path):
    """The batch shell gets USR1 (as before a time limit): the job saves, requeues itself, resumes and finishes."""
    run_dir, max_steps = tmp_path / "run", 12
    # W&B offline: the requeued run must continue the same W&B run, not start a new one.
    env = train_env(run_dir, dataset["shards"], max_steps=max_steps, extra="--wandb offline",
                    WANDB_SILENT="true")
    job = cluster.submit(TRAIN_SBATCH, "--nodes=2", env=env, log_dir=tmp_path)
    log = tmp_path / f"job-{job}.out"

    end = time.monotonic() + JOB_DEADLINE_S
    while not train_steps(run_dir) or train_steps(run_dir)[-1] < 2:
        state = (cluster.job(job) or {}).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING") and time.monotonic() < end, \
            f"job {job} {state} before reaching step 2\n{tail(log)}"
        time.sleep(0.2)
    signalled_at = train_steps(run_dir)[-1]
    cluster.run("scancel", "--signal=USR1", "--batch", job)

    result = cluster.wait(job, log)
    text = log.read_text(errors="replace")
    assert (result["JobState"], result["ExitCode"]) == ("COMPLETED", "0:0"), tail(log)
    assert signalled_at < max_steps, "the job finished before it could be signalled: raise max_steps"
    assert result["MaxRestarts"] == 1, tail(log)
    assert "requeueing job" in text, tail(log)

    resumed = [int(s) for s in re.findall(r"resuming at step (\d+)", text)]
    assert len(resumed) == 1 and signalled_at <= resumed[0] < max_steps, tail(log)
    # Resumed, not restarted: the step count never goes back, and the run still ends at max_steps.
    steps = train_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == max_steps, steps
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({p.name.rsplit("-", 1)[-1] for p in wandb_runs}) == 1, wandb_runs


def test_shard_array_equals_one_process_build(cluster, dataset, tmp_path):
    from shard_tools.manifest import Manifest

    out = tmp_path / "shards"
    env = {"PYTHON": sys.executable, "IMAGES": str(dataset["photos"] / "images"),
           "LABELS": str(dataset["photos"] / "labels.csv"), "OUT": str(out), "SLICES": "3",
           "SHARD_ARGS": " ".join(dataset["settings"])}
    submit = cluster.run(SUBMIT_SHARD, "--wait", f"--time={JOB_DEADLINE_S // 60 + 1}", env=env, cwd=tmp_path,
                         check=False, timeout=JOB_DEADLINE_S)
    logs = "\n".join(tail(p, 20) for p in sorted(tmp_path.glob("slurm-shard-*.out")))
    assert submit.returncode == 0, f"{submit.stdout}{submit.stderr}\n{logs}"
    array_logs = sorted(p.name for p in tmp_path.glob("slurm-shard-build-*_*.out"))
    assert [name.rsplit("_", 1)[1] for name in array_logs] == ["0.out", "1.out", "2.out"], logs

    merged, single = Manifest.read(str(out)), Manifest.read(str(dataset["shards"]))
    assert merged.classes == single.classes
    assert merged.duplicate_groups == single.duplicate_groups
    for name, split in single.splits.items():
        assert merged.splits[name].num_samples == split.num_samples
        assert merged.splits[name].class_counts == split.class_counts
        assert merged.splits[name].shards == split.shards  # names, counts, bytes and sha256: the same files
    assert sum(len(s.shards) for s in single.splits.values()) >= 3  # every slice had work
    assert merged.stats.pixels == single.stats.pixels
    assert merged.stats.mean == pytest.approx(single.stats.mean, rel=1e-12)
    assert merged.stats.std == pytest.approx(single.stats.std, rel=1e-12)
