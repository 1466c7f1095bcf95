"""torch.compile of the training model: when it is on, where its cache lives, and compiling before the first epoch.

``TRAIN.COMPILE``: True compiles, False does not, None (auto, the default) decides by device from
:data:`COMPILE_BY_DEFAULT`. ``TRAIN.COMPILE_MODE`` is torch.compile's mode ("reduce-overhead" adds CUDA graphs: the
training loader drops its last partial batch, so shapes stay static), ``TRAIN.COMPILE_BACKEND`` its backend.
Compiled code is cached on disk (``TRAIN.COMPILE_CACHE_DIR``, by default a per-user cache folder), so a restarted or
resumed run, or a second run of the same model, loads it instead of compiling again. The compile runs on a synthetic
batch before the first epoch, timed and logged, so that the first epoch's images/s measure training only.
"""
import logging
import os
import random
import time
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# What TRAIN.COMPILE auto means per device type. CPU: compiled Swin measured within noise of eager against timm
# (README, Performance), and inductor's C++ build takes minutes on a small CPU. CUDA: not measured yet; the GPU run of
# `benchmarks/bench_model.py --device cuda` decides (flip it when compiled training beats eager there).
COMPILE_BY_DEFAULT = {"cpu": False, "cuda": False}
# Environment variable of inductor's on-disk cache (FX graphs, AOTAutograd graphs, Triton kernels under it).
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_enabled(setting: Optional[bool], device: torch.device) -> bool:
    """Resolves ``TRAIN.COMPILE`` for ``device``: True, False, or None (auto) from COMPILE_BY_DEFAULT."""
    return COMPILE_BY_DEFAULT.get(device.type, False) if setting is None else bool(setting)


def default_cache_dir() -> str:
    """The per-user cache folder of compiled code: $XDG_CACHE_HOME (or ~/.cache)/swin_transformer/inductor."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "swin_transformer", "inductor")


def configure_cache(cache_dir: str) -> str:
    """Points inductor's on-disk cache at ``cache_dir`` ("" for :func:`default_cache_dir`) unless the environment
    already sets TORCHINDUCTOR_CACHE_DIR; returns the folder in use. Without this, inductor caches under /tmp, which
    many clusters clear between jobs."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    path = os.path.abspath(cache_dir or default_cache_dir())
    os.makedirs(path, exist_ok=True)
    os.environ[CACHE_ENV] = path
    return path


def compile_model(model: nn.Module, config: Any, device: torch.device) -> nn.Module:
    """``torch.compile(model)`` as TRAIN.COMPILE / COMPILE_MODE / COMPILE_CACHE_DIR ask on ``device``, else ``model``.

    Compiling is lazy: it happens at the first call (see :func:`warm_up`). The result shares the model's parameters.
    """
    if not compile_enabled(config.TRAIN.COMPILE, device):
        return model
    cache = configure_cache(config.TRAIN.COMPILE_CACHE_DIR)
    backend, mode = config.TRAIN.COMPILE_BACKEND, config.TRAIN.COMPILE_MODE
    logger.info("torch.compile of the model (backend %s, mode %s) on %s; compiled code cached in %s", backend, mode,
                device, cache)
    # Only inductor takes a mode; the others reject any.
    return torch.compile(model, backend=backend, mode=mode if backend == "inductor" else None)


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` (possibly DDP-wrapped) is a torch.compile'd module."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return isinstance(model, torch._dynamo.eval_frame.OptimizedModule)


class preserved_random_state:
    """Restores the Python, NumPy and torch (CPU and CUDA) random states on exit, so a warm-up step changes no
    random number the run draws afterwards (dropout, stochastic depth, Mixup/CutMix)."""

    def __enter__(self) -> "preserved_random_state":
        self.python, self.numpy = random.getstate(), np.random.get_state()
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return self

    def __exit__(self, *exc_info: Any) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def warm_up(step: Callable[[], Any], zero_grad: Callable[[], None], device: torch.device) -> Dict[str, float]:
    """Runs ``step`` (one forward and backward of the compiled model on a synthetic batch) once, which compiles it,
    then clears the gradients it left; returns and logs how long it took. Every process calls it (the backward of a
    DDP model all-reduces).

    The optimizer does not step, so the weights, optimizer state, schedule and EMA are as before; the random state is
    restored.
    """
    hits_before = _cache_counters()
    start = time.perf_counter()
    with preserved_random_state():
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    zero_grad()
    hits_after = _cache_counters()
    cache = {name: hits_after[name] - hits_before[name] for name in hits_after}
    logger.info("compiled the training step in %.1f s before the first epoch (not counted in its images/s); "
                "inductor FX graph cache: %d hits, %d misses", seconds, cache["fxgraph_cache_hit"],
                cache["fxgraph_cache_miss"])
    return {"compile_seconds": seconds, **cache}


def _cache_counters() -> Dict[str, int]:
    from torch._dynamo.utils import counters

    inductor = counters.get("inductor", {})
    return {name: int(inductor.get(name, 0)) for name in ("fxgraph_cache_hit", "fxgraph_cache_miss")}
