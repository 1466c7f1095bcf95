"""Distributed helpers, seeding and RNG state. Checkpoints live in ``checkpoint.py``."""
import atexit
import contextlib
import ctypes
import ctypes.util
import datetime
import fcntl
import hashlib
import logging
import os
import random
import socket
import sys
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from config import ConfigError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- distributed
#
# Two process groups. The default group (NCCL on CUDA, gloo on the CPU) carries what lives on the device: DDP's and
# FSDP's traffic, validation sums, the loss-health flags. The control group (always gloo) carries what lives on the
# host: stop requests, run-lock and failure agreement, RNG states, barriers. NCCL takes device tensors only, so a
# CPU tensor must never reach the default group; every host-side helper below goes through the control group.

# How long a process waits in a collective for its peers; it bounds how long the survivors wait when a peer dies,
# so that torchrun can restart the group.
DIST_TIMEOUT = datetime.timedelta(minutes=10)

_control: Dict[str, Any] = {"group": None, "world": None}  # the gloo control group and the default group it serves


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    """Whether a launcher (torchrun) started this process as one of a job: its rank and rendezvous are set."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed() -> torch.device:
    """Picks this process's device and, under torchrun, joins the process group: one launch path for every entry
    point and any number of processes, ``--nproc_per_node 1`` included, so one GPU under torchrun runs the path
    that eight run.

    NCCL on CUDA, gloo on the CPU. A group that the caller initialised (a tool that joins one itself) is used as it
    is, whatever its backend. Either way the gloo control group is joined too (see above), and a thread starts that
    ends this process promptly when a peer announces a failure (:func:`announce_failure`). Without a launcher this
    is one process on one GPU, or on the CPU, with no group.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if launched_by_torchrun() and not is_distributed():
        world_size = int(os.environ["WORLD_SIZE"])
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=_rendezvous_store(world_size, DIST_TIMEOUT), rank=int(os.environ["RANK"]),
                                world_size=world_size, timeout=DIST_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    if is_distributed():
        control_group()
        _watch_for_peer_failures()
    return device


def describe_process_group() -> str:
    """One phrase for the log: the default group's backend and the control group, or that there is none."""
    if not is_distributed():
        return "no process group"
    return f"process group: {dist.get_backend()} (host-side agreement: gloo)"


def control_group() -> Optional[dist.ProcessGroup]:
    """The gloo group for host-side agreement (None when not distributed).

    Made on first use after the default group appears, by whoever initialised that: a collective, which is safe
    because every caller is itself a collective that all processes reach in the same order.
    """
    if not is_distributed():
        return None
    if _control["world"] is not dist.group.WORLD:
        _control["group"] = dist.new_group(backend="gloo", timeout=DIST_TIMEOUT)
        _control["world"] = dist.group.WORLD
    return _control["group"]


def max_over_processes(value: int) -> int:
    """The largest ``value`` of all processes (on the control group, no device sync); ``value`` alone in a single
    process."""
    if not is_distributed():
        return value
    flag = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control_group())
    return int(flag.item())


def start_max_over_processes(values: Sequence[int]) -> Callable[[], List[int]]:
    """Starts an element-wise maximum of ``values`` over all processes (on the control group) without waiting for
    it; the returned function waits and gives the result (``values`` alone in a single process).

    Every process must start these in the same order, among the other control-group collectives.
    """
    if not is_distributed():
        return lambda: list(values)
    flags = torch.tensor(values, dtype=torch.int64)
    work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=control_group(), async_op=True)

    def result() -> List[int]:
        work.wait()
        return flags.tolist()

    return result


def barrier() -> None:
    """Waits for every process (on the control group: no device work is involved)."""
    if is_distributed():
        dist.barrier(group=control_group())


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Process ``src``'s ``value`` (picklable), on every process."""
    if not is_distributed():
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=src, group=control_group())
    return shared[0]


def gather_objects(value: Any) -> List[Any]:
    """Every process's ``value`` (picklable), indexed by rank, on every process."""
    if not is_distributed():
        return [value]
    values: List[Any] = [None] * get_world_size()
    dist.all_gather_object(values, value, group=control_group())
    return values


def _rendezvous_store(world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The key-value store at MASTER_ADDR:MASTER_PORT, its keys prefixed by torchrun's restart count.

    After ``torchrun --max-restarts`` restarts a group, the agent's store still holds the previous
    attempt's addresses, and gloo's new processes would try to connect to the dead ones. The prefix gives
    every attempt keys of its own.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=int(os.environ["RANK"]) == 0 and not agent_hosts_store, timeout=timeout)
    return dist.PrefixStore(_attempt_prefix(), store)


def _attempt_prefix() -> str:
    return f"swin/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def shutdown_distributed() -> None:
    """Leaves the process group, if this process joined one."""
    if is_distributed():
        dist.destroy_process_group()
    _control.update(group=None, world=None)


