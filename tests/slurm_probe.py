"""Stand-in for the trainer under slurm/train.sbatch: proves the torchrun rendezvous spans every node.

Each rank all-reduces its rank and prints one line; the test checks world size, the sum and that both nodes took
part. It does not import the project, so it isolates the SLURM + torchrun layer from the trainer.
"""

import os

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("gloo")
    total = torch.tensor([dist.get_rank()])
    dist.all_reduce(total)
    print(
        f"PROBE rank={dist.get_rank()} world={dist.get_world_size()} rank_sum={int(total)} "
        f"node={os.environ.get('SLURMD_NODENAME')} local_rank={os.environ['LOCAL_RANK']}",
        flush=True,
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
