"""Stand-in for the trainer under slurm/train.sbatch: proves the torchrun rendezvous spans every node.

Each rank all-reduces its rank and writes one line to RUN_DIR/probe-<rank>.txt (srun interleaves the ranks' stdout
at arbitrary points, so the shared log is not parsed); the test checks world size, the sum and that both nodes took
part. It does not import the project, so it isolates the SLURM + torchrun layer from the trainer.
"""

import os
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("gloo")
    total = torch.tensor([dist.get_rank()])
    dist.all_reduce(total)
    line = (f"PROBE rank={dist.get_rank()} world={dist.get_world_size()} rank_sum={int(total)} "
            f"node={os.environ.get('SLURMD_NODENAME')} local_rank={os.environ['LOCAL_RANK']}")
    run_dir = Path(os.environ["RUN_DIR"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"probe-{dist.get_rank()}.txt").write_text(line + "\n")
    print(line, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
