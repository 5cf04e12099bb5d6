"""distributed_train: a torchrun DDP trainer that streams WebDataset shards made by `shard_tools`."""

# Exit code of a run that stopped on SIGTERM/SIGUSR1 or RUN/STOP after saving latest.pt: a batch script requeues on it.
# 75 is EX_TEMPFAIL ("try again later") from sysexits.h.
EXIT_PREEMPTED = 75

# Exit code of a run whose training loss was not finite (NaN/inf) in every micro-batch of a logging window on every
# rank: training cannot recover, so it stops without saving (latest.pt keeps the last good state) and is not
# requeued.
EXIT_DIVERGED = 4
