// CUDA kernels of the fused "cyclic shift + window partition" permutation and its inverse.
//
// Pure CUDA (no torch headers) so that this file compiles with a bare `nvcc -c`; the torch glue lives in
// window_process_cuda_ops.cpp. The kernels only move bytes, so one kernel per vector width serves every dtype. The
// launch plan and the work of one thread are in window_process_cuda_plan.h (host-testable); here they are launched.
//
// Accesses to the windows tensor are fully contiguous and accesses to the image are contiguous except at the single
// wrap-around point of the cyclic shift: both sides are coalesced.
#include <cuda_runtime.h>

#include <cstdint>

#include "window_process_cuda.h"
#include "window_process_cuda_plan.h"

namespace swin_window_process {
namespace {

template <typename Vec, bool kMerge>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    window_process_kernel(const Vec* __restrict__ source, Vec* __restrict__ destination, const KernelParams p) {
  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    for (int item = blockIdx.x * blockDim.y + threadIdx.y; item < p.items_per_image; item += gridDim.x * blockDim.y) {
      copy_item<Vec, kMerge>(source, destination, p, b, item, threadIdx.x, blockDim.x);
    }
  }
}

template <typename Vec>
cudaError_t launch_with_vector(const void* source, void* destination, const WindowGeometry& g, bool merge,
                               cudaStream_t stream) {
  LaunchPlan plan;
  if (!plan_launch(g, static_cast<int64_t>(sizeof(Vec)), &plan)) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned int>(plan.grid_x), static_cast<unsigned int>(plan.grid_y));
  const dim3 block(static_cast<unsigned int>(plan.lanes), static_cast<unsigned int>(plan.items_per_block));
  const Vec* typed_source = static_cast<const Vec*>(source);
  Vec* typed_destination = static_cast<Vec*>(destination);
  if (merge) {
    window_process_kernel<Vec, true><<<grid, block, 0, stream>>>(typed_source, typed_destination, plan.params);
  } else {
    window_process_kernel<Vec, false><<<grid, block, 0, stream>>>(typed_source, typed_destination, plan.params);
  }
  return cudaGetLastError();
}

bool is_aligned(const void* pointer, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace

cudaError_t launch_window_process(const void* source, void* destination, const WindowGeometry& geometry, bool merge,
                                  cudaStream_t stream) {
  if (geometry.batch == 0 || geometry.height == 0 || geometry.width == 0 || geometry.pixel_bytes == 0) {
    return cudaSuccess;
  }
  // The widest vector that divides a pixel and to which both buffers are aligned: a pixel is the longest run that
  // is guaranteed contiguous on both sides of the permutation.
  int64_t vector_bytes = 16;
  while (vector_bytes > 1 && (geometry.pixel_bytes % vector_bytes != 0 || !is_aligned(source, vector_bytes) ||
                              !is_aligned(destination, vector_bytes))) {
    vector_bytes /= 2;
  }
  switch (vector_bytes) {
    case 16:
      return launch_with_vector<uint4>(source, destination, geometry, merge, stream);
    case 8:
      return launch_with_vector<uint2>(source, destination, geometry, merge, stream);
    case 4:
      return launch_with_vector<uint32_t>(source, destination, geometry, merge, stream);
    case 2:
      return launch_with_vector<uint16_t>(source, destination, geometry, merge, stream);
    default:
      return launch_with_vector<uint8_t>(source, destination, geometry, merge, stream);
  }
}

}  // namespace swin_window_process
