"""Stopping a training run cleanly: SIGTERM and SIGUSR1 (preemption, a job's time limit) and SIGINT (Ctrl-C).

A signal only sets a flag. The processes agree on it (a collective on the gloo control group, only when there
are several), so all of them stop after the same update; the run then writes a checkpoint of that exact position,
logs where it stopped and exits with ``128 + signal number``:

- SIGTERM -> 143, SIGUSR1 -> 138, SIGINT (Ctrl-C) -> 130, the statuses a shell reports for a process ended by
  that signal. They are not 0, so neither ``torchrun`` nor a SLURM script takes the run for finished: torchrun
  restarts the workers while it has ``--max-restarts`` left (they resume from the checkpoint just written), and
  a job requeued by SLURM resumes the same way.

What the agreement costs an update. Starting one collective takes about 0.1-0.8 ms of the host's time
(``benchmarks/bench_agreement.py``), 1-3% of a fast GPU update, so the processes agree about every
``AGREEMENT_INTERVAL`` seconds, not after every update: each agreement is started at an update and read at the
next agreement, by when it has long arrived, so no update waits for a round trip. Every agreement also carries each
process's proposal for how many updates to leave until the next one (the interval over its own recent update
time); all take the largest, so the processes keep agreeing at the same updates. A signal thus stops the run
within about two intervals, after the same update everywhere; a single process, which has nobody to agree with,
stops after the update in progress. At the end of an epoch the flag is agreed at once.

A second Ctrl-C stops at once, without saving.
"""
import logging
import signal
import time
from types import FrameType
from typing import Callable, Dict, List, Optional

from utils import is_distributed, max_over_processes, start_max_over_processes

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Seconds of updates between two agreements on a stop (see above), and the most updates between them.
AGREEMENT_INTERVAL = 0.5
MAX_UPDATES_BETWEEN_AGREEMENTS = 1000


def exit_status(signum: int) -> int:
    """The exit status of a run stopped by ``signum``: 128 + the signal number, as a shell reports it."""
    return 128 + signum


class TrainingStopped(Exception):
    """Training stopped on a signal after saving its position; ``exit_status`` is what the process returns."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


class StopSignals:
    """Catches the stop signals while training (a context manager) and agrees on them across processes."""

    def __init__(self) -> None:
        self.received = 0  # the first stop signal this process got
        self.agreed = 0  # the signal all processes stop for, once agreed
        self._previous: Dict[int, object] = {}
        self._pending: Optional[Callable[[], List[int]]] = None  # the agreement started last, not yet read
        self._updates = 0  # stop_now calls after updates so far: the same count on every process
        self._due = 1  # the update count at which the next agreement is read and the next one started
        self._every = 1  # updates between agreements, as last agreed
        self._started_at = (0, 0.0)  # (update count, time) when the pending agreement was started

    def __enter__(self) -> "StopSignals":
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None and self._pending is not None:
            self._pending()  # no collective is left in flight (after an error a peer may be gone: not waited for)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
            return
        self.received = signum
        logger.warning("received %s: finishing this update (with several processes, the updates up to the next "
                       "agreement, about a second), then saving a checkpoint and stopping%s",
                       signal.Signals(signum).name, " (Ctrl-C again stops at once, unsaved)"
                       if signum == signal.SIGINT else "")

    def stop_now(self, current: bool = False) -> bool:
        """Whether to stop now: the same answer on every process. Call it after every update, and with ``current``
        at the end of an epoch, at the same points on every process (some calls are collectives).

        Args:
            current: agree on the signals received until now, waiting for the round trip (the end of an epoch).
        """
        if not self.agreed and not is_distributed():
            self.agreed = self.received  # a single process has nobody to wait for
        if self.agreed:
            return True
        if current:
            self._read_pending()
            if not self.agreed:
                self.agreed = max_over_processes(self.received)
            self._due = self._updates + 1  # the next update starts a new agreement
            self._started_at = (0, 0.0)  # whose proposal must not count the validation as update time
            return bool(self.agreed)
        self._updates += 1
        if self._updates < self._due:
            return False
        self._read_pending()
        if not self.agreed:
            self._start()
        return bool(self.agreed)

    def _read_pending(self) -> None:
        if self._pending is not None:
            self.agreed, self._every = self._pending()
            self._pending = None

    def _start(self) -> None:
        """Starts the next agreement with this process's proposal for the updates until the one after it."""
        updates, started = self._started_at
        now = time.monotonic()
        proposal = 1
        if self._updates > updates and started:
            per_update = (now - started) / (self._updates - updates)
            proposal = min(max(int(AGREEMENT_INTERVAL / max(per_update, 1e-9)), 1), MAX_UPDATES_BETWEEN_AGREEMENTS)
        self._pending = start_max_over_processes([self.received, proposal])
        self._started_at = (self._updates, now)
        self._due = self._updates + self._every

    def stopped(self, where: str, checkpoint: str) -> TrainingStopped:
        """The exception that ends the run after the stop checkpoint was written."""
        name = signal.Signals(self.agreed).name
        return TrainingStopped(f"stopped by {name} at {where}; saved {checkpoint}. Run the same command again to "
                               f"resume from there (exit status {exit_status(self.agreed)})",
                               exit_status(self.agreed))


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a terminal's Ctrl-C and a scheduler's SIGTERM reach every process of the
    job; the loader workers leave them to the training process, which stops them in order (no worker
    tracebacks, no "worker killed" error before the checkpoint is written)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
