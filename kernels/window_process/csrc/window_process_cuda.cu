// CUDA kernels of the fused "cyclic shift + window partition" permutation and its inverse.
//
// Pure CUDA (no torch headers) so that this file compiles with a bare `nvcc -c`; the torch glue lives in
// window_process_cuda_ops.cpp. The kernels only move bytes, so one kernel per vector width serves every dtype.
//
// One thread block copies one window row (window pixels = window * C elements) per iteration. Consecutive threads
// handle consecutive vectors of the row, so accesses to the windows tensor are fully contiguous and accesses to the
// image are contiguous except at the single wrap-around point of the cyclic shift: both sides are coalesced.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "window_process_cuda.h"

namespace swin_window_process {
namespace {

constexpr int kMaxThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
constexpr int64_t kMaxGridX = 1 << 20;
constexpr int64_t kMaxGridY = 65535;

// Sizes in units of the vector type the kernel moves. Indices inside one image fit in 32 bits (checked by the
// launcher); offsets of whole images and rows are 64-bit.
struct KernelParams {
  int64_t batch;
  int64_t image_vecs;  // H * W * pixel_vecs: the stride of one image in both the image and the windows tensor
  int height;
  int width;
  int window;
  int shift_h;
  int shift_w;
  int windows_per_row;  // W / window
  int rows_per_image;   // window rows in one image: (H / window) * (W / window) * window
  int pixel_vecs;       // vectors per pixel (C * element size / vector size)
  int row_vecs;         // vectors per window row: window * pixel_vecs
};

template <typename Vec, bool kMerge>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    window_process_kernel(const Vec* __restrict__ source, Vec* __restrict__ destination, const KernelParams p) {
  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    for (int row = blockIdx.x; row < p.rows_per_image; row += gridDim.x) {
      const int window_in_image = row / p.window;
      const int i = row - window_in_image * p.window;
      const int wh = window_in_image / p.windows_per_row;
      const int ww = window_in_image - wh * p.windows_per_row;
      int h = wh * p.window + i + p.shift_h;
      h = h >= p.height ? h - p.height : h;
      int w0 = ww * p.window + p.shift_w;
      w0 = w0 >= p.width ? w0 - p.width : w0;

      const int64_t image_row = b * p.image_vecs + static_cast<int64_t>(h) * p.width * p.pixel_vecs;
      const int64_t window_row = b * p.image_vecs + static_cast<int64_t>(row) * p.row_vecs;
      for (int k = threadIdx.x; k < p.row_vecs; k += blockDim.x) {
        const int j = k / p.pixel_vecs;
        const int v = k - j * p.pixel_vecs;
        int w = w0 + j;
        w = w >= p.width ? w - p.width : w;
        const int64_t image_index = image_row + static_cast<int64_t>(w) * p.pixel_vecs + v;
        if (kMerge) {
          destination[image_index] = source[window_row + k];
        } else {
          destination[window_row + k] = source[image_index];
        }
      }
    }
  }
}

template <typename Vec>
cudaError_t launch_with_vector(const void* source, void* destination, const WindowGeometry& g, bool merge,
                               cudaStream_t stream) {
  const int64_t pixel_vecs = g.pixel_bytes / static_cast<int64_t>(sizeof(Vec));
  const int64_t row_vecs = g.window * pixel_vecs;
  const int64_t rows_per_image = g.height * g.width / g.window;
  // Everything indexed in 32 bits inside the kernel must fit, including h + shift_h < 2 * H, w + shift_w < 2 * W and
  // the grid-stride loop's row + gridDim.x.
  if (g.height > INT_MAX / 2 || g.width > INT_MAX / 2 || rows_per_image > INT_MAX - kMaxGridX ||
      row_vecs > INT_MAX - kMaxThreadsPerBlock) {
    return cudaErrorInvalidValue;
  }

  KernelParams params;
  params.batch = g.batch;
  params.image_vecs = g.height * g.width * pixel_vecs;
  params.height = static_cast<int>(g.height);
  params.width = static_cast<int>(g.width);
  params.window = static_cast<int>(g.window);
  params.shift_h = static_cast<int>(g.shift_h);
  params.shift_w = static_cast<int>(g.shift_w);
  params.windows_per_row = static_cast<int>(g.width / g.window);
  params.rows_per_image = static_cast<int>(rows_per_image);
  params.pixel_vecs = static_cast<int>(pixel_vecs);
  params.row_vecs = static_cast<int>(row_vecs);

  // Small rows (small C) get a smaller block so that fewer threads idle; large rows loop inside the block.
  const int64_t rounded_row = (row_vecs + kWarpSize - 1) / kWarpSize * kWarpSize;
  const int threads = static_cast<int>(rounded_row < kMaxThreadsPerBlock ? rounded_row : kMaxThreadsPerBlock);
  const dim3 grid(static_cast<unsigned int>(rows_per_image < kMaxGridX ? rows_per_image : kMaxGridX),
                  static_cast<unsigned int>(g.batch < kMaxGridY ? g.batch : kMaxGridY));
  const Vec* typed_source = static_cast<const Vec*>(source);
  Vec* typed_destination = static_cast<Vec*>(destination);
  if (merge) {
    window_process_kernel<Vec, true><<<grid, threads, 0, stream>>>(typed_source, typed_destination, params);
  } else {
    window_process_kernel<Vec, false><<<grid, threads, 0, stream>>>(typed_source, typed_destination, params);
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
