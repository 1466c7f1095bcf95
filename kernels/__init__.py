"""Custom C++/CUDA kernels, each a package with a pure-PyTorch reference and a fallback."""
