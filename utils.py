"""Distributed helpers, seeding and RNG state. Checkpoints live in ``checkpoint.py``."""
import atexit
import contextlib
import ctypes
import ctypes.util
import datetime
import fcntl
import logging
import os
import random
import socket
import sys
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from config import ConfigError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- distributed

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_distributed() -> torch.device:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1) and picks this process's device.

    NCCL on CUDA, gloo on CPU. Without a launcher this is one process on one GPU, or on the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not is_distributed():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # The timeout bounds how long the survivors wait when a peer dies, so torchrun can restart the group.
        timeout = datetime.timedelta(minutes=10)
        dist.init_process_group(backend, store=_rendezvous_store(world_size, timeout), rank=int(os.environ["RANK"]),
                                world_size=world_size, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
        global _CONTROL_GROUP
        # Control flags (stop requests) are agreed on CPU tensors every update; under NCCL they get a gloo
        # group of their own, so agreeing never waits for the GPU.
        _CONTROL_GROUP = dist.new_group(backend="gloo") if backend == "nccl" else None
    return device


_CONTROL_GROUP = None  # gloo group for control flags under NCCL; None: the default (gloo) group


def max_over_processes(value: int) -> int:
    """The largest ``value`` of all processes (collective on a CPU tensor, no device sync); ``value`` alone
    in a single process."""
    if not is_distributed():
        return value
    flag = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return int(flag.item())


def _rendezvous_store(world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The key-value store at MASTER_ADDR:MASTER_PORT, its keys prefixed by torchrun's restart count.

    After ``torchrun --max-restarts`` restarts a group, the agent's store still holds the previous
    attempt's addresses, and gloo's new processes would try to connect to the dead ones. The prefix gives
    every attempt keys of its own.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=int(os.environ["RANK"]) == 0 and not agent_hosts_store, timeout=timeout)
    return dist.PrefixStore(f"swin/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shutdown_distributed() -> None:
    """Leaves the process group, if this process joined one."""
    if is_distributed():
        dist.destroy_process_group()


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
    """Sum over processes, in place; the identity in a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over processes, in place; the identity in a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


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
    state = get_rng_state()
    if not is_distributed():
        return [state]
    states: List[Any] = [None] * get_world_size()
    dist.all_gather_object(states, state)
    return states


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
    if is_distributed():
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
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
