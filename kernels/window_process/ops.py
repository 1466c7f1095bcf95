"""Loading of the fused window-process extension, its fake and autograd registrations, and the public ops.

The C++ library defines the ops ``swin_window_process::roll_and_window_partition`` and
``swin_window_process::window_merge_and_roll`` with ``TORCH_LIBRARY``. It is taken, in this order, from the module
installed by ``pip install --no-build-isolation ./kernels/window_process`` or from a JIT build with
``torch.utils.cpp_extension.load`` (cached in torch's extension directory, ``~/.cache/torch_extensions`` by default).
The library is only loaded on first use: importing this module is cheap and has no side effect.
"""

import importlib.util
import logging
import os
import threading
from typing import Any, Optional, Union

import torch

logger = logging.getLogger(__name__)

NAMESPACE = "swin_window_process"
INSTALLED_MODULE = "swin_window_process_C"

_CSRC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
CPU_SOURCES = ("window_process.cpp",)
CUDA_SOURCES = ("window_process_cuda_ops.cpp", "window_process_cuda.cu")

_lock = threading.Lock()
# Outcome of the one attempt to load the library: None before it, "" on success, else the reason of the failure.
_library_error: Optional[str] = None
_library_loaded = False
# Device type -> whether the op runs there; filled by is_available.
_device_available: dict[str, bool] = {}


def _ops_defined() -> bool:
    return hasattr(getattr(torch.ops, NAMESPACE), "roll_and_window_partition")


def _cuda_toolkit_found() -> bool:
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME is not None


def _build_and_load() -> str:
    """Loads the installed extension if there is one, else JIT-builds it; returns where the library came from."""
    spec = importlib.util.find_spec(INSTALLED_MODULE)
    if spec is not None and spec.origin is not None:
        torch.ops.load_library(spec.origin)
        return f"installed extension {spec.origin}"

    from torch.utils import cpp_extension

    # The CUDA sources need both a GPU build of torch with a visible GPU and a toolkit (nvcc) to compile them.
    with_cuda = torch.cuda.is_available() and _cuda_toolkit_found()
    source_names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    name = f"{NAMESPACE}_{'cuda' if with_cuda else 'cpu'}"
    logger.info("Building the %s extension %s (the first build takes about a minute)", NAMESPACE, name)
    library_path = cpp_extension.load(
        name=name,
        sources=[os.path.join(_CSRC_DIR, source_name) for source_name in source_names],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )
    return f"JIT build {library_path}"


