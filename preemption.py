"""Stopping a training run cleanly: SIGTERM and SIGUSR1 (preemption, a job's time limit) and SIGINT (Ctrl-C).

A signal only sets a flag. The processes agree on it after every optimizer update (a collective on the gloo control
group, only when there are several), so all of them stop after the same update; the run then writes a checkpoint
of that exact position, logs where it stopped and exits with ``128 + signal number``:

- SIGTERM -> 143, SIGUSR1 -> 138, SIGINT (Ctrl-C) -> 130, the statuses a shell reports for a process ended by
  that signal. They are not 0, so neither ``torchrun`` nor a SLURM script takes the run for finished: torchrun
  restarts the workers while it has ``--max-restarts`` left (they resume from the checkpoint just written), and
  a job requeued by SLURM resumes the same way.

The agreement after an update is started there and read after the next update, by when it has long arrived: no
update waits for a round trip between processes, and a signal stops the run one or two updates after it came.
At the end of an epoch it is read at once.

A second Ctrl-C stops at once, without saving.
"""
import logging
import signal
from types import FrameType
from typing import Callable, Dict, Optional

from utils import is_distributed, max_over_processes, start_max_over_processes

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


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
        self._pending: Optional[Callable[[], int]] = None  # the agreement started at the previous call

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
        logger.warning("received %s: finishing this update (with several processes, or the next one), then saving a "
                       "checkpoint and stopping%s",
                       signal.Signals(signum).name, " (Ctrl-C again stops at once, unsaved)"
                       if signum == signal.SIGINT else "")

    def stop_now(self, current: bool = False) -> bool:
        """Whether to stop now: the same answer on every process (a collective when there are several: call it at
        the same points on all of them).

        Args:
            current: agree on the signals received until now, waiting for the round trip (the end of an epoch);
                by default the answer is the agreement started at the previous call (see the module docstring).
        """
        if not self.agreed and self._pending is not None:
            self.agreed = self._pending()
        self._pending = None
        if not self.agreed and (current or not is_distributed()):  # a single process has nobody to wait for
            self.agreed = max_over_processes(self.received)
        elif not self.agreed:
            self._pending = start_max_over_processes(self.received)
        return bool(self.agreed)

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
