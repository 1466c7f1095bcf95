// Launch plan and per-thread work of the CUDA window-process kernels, in plain C++ that also compiles for the host,
// so that tests/test_window_process.py can run every thread of a launch on the CPU (no GPU needed) and check that the
// index arithmetic moves every element exactly once to the right place.
//
// Work is split into items: one item is a chunk of one window row (window pixels = window * C elements). A thread
// block of (lanes x items_per_block) threads handles items_per_block items at once, its lanes covering the chunk in
// kVectorsPerThread coalesced sweeps. Each thread issues all its loads before any store, so its kVectorsPerThread
// reads are in flight together; with one load per loop iteration (as before) a small map (7x7x768: 896 window rows in
// a batch of 128, 6 vectors a thread) waited for memory 6 times in a row and ran slower than torch.roll.
#pragma once

#include <climits>
#include <cstdint>

#include "window_geometry.h"

#ifdef __CUDACC__
#define WP_HOST_DEVICE __host__ __device__
#else
#define WP_HOST_DEVICE
#endif

namespace swin_window_process {

constexpr int kMaxThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
constexpr int kVectorsPerThread = 4;
constexpr int64_t kMaxGridX = 1 << 20;
constexpr int64_t kMaxGridY = 65535;

// Sizes in units of the vector type the kernel moves. Indices inside one image fit in 32 bits (checked by
// plan_launch); offsets of whole images are 64-bit.
struct KernelParams {
  int64_t batch;
  int64_t image_vecs;      // H * W * pixel_vecs: the stride of one image in both the image and the windows tensor
  int height;
  int width;
  int window;
  int shift_h;
  int shift_w;
  int windows_per_row;     // W / window
  int rows_per_image;      // window rows in one image: (H / window) * (W / window) * window
  int pixel_vecs;          // vectors per pixel (C * element size / vector size)
  int row_vecs;            // vectors per window row: window * pixel_vecs
  int image_row_vecs;      // vectors per image row: W * pixel_vecs
  int chunks_per_row;      // items per window row
  int chunk_vecs;          // vectors per item: lanes * kVectorsPerThread
  int items_per_image;     // rows_per_image * chunks_per_row
};

struct LaunchPlan {
  KernelParams params;
  int lanes;               // blockDim.x: threads along a chunk, a multiple of the warp size
  int items_per_block;     // blockDim.y
  int64_t grid_x;          // blocks over the items of one image (grid-stride beyond kMaxGridX)
  int64_t grid_y;          // blocks over the batch (grid-stride beyond kMaxGridY)
};

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Plans the launch for vectors of `vector_bytes`; returns false when an index would not fit in 32 bits.
inline bool plan_launch(const WindowGeometry& g, int64_t vector_bytes, LaunchPlan* plan) {
  const int64_t pixel_vecs = g.pixel_bytes / vector_bytes;
  const int64_t row_vecs = g.window * pixel_vecs;
  const int64_t image_row_vecs = g.width * pixel_vecs;
  const int64_t rows_per_image = g.height * g.width / g.window;
  // Few chunks per row, each as wide as a block can sweep in kVectorsPerThread passes, split evenly.
  const int64_t chunks_per_row = ceil_div(row_vecs, int64_t{kMaxThreadsPerBlock} * kVectorsPerThread);
  const int64_t lanes = ceil_div(ceil_div(row_vecs, chunks_per_row * kVectorsPerThread), kWarpSize) * kWarpSize;
  const int64_t items_per_image = rows_per_image * chunks_per_row;
  // Everything indexed in 32 bits in the kernel must fit, including h + shift_h < 2 * H, a position along the
  // image row before its wrap (< 2 * image_row_vecs) and the grid-stride loop's item + stride.
  if (g.height > INT_MAX / 2 || g.width > INT_MAX / 2 || image_row_vecs > INT_MAX / 2 ||
      items_per_image > INT_MAX - kMaxGridX * kMaxThreadsPerBlock || row_vecs > INT_MAX / 2) {
    return false;
  }
  // Short rows (small C): several items per block, so that blocks keep kMaxThreadsPerBlock threads busy.
  int64_t items_per_block = kMaxThreadsPerBlock / lanes;
  if (items_per_block > items_per_image) {
    items_per_block = items_per_image;
  }
  KernelParams& p = plan->params;
  p.batch = g.batch;
  p.image_vecs = g.height * g.width * pixel_vecs;
  p.height = static_cast<int>(g.height);
  p.width = static_cast<int>(g.width);
  p.window = static_cast<int>(g.window);
  p.shift_h = static_cast<int>(g.shift_h);
  p.shift_w = static_cast<int>(g.shift_w);
  p.windows_per_row = static_cast<int>(g.width / g.window);
  p.rows_per_image = static_cast<int>(rows_per_image);
  p.pixel_vecs = static_cast<int>(pixel_vecs);
  p.row_vecs = static_cast<int>(row_vecs);
  p.image_row_vecs = static_cast<int>(image_row_vecs);
  p.chunks_per_row = static_cast<int>(chunks_per_row);
  p.chunk_vecs = static_cast<int>(lanes * kVectorsPerThread);
  p.items_per_image = static_cast<int>(items_per_image);
  plan->lanes = static_cast<int>(lanes);
  plan->items_per_block = static_cast<int>(items_per_block);
  const int64_t blocks = ceil_div(items_per_image, items_per_block);
  plan->grid_x = blocks < kMaxGridX ? blocks : kMaxGridX;
  plan->grid_y = g.batch < kMaxGridY ? g.batch : kMaxGridY;
  return true;
}

// Where the k-th vector of a window row that starts at `first` along its image row lies on that row: the window row
// wraps around the row's end at most once (window <= W), so one comparison replaces a division.
WP_HOST_DEVICE inline int wrapped(int first, int k, int image_row_vecs) {
  const int position = first + k;
  return position >= image_row_vecs ? position - image_row_vecs : position;
}

// Calls f(u, k) for the u-th of a thread's vectors, the k-th of its window row, for those inside the row.
template <typename F>
WP_HOST_DEVICE inline void for_each_vector(int k0, int lanes, int row_vecs, F f) {
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int u = 0; u < kVectorsPerThread; ++u) {
    const int k = k0 + u * lanes;
    if (k < row_vecs) {
      f(u, k);
    }
  }
}

