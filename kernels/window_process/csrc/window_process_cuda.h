// Launcher of the CUDA window-process kernels. Pure CUDA runtime API, no torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include "window_geometry.h"

namespace swin_window_process {

// Launches the copy on `stream` between a contiguous image (B, H, W, C) and contiguous windows (B * nW, window,
// window, C), both given as raw device pointers in the order (source, destination) of the copy.
// merge == false: windows = partition(roll(image, -shift)); merge == true: image = roll(merge(windows), +shift).
// Returns the launch status (cudaSuccess, or the error of an invalid launch / too large geometry).
cudaError_t launch_window_process(const void* source, void* destination, const WindowGeometry& geometry, bool merge,
                                  cudaStream_t stream);

}  // namespace swin_window_process
