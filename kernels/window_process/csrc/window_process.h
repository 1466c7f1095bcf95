// Torch-side helpers shared by the CPU and CUDA implementations of the swin_window_process ops.
#pragma once

#include <ATen/core/Tensor.h>

#include "window_geometry.h"

namespace swin_window_process {

// Copies every window element between a contiguous image buffer and a contiguous windows buffer.
// merge == false: windows[...] = image[...] (partition); merge == true: image[...] = windows[...] (merge).
// The buffers are given in the order (source, destination) of the copy.
using WindowCopyFn = void (*)(const void* source, void* destination, const WindowGeometry& geometry, bool merge);

// Validates the inputs, allocates the output and runs `copy` for roll_and_window_partition.
at::Tensor roll_and_window_partition_with(const at::Tensor& x, int64_t shift, int64_t window, WindowCopyFn copy);

// Validates the inputs, allocates the output and runs `copy` for window_merge_and_roll.
at::Tensor window_merge_and_roll_with(const at::Tensor& windows, int64_t batch, int64_t height, int64_t width,
                                      int64_t shift, int64_t window, WindowCopyFn copy);

}  // namespace swin_window_process
