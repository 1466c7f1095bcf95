"""Tests of the fused window-process ops (kernels/window_process) against the pure-PyTorch reference."""

import logging
import os
import shutil
import subprocess

import pytest
import torch

from kernels import window_process
from kernels.window_process import (
    is_available,
    reference_roll_and_window_partition,
    reference_window_merge_and_roll,
    roll_and_window_partition,
    window_merge_and_roll,
)
from kernels.window_process import ops as window_process_ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    ),
]
# (B, H, W, C, window, shift): shift 0 and non-zero, non-square images, C not a multiple of 8, batch 1, a single
# window, window 1, shifts that are negative or larger than the window.
SHAPES = [
    (1, 7, 7, 3, 7, 0),
    (1, 7, 7, 3, 7, 3),
    (2, 14, 14, 13, 7, 3),
    (3, 14, 21, 5, 7, 3),
    (2, 28, 14, 8, 7, 0),
    (1, 8, 12, 16, 4, 2),
    (2, 12, 8, 1, 4, -1),
    (1, 6, 9, 13, 3, 7),
    (2, 3, 5, 6, 1, 2),
]
CSRC_DIR = os.path.join(os.path.dirname(window_process.__file__), "csrc")


@pytest.fixture(scope="module", autouse=True)
def built_library() -> None:
    """Builds (first run: about a minute) or loads the extension once; a failed CPU build fails the tests."""
    if not is_available(torch.device("cpu")):
        pytest.fail(f"The window-process extension did not build: {window_process_ops._library_error}")


def _require_device(device: str) -> None:
    if not is_available(torch.device(device)):
        pytest.fail(f"The fused window-process ops do not run on {device}; see the warning logged above")


