"""`python -m distributed_train ...` or `torchrun --nproc-per-node N -m distributed_train ...`."""
import sys

from distributed_train.config import parse_args
from shard_tools.manifest import ManifestError


def main(argv=None) -> int:
    cfg = parse_args(argv)
    from distributed_train.train import train  # after argument parsing: `--help` stays instant

    try:
        return train(cfg)
    except ManifestError as e:
        print(f"distributed_train: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
