"""Multi-node without a cluster: two torchrun agents on this machine form one job through c10d rendezvous."""
import json
import socket
import subprocess
from pathlib import Path

from conftest import PYTHON, python_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_agents_form_one_job_and_split_the_samples(uneven_shards, tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    agent = [PYTHON, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
             "-m", "distributed_train", "--data", str(uneven_shards), "--run-dir", str(run_dir),
             "--arch", "resnet26", "--width", "0.125", "--image-size", "32", "--batch-size", "8",
             "--epochs", "1", "--workers", "1", "--wandb", "disabled", "--record-samples"]
    nodes = [subprocess.Popen(agent, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)

    assert json.loads((run_dir / "config.json").read_text())["world_size"] == 2
    # one job, so one writer: a single checkpoint series, not one per node
    assert (run_dir / "checkpoints" / "latest.pt").exists()
    assert sum("done:" in out for out in outputs) == 1

    files = sorted((run_dir / "samples").glob("epoch-0000-rank-*.txt"))
    assert len(files) == 2
    per_rank = [f.read_text().split() for f in files]
    assert len(per_rank[0]) == len(per_rank[1]) == 9 * 8, "both ranks run floor(144 / 2 / 8) = 9 steps of 8"
    assert not set(per_rank[0]) & set(per_rank[1]), "a sample was trained on by both nodes in one epoch"
