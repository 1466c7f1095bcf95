"""Ahead-of-time build of the fused window-process ops.

    pip install --no-build-isolation ./kernels/window_process

installs the shared library as the top-level module ``swin_window_process_C``, which ``kernels.window_process``
loads in preference to a JIT build. ``--no-build-isolation`` makes the build use the installed torch. The CUDA
kernels are included when a GPU is visible and a CUDA toolkit is found, or when ``FORCE_CUDA=1`` (for building on a
machine without a GPU; then set ``TORCH_CUDA_ARCH_LIST``, e.g. "8.0;9.0"). Rebuild after changing the C++ sources.
"""

import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

CSRC_DIR = "csrc"
CPU_SOURCES = ["window_process.cpp"]
CUDA_SOURCES = ["window_process_cuda_ops.cpp", "window_process_cuda.cu"]


def build_extension():
    """Returns the CUDA extension when CUDA can be compiled and used, else the CPU-only one."""
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    with_cuda = CUDA_HOME is not None and (torch.cuda.is_available() or force_cuda)
    extra_compile_args = {"cxx": ["-O3"], "nvcc": ["-O3"]}
    if with_cuda:
        sources = [os.path.join(CSRC_DIR, name) for name in CPU_SOURCES + CUDA_SOURCES]
        return CUDAExtension("swin_window_process_C", sources, extra_compile_args=extra_compile_args)
    sources = [os.path.join(CSRC_DIR, name) for name in CPU_SOURCES]
    return CppExtension("swin_window_process_C", sources, extra_compile_args={"cxx": extra_compile_args["cxx"]})


setup(
    name="swin-window-process",
    version="0.1.0",
    description="Fused cyclic shift + window partition ops for Swin Transformer",
    # Only the compiled library is installed; the Python side stays in kernels/window_process of the repository.
    packages=[],
    py_modules=[],
    ext_modules=[build_extension()],
    cmdclass={"build_ext": BuildExtension},
)