def _random(shape: tuple, dtype: torch.dtype, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,height,width,channels,window,shift", SHAPES)
def test_matches_reference(device, dtype, batch, height, width, channels, window, shift):
    _require_device(device)
    x = _random((batch, height, width, channels), dtype, device)
    windows = roll_and_window_partition(x, shift, window)
    # A permutation moves values untouched, so equality is exact.
    assert torch.equal(windows, reference_roll_and_window_partition(x, shift, window))
    assert windows.is_contiguous()

    other_windows = _random(windows.shape, dtype, device)
    merged = window_merge_and_roll(other_windows, batch, height, width, shift, window)
    assert torch.equal(merged, reference_window_merge_and_roll(other_windows, batch, height, width, shift, window))
    assert torch.equal(window_merge_and_roll(windows, batch, height, width, shift, window), x)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_offset_inputs(device):
    _require_device(device)
    # A transposed view, and a view whose storage offset breaks the 16-byte alignment (CUDA falls back to narrower
    # vectors for it).
    transposed = _random((2, 21, 14, 6), torch.float32, device).transpose(1, 2)
    offset = _random((2 * 14 * 21 * 6 + 1,), torch.float32, device)[1:].view(2, 14, 21, 6)
    for x in (transposed, offset):
        windows = roll_and_window_partition(x, 3, 7)
        assert torch.equal(windows, reference_roll_and_window_partition(x, 3, 7))
        strided_windows = windows.transpose(1, 2).contiguous().transpose(1, 2)
        assert torch.equal(window_merge_and_roll(strided_windows, 2, 14, 21, 3, 7), x)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    _require_device(device)
    x = _random((2, 6, 9, 3), torch.float64, device).requires_grad_()
    windows = _random((2 * 2 * 3, 3, 3, 3), torch.float64, device).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: roll_and_window_partition(t, 1, 3), (x,))
    assert torch.autograd.gradcheck(lambda t: window_merge_and_roll(t, 2, 6, 9, 1, 3), (windows,))
    assert torch.autograd.gradgradcheck(lambda t: roll_and_window_partition(t, 2, 3), (x,))
    assert torch.autograd.gradgradcheck(lambda t: window_merge_and_roll(t, 2, 6, 9, 2, 3), (windows,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    _require_device(device)
    x = _random((2, 8, 12, 5), torch.float32, device).requires_grad_()
    windows = _random((2 * 2 * 3, 4, 4, 5), torch.float32, device).requires_grad_()
    torch.library.opcheck(torch.ops.swin_window_process.roll_and_window_partition.default, (x, 2, 4))
    torch.library.opcheck(torch.ops.swin_window_process.window_merge_and_roll.default, (windows, 2, 8, 12, 2, 4))


class _WindowBlock(torch.nn.Module):
    """Partition -> per-window Linear -> merge, choosing the fused ops through is_available as a model would."""

    def __init__(self, channels: int, window: int, shift: int):
        super().__init__()
        self.window = window
        self.shift = shift
        self.proj = torch.nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        if is_available(x.device):
            windows = roll_and_window_partition(x, self.shift, self.window)
            return window_merge_and_roll(self.proj(windows), batch, height, width, self.shift, self.window)
        windows = reference_roll_and_window_partition(x, self.shift, self.window)
        return reference_window_merge_and_roll(self.proj(windows), batch, height, width, self.shift, self.window)


def _check_compiled_block(device: str, backend: str) -> None:
    torch.manual_seed(0)
    block = _WindowBlock(channels=6, window=4, shift=2).to(device)
    x = _random((2, 8, 12, 6), torch.float32, device)
    x_eager = x.clone().requires_grad_()
    x_compiled = x.clone().requires_grad_()
    expected = block(x_eager)
    reference = reference_window_merge_and_roll(
        block.proj(reference_roll_and_window_partition(x, 2, 4)), 2, 8, 12, 2, 4
    )
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    actual = compiled(x_compiled)
    torch.testing.assert_close(expected, reference)
    torch.testing.assert_close(actual, expected)
    expected.square().sum().backward()
    actual.square().sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_aot_eager(device):
    # aot_eager traces the fake and autograd registrations like inductor does, without compiling C++ (fast).
    _require_device(device)
    torch._dynamo.reset()
    _check_compiled_block(device, backend="aot_eager")


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_inductor(device):
    # About 15 s on a 2-core CPU with a cold inductor cache.
    _require_device(device)
    torch._dynamo.reset()
    _check_compiled_block(device, backend="inductor")


def test_invalid_inputs_raise_clear_errors():
    with pytest.raises(RuntimeError, match="multiples of window"):
        roll_and_window_partition(torch.zeros(1, 10, 14, 3), 3, 7)
    with pytest.raises(RuntimeError, match=r"expected x of shape \(B, H, W, C\)"):
        roll_and_window_partition(torch.zeros(10, 14, 3), 3, 7)
    with pytest.raises(RuntimeError, match="window must be positive"):
        roll_and_window_partition(torch.zeros(1, 14, 14, 3), 3, 0)
    with pytest.raises(RuntimeError, match="do not match"):
        window_merge_and_roll(torch.zeros(4, 7, 7, 3), 2, 14, 14, 3, 7)


def test_failed_build_warns_once_and_is_unavailable(monkeypatch, caplog):
    def failing_build() -> str:
        raise RuntimeError(
            "Error building extension 'swin_window_process_cpu': [1/2] c++ -O3 ...\n"
            "window_process.cpp:1:10: fatal error: torch/library.h: No such file or directory\n"
            "compilation terminated."
        )

    monkeypatch.setattr(window_process_ops, "_library_error", None)
    monkeypatch.setattr(window_process_ops, "_library_loaded", False)
    monkeypatch.setattr(window_process_ops, "_device_available", {})
    monkeypatch.setattr(window_process_ops, "_ops_defined", lambda: False)
    monkeypatch.setattr(window_process_ops, "_build_and_load", failing_build)
    with caplog.at_level(logging.WARNING, logger=window_process_ops.__name__):
        assert not is_available(torch.device("cpu"))
        assert not is_available("cpu")
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "fatal error: torch/library.h" in warnings[0] and "compilation terminated" not in warnings[0]
    with pytest.raises(RuntimeError, match="unavailable"):
        roll_and_window_partition(torch.zeros(1, 7, 7, 3), 3, 7)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc on PATH")
def test_cuda_source_compiles_with_plain_nvcc(tmp_path):
    # The .cu file must not need torch headers, so that it builds (and is checked here) without a GPU or torch.
    command = [
        "nvcc",
        "-c",
        "-O3",
        "-std=c++17",
        "-gencode",
        "arch=compute_80,code=sm_80",
        "-gencode",
        "arch=compute_90,code=sm_90",
        os.path.join(CSRC_DIR, "window_process_cuda.cu"),
        "-o",
        str(tmp_path / "window_process_cuda.o"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    assert (tmp_path / "window_process_cuda.o").stat().st_size > 0


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ on PATH")
def test_cuda_launch_plan_moves_every_element_once(tmp_path):
    # The CUDA kernel cannot run without a GPU, but its launch plan and per-thread index arithmetic are plain C++
    # (window_process_cuda_plan.h): this runs every thread of the launch on the CPU, in the kernel's loop order, for
    # the Swin-T stage shapes and odd ones, every vector width, the planned grid and a 3x3 grid (grid-stride loops).
    source = os.path.join(os.path.dirname(__file__), "cpp", "window_process_cuda_plan_check.cpp")
    binary = tmp_path / "plan_check"
    build = subprocess.run(["g++", "-O2", "-std=c++17", "-I", CSRC_DIR, source, "-o", str(binary)],
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr
    result = subprocess.run([str(binary)], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stdout + result.stderr
