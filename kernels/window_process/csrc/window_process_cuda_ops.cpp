// Torch glue of the CUDA implementation: only compiled into CUDA builds of the extension.
//
// The stream comes from c10/cuda/CUDAStream.h (at::cuda::getCurrentCUDAStream is the same function) rather than
// ATen/cuda/CUDAContext.h, which would also pull in the cuBLAS and cuSPARSE headers this kernel does not need.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "window_process.h"
#include "window_process_cuda.h"

namespace swin_window_process {
namespace {

// Runs on the current device and stream, which the CUDAGuard of the caller has set to the input's device.
void copy_windows_cuda(const void* source, void* destination, const WindowGeometry& geometry, bool merge) {
  const cudaError_t status =
      launch_window_process(source, destination, geometry, merge, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "swin_window_process: CUDA kernel launch failed for B=", geometry.batch,
              ", H=", geometry.height, ", W=", geometry.width, ", window=", geometry.window,
              ", pixel bytes=", geometry.pixel_bytes, ": ", cudaGetErrorString(status));
}

at::Tensor roll_and_window_partition_cuda(const at::Tensor& x, int64_t shift, int64_t window) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  return roll_and_window_partition_with(x, shift, window, copy_windows_cuda);
}

at::Tensor window_merge_and_roll_cuda(const at::Tensor& windows, int64_t batch, int64_t height, int64_t width,
                                      int64_t shift, int64_t window) {
  const c10::cuda::CUDAGuard device_guard(windows.device());
  return window_merge_and_roll_with(windows, batch, height, width, shift, window, copy_windows_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(swin_window_process, CUDA, m) {
  m.impl("roll_and_window_partition", &roll_and_window_partition_cuda);
  m.impl("window_merge_and_roll", &window_merge_and_roll_cuda);
}

}  // namespace swin_window_process
