// Runs every thread of the CUDA window-process launch on the CPU, in the kernel's loop order, for many geometries,
// vector widths and grid sizes, and checks the partition against the permutation of window_geometry.h and the merge
// as its inverse. Built and run by tests/test_window_process.py (g++ only; no GPU or CUDA toolkit needed).
#include <cstdint>
#include <cstdio>
#include <vector>

#include "window_process_cuda_plan.h"

using namespace swin_window_process;

template <int kBytes>
struct Bytes {
  unsigned char b[kBytes];
};

// The kernel's two grid-stride loops and its (lanes x items_per_block) block, for a grid of grid_x x grid_y blocks.
template <typename Vec, bool kMerge>
void emulate(const LaunchPlan& plan, int64_t grid_x, int64_t grid_y, const void* source, void* destination) {
  const KernelParams& p = plan.params;
  for (int64_t block_y = 0; block_y < grid_y; ++block_y) {
    for (int64_t block_x = 0; block_x < grid_x; ++block_x) {
      for (int thread_y = 0; thread_y < plan.items_per_block; ++thread_y) {
        for (int thread_x = 0; thread_x < plan.lanes; ++thread_x) {
          for (int64_t b = block_y; b < p.batch; b += grid_y) {
            for (int64_t item = block_x * plan.items_per_block + thread_y; item < p.items_per_image;
                 item += grid_x * plan.items_per_block) {
              copy_item<Vec, kMerge>(static_cast<const Vec*>(source), static_cast<Vec*>(destination), p, b,
                                     static_cast<int>(item), thread_x, plan.lanes);
            }
          }
        }
      }
    }
  }
}

template <typename Vec>
bool check(const WindowGeometry& g, int64_t grid_x_cap, int64_t grid_y_cap) {
  LaunchPlan plan;
  if (!plan_launch(g, sizeof(Vec), &plan)) {
    std::printf("plan_launch refused B=%lld H=%lld W=%lld\n", (long long)g.batch, (long long)g.height,
                (long long)g.width);
    return false;
  }
  if (plan.lanes % kWarpSize != 0 || plan.lanes * plan.items_per_block > kMaxThreadsPerBlock) {
    std::printf("bad block %d x %d\n", plan.lanes, plan.items_per_block);
    return false;
  }
  const int64_t elements = g.batch * g.height * g.width * g.pixel_bytes / 4;  // uint32 elements
  const int64_t channels = g.pixel_bytes / 4;
  std::vector<uint32_t> image(elements), windows(elements, 0xFFFFFFFFu), merged(elements, 0xFFFFFFFFu);
  for (int64_t e = 0; e < elements; ++e) image[e] = static_cast<uint32_t>(e);
  const int64_t grid_x = plan.grid_x < grid_x_cap ? plan.grid_x : grid_x_cap;
  const int64_t grid_y = plan.grid_y < grid_y_cap ? plan.grid_y : grid_y_cap;
  emulate<Vec, false>(plan, grid_x, grid_y, image.data(), windows.data());
  const int64_t ws = g.window, per_row = g.width / ws, per_column = g.height / ws;
  for (int64_t b = 0; b < g.batch; ++b)
    for (int64_t wh = 0; wh < per_column; ++wh)
      for (int64_t ww = 0; ww < per_row; ++ww)
        for (int64_t i = 0; i < ws; ++i)
          for (int64_t j = 0; j < ws; ++j)
            for (int64_t c = 0; c < channels; ++c) {
              const int64_t n = (b * per_column + wh) * per_row + ww;
              const int64_t h = (wh * ws + i + g.shift_h) % g.height, w = (ww * ws + j + g.shift_w) % g.width;
              const int64_t window_index = ((n * ws + i) * ws + j) * channels + c;
              const int64_t image_index = ((b * g.height + h) * g.width + w) * channels + c;
              if (windows[window_index] != image[image_index]) {
                std::printf("partition mismatch at window element %lld (vector %zu bytes)\n", (long long)window_index,
                            sizeof(Vec));
                return false;
              }
            }
  emulate<Vec, true>(plan, grid_x, grid_y, windows.data(), merged.data());
  if (merged != image) {
    std::printf("merge is not the inverse (vector %zu bytes)\n", sizeof(Vec));
    return false;
  }
  return true;
}

int main() {
  // (B, H, W, uint32 channels, window, shift): Swin-T stage shapes at small batch, channels that allow only narrow
  // vectors, rows longer than one block sweep (several chunks), a single window, window 1, H != W.
  const int64_t cases[][6] = {{2, 7, 7, 768, 7, 3},  {2, 7, 7, 768, 7, 0},  {1, 14, 14, 384, 7, 3},
                              {1, 28, 28, 192, 7, 3}, {2, 56, 56, 96, 7, 3}, {3, 14, 21, 5, 7, 3},
                              {2, 12, 8, 1, 4, 3},    {1, 6, 9, 13, 3, 1},   {2, 3, 5, 6, 1, 0},
                              {1, 16, 16, 2100, 8, 4}, {5, 8, 8, 3, 4, 2}};
  int checked = 0;
  for (const auto& c : cases) {
    const WindowGeometry g{c[0], c[1], c[2], c[4], c[5] % c[1], c[5] % c[2], c[3] * 4};
    for (const int64_t cap : {int64_t{1} << 40, int64_t{3}}) {  // the planned grid, and a tiny one (grid-stride)
      bool ok = check<Bytes<4>>(g, cap, cap) && check<Bytes<2>>(g, cap, cap) && check<Bytes<1>>(g, cap, cap);
      if (g.pixel_bytes % 8 == 0) ok = ok && check<Bytes<8>>(g, cap, cap);
      if (g.pixel_bytes % 16 == 0) ok = ok && check<Bytes<16>>(g, cap, cap);
      if (!ok) {
        std::printf("FAILED B=%lld H=%lld W=%lld C=%lld window=%lld shift=%lld\n", (long long)c[0], (long long)c[1],
                    (long long)c[2], (long long)c[3], (long long)c[4], (long long)c[5]);
        return 1;
      }
      ++checked;
    }
  }
  std::printf("ok %d cases\n", checked);
  return 0;
}