def exit_process(status: int) -> None:
    """Ends the process with ``status``; a process started by torchrun (LOCAL_RANK set) skips the interpreter's
    teardown.

    gloo's worker threads can outlive ``destroy_process_group``: the core dump of a 2-process ``--fsdp`` run
    that aborted after finishing showed two, one of them releasing a finished all-reduce's tensors while the
    interpreter tore itself down. Taking the GIL then ends the thread inside a C++ destructor, which aborts
    the process (SIGABRT, about 1 run in 30 here), and torchrun reports a failed run. So the exit handlers
    (log files, event writers, loader workers) run as usual, the streams are flushed, and the process ends
    with ``os._exit``. A process that was not started by torchrun exits normally.
    """
    if "LOCAL_RANK" not in os.environ:
        sys.exit(status)
    atexit._run_exitfuncs()  # what a normal exit runs first, while the interpreter is whole
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place, on the default group (``tensor`` on this process's device); the identity in a
    single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over processes, in place, on the default group (``tensor`` on this process's device);
    the identity in a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


# --------------------------------------------------------------------------- failing together
#
# A process that fails on its own would leave the others waiting in their next collective until DIST_TIMEOUT. Two
# mechanisms end every process promptly with the failing process's message:
# - at the points where one process can fail alone (start-up, rank 0's checkpoint and log writes), the processes
#   agree on the outcome (:func:`fail_together`): all raise, the failing one its own error, the others
#   :class:`PeerFailure` with its message;
# - anywhere else (a loader's bad-data stop on one process, a bug), the failing process announces its failure in
#   the job's key-value store before it exits (:func:`announce_failure`); a thread of every other process waits for
#   that key, logs the message and ends its process, even when its main thread is blocked in a collective.

FAILURE_KEY = "failure"
# The exit status of a process ended by a peer's failure, as for any failure the user can act on.
PEER_FAILURE_STATUS = 2


class PeerFailure(RuntimeError):
    """Another process of the job failed; the message is its error."""


_failure: Dict[str, Any] = {"store": None, "agreed": False}


def fail_together(what: str) -> contextlib.AbstractContextManager:
    """Runs a block that one process may fail alone in; on exit the processes agree on the outcome (a collective).

    If the block raised on any process, every process raises: the failing ones their own error, the others a
    :class:`PeerFailure` naming the process and its error. Nothing happens between processes when not distributed.

    Args:
        what: what the block does, for the message ("saving the checkpoint").
    """
    return _FailTogether(what)


class _FailTogether(contextlib.AbstractContextManager):
    def __init__(self, what: str):
        self.what = what

    def __exit__(self, kind, error, traceback) -> bool:
        if not is_distributed() or (error is not None and not isinstance(error, Exception)):
            return False  # KeyboardInterrupt and exits are not agreed: they end the process as they are
        messages = gather_objects(None if error is None else _one_line(error))
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if not failed:
            return False
        _failure["agreed"] = True  # every process raises at this point: nothing to announce
        if error is not None:
            return False  # this process's own error goes on
        rank, message = failed[0]
        raise PeerFailure(f"process {rank} failed while {self.what}: {message}")


def mark_failure_agreed() -> None:
    """Records that the error being raised is raised on every process at the same point (nothing to announce)."""
    _failure["agreed"] = True


def _one_line(error: BaseException) -> str:
    return str(error).strip() or type(error).__name__


def announce_failure(error: BaseException) -> None:
    """Tells the other processes that this one is ending with ``error`` (unless every process raised it together),
    so that they end too instead of waiting for it in a collective."""
    store = _failure["store"]
    if store is None or _failure["agreed"] or isinstance(error, PeerFailure):
        return
    try:
        store.set(FAILURE_KEY, f"process {get_rank()}: {_one_line(error)}")
    except Exception:  # noqa: BLE001  (the store may be gone with its host; the launcher still ends the job)
        logger.debug("could not announce the failure", exc_info=True)


def announced_failure() -> Optional[str]:
    """A peer's announced failure, if there is one (does not wait)."""
    store = _failure["store"]
    try:
        if store is not None and store.check([FAILURE_KEY]):
            return store.get(FAILURE_KEY).decode()
    except Exception:  # noqa: BLE001
        logger.debug("could not read the job's store", exc_info=True)
    return None


def _store_client() -> dist.Store:
    """A new client of the job's key-value store (torchrun's, at MASTER_ADDR:MASTER_PORT), in this attempt's keys."""
    return dist.PrefixStore(_attempt_prefix(), dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=DIST_TIMEOUT,
        wait_for_workers=False))


def _watch_for_peer_failures() -> None:
    """Starts the thread that ends this process when a peer announces a failure (once per process).

    It has a store client of its own (a client is not safe to share between threads) and blocks in the store,
    without the GIL, until the key appears. Under torchrun's own store (or rank 0's, which ends with rank 0) a lost
    connection ends the thread silently: it is no failure of the job.
    """
    if _failure["store"] is not None or not launched_by_torchrun():
        return
    _failure["store"] = _store_client()

    def watch() -> None:
        watcher = _store_client()
        try:
            watcher.wait([FAILURE_KEY], datetime.timedelta(days=365))
            message = watcher.get(FAILURE_KEY).decode()
        except Exception:  # noqa: BLE001  (the store's host ended: the job is over, or its launcher ends it)
            return
        if message.startswith(f"process {get_rank()}:"):
            return  # this process's own announcement: it is ending anyway
        logger.error("stopping: %s", message)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(PEER_FAILURE_STATUS)

    threading.Thread(target=watch, name="peer-failure-watch", daemon=True).start()


# --------------------------------------------------------------------------- seeding and RNG state

# glibc's mallopt parameters (malloc.h) and its upper bound of the mmap threshold on 64-bit systems.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Asks glibc's malloc to keep freed memory for the next allocation instead of returning it to the system.

    Every CPU training or evaluation step allocates and frees the same large activations. By default glibc gives
    blocks above its (adaptive) mmap threshold back to the kernel when they are freed, and trims the free top of
    its heap, so the next step page-faults all of that memory in again: on the 2-core machine of README
    Performance, Swin-T bfloat16 inference ran at 23 img/s instead of 30. With the threshold fixed at its maximum
    and no trimming, freed blocks are reused; the process keeps the memory of its peak instead of shrinking
    between steps. Blocks over 32 MiB are still mapped and unmapped one by one.

    Returns:
        Whether the setting took effect (glibc only; elsewhere nothing changes).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def seed_epoch(seed: int, rank: int, epoch: int) -> None:
    """Seeds this process's random streams (drop path, Mixup/CutMix) for a training epoch from (seed, rank, epoch)
    alone, so that what ran before the epoch (validations, a resume) cannot shift them."""
    digest = hashlib.sha256(f"{seed}/{rank}/{epoch}".encode()).digest()
    seed_everything(int.from_bytes(digest[:8], "little") >> 1)


def get_rng_state() -> Dict[str, Any]:
    """This process's RNG states, in types that ``torch.load(weights_only=True)`` accepts."""
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restores what :func:`get_rng_state` captured."""
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> List[Dict[str, Any]]:
    """Every rank's RNG state, indexed by rank (collective)."""
    return gather_objects(get_rng_state())


# --------------------------------------------------------------------------- one run per output folder

RUN_LOCK = "run.lock"


def _lock_file(path: str) -> Optional[int]:
    """Opens ``path`` and takes an exclusive advisory lock on it: the descriptor, or None if another process
    holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # A POSIX record lock, not flock(): it belongs to this process alone, so the loader workers it forks
            # do not inherit it and cannot keep a killed run's folder locked while they wind down.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held by another process
            os.close(fd)
            return None
        # A holder that ended between our open and our lock has removed the file we locked; a third run may
        # already hold a new one under the same name, so only a lock on the file still in place counts.
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _lock_holder(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip() or "a process that is starting"
    except OSError:
        return "a process that has just ended"


@contextlib.contextmanager
def run_lock(output_dir: str, rank: int = 0) -> Iterator[None]:
    """Holds ``output_dir`` for one run: a second run on the same folder stops at once, naming the holder.

    The lock is an advisory POSIX lock (``lockf``) on ``output_dir/run.lock``, so the operating system
    releases it when its process ends in any way: a killed run never leaves the folder locked, and forked
    children (loader workers) do not hold it. The file names the holder (pid, host, start time) and is
    removed when the run ends. Under ``torchrun`` only rank 0 takes the lock (one per job) and every rank
    learns the outcome, so they all stop together. Call it on every rank; one process holds a folder once.

    Raises:
        ConfigError: another process holds the folder.
    """
    path = os.path.join(output_dir, RUN_LOCK)
    fd: Optional[int] = None
    error: Optional[str] = None
    if rank == 0:
        try:
            fd = _lock_file(path)
        except OSError as failure:  # a file system without locks: run unprotected rather than not at all
            logger.warning("cannot lock the output folder %s (%s); make sure no other run uses it", output_dir,
                           failure)
        else:
            if fd is None:
                error = (f"the output folder {os.path.abspath(output_dir)} is in use by another run: "
                         f"{_lock_holder(path)} (lock file {RUN_LOCK}); wait for it to end, or give another "
                         "--tag or --output")
            else:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started "
                             f"{datetime.datetime.now().isoformat(timespec='seconds')}\n".encode())
    error = broadcast_object(error)
    if error:
        raise ConfigError(error)
    try:
        yield
    finally:
        if fd is not None:
            # Removed while still locked, so a run that opened the file in the meantime sees it is stale.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.close(fd)
