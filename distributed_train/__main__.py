"""`python -m distributed_train ...` or `torchrun --nproc-per-node N -m distributed_train ...`."""
import os
import sys

from distributed_train.config import parse_args
from shard_tools.manifest import ManifestError
from shard_tools.remote import ShardReadError, error_line


def main(argv=None) -> int:
    cfg = parse_args(argv)
    from distributed_train import dist  # after argument parsing: `--help` stays instant (no torch import)
    from distributed_train.train import train

    try:
        return train(cfg)
    except ManifestError as e:
        print(f"distributed_train: {e}", file=sys.stderr)
        return 2
    except ShardReadError as e:
        print(f"distributed_train: error: {error_line(e)}", file=sys.stderr)
        return 3
    except RuntimeError as e:
        if dist.peer_lost(e):
            print(f"distributed_train: rank {os.environ.get('RANK', 0)} stops: another rank left the job (its error "
                  "is printed above)", file=sys.stderr)
            return 1
        if "DataLoader worker (pid" not in str(e):
            raise
        # Most often the kernel's OOM killer (SIGKILL): say so in one line, not in a page of traceback.
        print(f"distributed_train: error: {str(e).strip().splitlines()[-1]}: if the node ran out of memory (`dmesg`, "
              "SLURM's `seff`), use fewer --workers, a smaller --batch-size or --shuffle-buffer; starting again with "
              "the same --run-dir resumes from the last checkpoint", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
