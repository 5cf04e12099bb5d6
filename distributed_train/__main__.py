"""`python -m distributed_train ...` or `torchrun --nproc-per-node N -m distributed_train ...`."""
import sys

from distributed_train.config import Config, parse_args
from shard_tools.cli import run_main


def main(argv=None) -> int:
    return run_main("distributed_train", lambda: train(parse_args(argv)))


def train(cfg: Config) -> int:
    cfg.validate()
    from distributed_train.train import train  # after argument parsing: `--help` stays instant (no torch import)

    return train(cfg)


if __name__ == "__main__":
    sys.exit(main())