def _summarize(exc: Exception) -> str:
    """One line for a warning: the first compiler error of a failed build, else the first line of the message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    error_lines = [line for line in lines if "error:" in line.lower()]
    summary = (error_lines or lines or [""])[0]
    return f"{type(exc).__name__}: {summary[:300]}"


def _load_library() -> str:
    """Loads the library once, registers the Python parts of the ops, and returns "" or the reason of the failure."""
    global _library_error, _library_loaded
    with _lock:
        if _library_error is not None:
            return _library_error
        try:
            origin = "already loaded" if _ops_defined() else _build_and_load()
            _register_python_parts()
        except Exception as exc:  # A failed build raises several types; any of them means "use the fallback".
            _library_error = _summarize(exc)
            logger.debug("Loading the %s extension failed", NAMESPACE, exc_info=True)
            logger.warning(
                "Fused window-process kernel unavailable (%s; full log at DEBUG level); use the PyTorch reference",
                _library_error,
            )
            return _library_error
        _library_error = ""
        _library_loaded = True
        logger.info("Loaded the %s ops from %s", NAMESPACE, origin)
        return ""


def _check_device(device: torch.device) -> str:
    """Runs the op once on a tiny tensor of ``device``; returns "" or the reason why it cannot run there."""
    try:
        x = torch.arange(8, dtype=torch.float32, device=device).reshape(1, 2, 2, 2)
        windows = torch.ops.swin_window_process.roll_and_window_partition(x, 1, 1)
    except Exception as exc:  # No driver, no kernel for the backend, ...: is_available must not raise.
        hint = ""
        if isinstance(exc, NotImplementedError) and device.type == "cuda":
            hint = " (the library was built without CUDA; rebuild it where a GPU and a CUDA toolkit are visible)"
        return _summarize(exc) + hint
    if windows.shape != (4, 1, 1, 2):
        return f"unexpected output shape {tuple(windows.shape)} from a test run"
    return ""


@torch.compiler.assume_constant_result
def is_available(device: Union[torch.device, str]) -> bool:
    """Tells whether the fused ops can run on ``device``; never raises.

    The first call builds or loads the extension, later calls return the cached outcome. On failure one warning line
    with the reason is logged (once for the library, once per device type) and the caller should use
    :func:`reference_roll_and_window_partition` / :func:`reference_window_merge_and_roll` instead.

    Args:
        device: Device of the tensors the ops would run on.

    Returns:
        True if the fused ops are registered and run on this device type.
    """
    device = torch.device(device)
    cached = _device_available.get(device.type)
    if cached is not None:
        return cached
    error = _load_library()
    if error:
        _device_available[device.type] = False
        return False
    with _lock:
        if device.type not in _device_available:
            error = _check_device(device)
            if error:
                logger.warning("Fused window-process kernel cannot run on %s (%s)", device.type, error)
            _device_available[device.type] = not error
        return _device_available[device.type]


def _require_library() -> None:
    error = _load_library()
    if error:
        raise RuntimeError(
            f"The fused window-process ops are unavailable ({error}). Check is_available(device) first and use "
            "reference_roll_and_window_partition / reference_window_merge_and_roll when it is False."
        )


def roll_and_window_partition(x: torch.Tensor, shift: int, window: int) -> torch.Tensor:
    """Fused ``torch.roll(x, (-shift, -shift), (1, 2))`` followed by the Swin window partition.

    Args:
        x: Image of shape (B, H, W, C); H and W must be multiples of ``window`` (pad first).
        shift: Cyclic shift in pixels; 0 gives the plain window partition.
        window: Window size.

    Returns:
        Contiguous windows of shape (B * nW, window, window, C), ordered (batch, row of windows, column of windows).

    Raises:
        RuntimeError: If the extension cannot be built or loaded, or the shapes are invalid.
    """
    if not _library_loaded:
        _require_library()
    return torch.ops.swin_window_process.roll_and_window_partition(x, shift, window)


def window_merge_and_roll(
    windows: torch.Tensor, batch: int, height: int, width: int, shift: int, window: int
) -> torch.Tensor:
    """Fused inverse of :func:`roll_and_window_partition`: window merge followed by ``torch.roll`` by ``+shift``.

    Args:
        windows: Windows of shape (B * nW, window, window, C).
        batch: Batch size B of the image.
        height: Image height H, a multiple of ``window``.
        width: Image width W, a multiple of ``window``.
        shift: Cyclic shift in pixels that was applied before the partition.
        window: Window size.

    Returns:
        Contiguous image of shape (B, H, W, C).

    Raises:
        RuntimeError: If the extension cannot be built or loaded, or the shapes are invalid.
    """
    if not _library_loaded:
        _require_library()
    return torch.ops.swin_window_process.window_merge_and_roll(windows, batch, height, width, shift, window)


def _partition_fake(x: torch.Tensor, shift: int, window: int) -> torch.Tensor:
    torch._check(x.dim() == 4, lambda: f"roll_and_window_partition: expected x of shape (B, H, W, C), got {x.shape}")
    batch, height, width, channels = x.shape
    torch._check(
        height % window == 0 and width % window == 0,
        lambda: f"roll_and_window_partition: H ({height}) and W ({width}) must be multiples of window ({window})",
    )
    return x.new_empty((batch * (height // window) * (width // window), window, window, channels))


def _merge_fake(windows: torch.Tensor, batch: int, height: int, width: int, shift: int, window: int) -> torch.Tensor:
    torch._check(
        windows.dim() == 4
        and windows.shape[0] == batch * (height // window) * (width // window)
        and windows.shape[1] == window
        and windows.shape[2] == window,
        lambda: f"window_merge_and_roll: windows of shape {windows.shape} do not match B={batch}, H={height}, "
        f"W={width}, window={window}",
    )
    return windows.new_empty((batch, height, width, windows.shape[3]))


def _partition_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, shift, window = inputs
    ctx.geometry = (x.shape[0], x.shape[1], x.shape[2], shift, window)


def _partition_backward(ctx: Any, grad_windows: torch.Tensor) -> tuple:
    # The op is a permutation, so its adjoint is its inverse: the merge.
    batch, height, width, shift, window = ctx.geometry
    grad_x = torch.ops.swin_window_process.window_merge_and_roll(grad_windows, batch, height, width, shift, window)
    return grad_x, None, None


def _merge_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    _, _, _, _, shift, window = inputs
    ctx.shift = shift
    ctx.window = window


def _merge_backward(ctx: Any, grad_x: torch.Tensor) -> tuple:
    grad_windows = torch.ops.swin_window_process.roll_and_window_partition(grad_x, ctx.shift, ctx.window)
    return grad_windows, None, None, None, None, None


def _register_python_parts() -> None:
    partition = f"{NAMESPACE}::roll_and_window_partition"
    merge = f"{NAMESPACE}::window_merge_and_roll"
    torch.library.register_fake(partition, _partition_fake)
    torch.library.register_fake(merge, _merge_fake)
    torch.library.register_autograd(partition, _partition_backward, setup_context=_partition_setup_context)
    torch.library.register_autograd(merge, _merge_backward, setup_context=_merge_setup_context)
