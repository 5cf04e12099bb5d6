"""Worker processes for the CPU-heavy per-image work, or none at all for --workers 1."""
from __future__ import annotations

import multiprocessing as mp
from contextlib import contextmanager


@contextmanager
def worker_pool(workers: int):
    """A process pool of `workers`, or None for 1 (run in this process: no start-up or pickling cost)."""
    if workers <= 1:
        yield None
        return
    # fork: the workers inherit the already imported modules instead of importing torch (via webdataset) again.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers) as pool:
        yield pool


def imap(pool, fn, items, chunksize: int = 1):
    """Ordered results of fn over items, lazily, in the pool or in this process."""
    return map(fn, items) if pool is None else pool.imap(fn, items, chunksize=chunksize)

