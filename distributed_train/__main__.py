"""`python -m distributed_train ...` or `torchrun --nproc-per-node N -m distributed_train ...`."""
import os
import signal
import sys
import traceback

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
    except (RuntimeError, ConnectionError, EOFError) as e:
        # torch's SIGCHLD handler raises again for the same dead worker, which would land in the middle of this report
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if not isinstance(e, RuntimeError):
            # A worker killed while this process fetched a batch's shared memory from it (torch passes the file
            # descriptors through multiprocessing's resource sharer): the same dead worker, seen from this end.
            if not any(f.filename.endswith("resource_sharer.py") for f in traceback.extract_tb(e.__traceback__)):
                raise
            return dead_worker(f"a DataLoader worker died while handing over a batch ({type(e).__name__})")
        if dist.peer_lost(e):
            print(f"distributed_train: rank {os.environ.get('RANK', 0)} stops: another rank left the job (its error "
                  "is printed above)", file=sys.stderr)
            return 1
        if "DataLoader worker (pid" not in str(e):
            raise
        return dead_worker(str(e).strip().splitlines()[-1])


def dead_worker(reason: str) -> int:
    # Most often the kernel's OOM killer (SIGKILL): say so in one line, not in a page of traceback.
    print(f"distributed_train: error: {reason}: if the node ran out of memory (`dmesg`, SLURM's `seff`), use fewer "
          "--workers, a smaller --batch-size or --shuffle-buffer; starting again with the same --run-dir resumes "
          "from the last checkpoint", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