// The part of item `item` of image `b` that lane `lane` of the item's `lanes` threads copies.
// kMerge == false: windows = partition(roll(image, -shift)); kMerge == true: image = roll(merge(windows), +shift).
template <typename Vec, bool kMerge>
WP_HOST_DEVICE inline void copy_item(const Vec* __restrict__ source, Vec* __restrict__ destination,
                                     const KernelParams& p, int64_t b, int item, int lane, int lanes) {
  const int row = item / p.chunks_per_row;
  const int chunk = item - row * p.chunks_per_row;
  const int window_in_image = row / p.window;
  const int i = row - window_in_image * p.window;
  const int wh = window_in_image / p.windows_per_row;
  const int ww = window_in_image - wh * p.windows_per_row;
  int h = wh * p.window + i + p.shift_h;
  h = h >= p.height ? h - p.height : h;
  int w0 = ww * p.window + p.shift_w;
  w0 = w0 >= p.width ? w0 - p.width : w0;

  // A window row is a contiguous run of the windows tensor and, along its image row, a run that starts at pixel w0.
  const int64_t image_row = b * p.image_vecs + static_cast<int64_t>(h) * p.image_row_vecs;
  const int64_t window_row = b * p.image_vecs + static_cast<int64_t>(row) * p.row_vecs;
  const int first = w0 * p.pixel_vecs;
  const int k0 = chunk * p.chunk_vecs + lane;
  const Vec* read_row = source + (kMerge ? window_row : image_row);
  Vec* write_row = destination + (kMerge ? image_row : window_row);
  // All loads before any store, so that a thread's kVectorsPerThread reads are in flight together.
  Vec values[kVectorsPerThread];
  for_each_vector(k0, lanes, p.row_vecs,
                  [&](int u, int k) { values[u] = read_row[kMerge ? k : wrapped(first, k, p.image_row_vecs)]; });
  for_each_vector(k0, lanes, p.row_vecs,
                  [&](int u, int k) { write_row[kMerge ? wrapped(first, k, p.image_row_vecs) : k] = values[u]; });
}

}  // namespace swin_window_process
