"""One trainer per run dir: rank 0 holds RUN/lock for the whole run.

A job submitted twice, or a requeue racing the old job, would otherwise write the same latest.pt, metrics.jsonl and
W&B run. The lock file names its holder (host, pid, SLURM job id, start time) and carries a heartbeat that the
holder rewrites every HEARTBEAT_S seconds.

- Where the file system supports it, an OS lock (flock) decides: the kernel releases it when the holder dies, so a
  crashed or killed run never blocks the next one.
- Where it does not (some shared file systems refuse flock; others grant it per node only), the heartbeat decides:
  a holder whose heartbeat is fresh, on another host, still holds the run dir even if flock said yes.
- A stale holder is taken over with a warning: its heartbeat is older than STALE_S, or its pid is gone on this
  host, or it was this same SLURM job before a requeue (SLURM restarts a job only after it ended).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass

from shard_tools.errors import UsageError

LOCK_NAME = "lock"
HEARTBEAT_S = 30.0
STALE_S = 4 * HEARTBEAT_S


class RunDirBusy(UsageError):
    """Another trainer holds the run dir."""


@dataclass
class Holder:
    host: str
    pid: int
    slurm_job_id: str
    started: float
    heartbeat: float

    @classmethod
    def me(cls) -> "Holder":
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID", ""), now, now)

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}{job}, started {started}"

    def stale(self, now: float, stale_s: float) -> bool:
        if now - self.heartbeat > stale_s:
            return True
        if self.slurm_job_id and self.slurm_job_id == os.environ.get("SLURM_JOB_ID"):
            return True  # this job before a requeue or restart
        return self.host == socket.gethostname() and not pid_alive(self.pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunDirLock:
    """`acquire()` takes the run dir or raises RunDirBusy; `release()` gives it back."""

    def __init__(self, run_dir: str, *, use_os_lock: bool = True, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.use_os_lock, self.heartbeat_s, self.stale_s = use_os_lock, heartbeat_s, stale_s
        self.fd: int | None = None
        self.holder = Holder.me()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def acquire(self) -> str | None:
        """-> a warning when a stale holder was taken over, else None."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os_locked = self.use_os_lock and self._flock()
            previous = self._read()
            if previous is not None and previous.pid != os.getpid():
                # With the OS lock, only a live holder on another host can still be there (a node-local flock).
                elsewhere = previous.host != socket.gethostname()
                if not previous.stale(time.time(), self.stale_s) and (elsewhere or not os_locked):
                    raise RunDirBusy(self._busy_message(previous))
            self._write()
        except BaseException:
            self._close()
            raise
        self.thread = threading.Thread(target=self._beat, daemon=True, name="run-dir-heartbeat")
        self.thread.start()
        if previous is not None and previous.pid != os.getpid():
            return f"took over {self.path} from a trainer that is no longer running ({previous.describe()})"
        return None

    def release(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join()
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)  # while still locked: the next trainer finds no holder to warn about
            self._close()

    # ---- internals ---------------------------------------------------------------------------------------------------
    def _flock(self) -> bool:
        """True if this process now holds the OS lock; False where the file system has no OS locks."""
        import fcntl

        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            holder = self._read()
            raise RunDirBusy(self._busy_message(holder)) from None
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise

    def _busy_message(self, holder: Holder | None) -> str:
        who = holder.describe() if holder is not None else "another process"
        return (f"{os.path.dirname(self.path)} is in use by another trainer ({who}): wait for it to end or stop it "
                f"(touch {os.path.join(os.path.dirname(self.path), 'STOP')}), or train in another --run-dir")

    def _read(self) -> Holder | None:
        try:
            data = os.pread(self.fd, 4096, 0)
            return Holder(**json.loads(data)) if data.strip() else None
        except (ValueError, TypeError):  # half-written by a holder that died mid-write
            return None

    def _write(self) -> None:
        data = json.dumps(asdict(self.holder)).encode()
        os.ftruncate(self.fd, 0)  # in place: replacing the file would leave the OS lock on the old one
        os.pwrite(self.fd, data, 0)

    def _beat(self) -> None:
        while not self.stopping.wait(self.heartbeat_s):
            self.holder.heartbeat = time.time()
            with contextlib.suppress(OSError):  # a full disk must not kill the run over its heartbeat
                self._write()

    def _close(self) -> None:
        os.close(self.fd)
        self.fd = None


@contextlib.contextmanager
def holding(run_dir: str, is_main: bool):
    """Rank 0 holds the run dir's lock while the block runs; every rank stops at once if it cannot."""
    from distributed_train import dist

    lock = RunDirLock(run_dir, use_os_lock=os.environ.get("DISTRIBUTED_TRAIN_RUN_LOCK", "os") != "heartbeat")
    error = None
    if is_main:
        try:
            warning = lock.acquire()
            if warning:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        except RunDirBusy as e:
            error = e
    if not dist.everyone(error is None):
        raise error or RunDirBusy(f"rank {dist.rank()} stops: rank 0 could not take {run_dir} (see its error)")
    try:
        yield
    finally:
        if is_main:
            lock.release()
