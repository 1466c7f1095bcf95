// Operator definitions, input validation and the CPU implementation of the fused Swin window process ops.
//
//   roll_and_window_partition(x (B, H, W, C), shift, window) -> windows (B * nW, window, window, C)
//     == window_partition(torch.roll(x, (-shift, -shift), (1, 2)), window)
//   window_merge_and_roll(windows, B, H, W, shift, window) -> x (B, H, W, C)
//     == torch.roll(window_reverse(windows, window, H, W), (shift, shift), (1, 2))
//
// Both are the same permutation run in opposite directions, so each is the other's inverse and adjoint.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "window_process.h"

namespace swin_window_process {
namespace {

// Smallest amount of work worth handing to another thread: a few tens of KB of copies.
constexpr int64_t kMinBytesPerTask = 32 * 1024;

int64_t normalize_shift(int64_t shift, int64_t size) {
  return size > 0 ? ((shift % size) + size) % size : 0;
}

void check_window_size(const char* op, int64_t height, int64_t width, int64_t window) {
  TORCH_CHECK(window > 0, op, ": window must be positive, got ", window);
  TORCH_CHECK(height % window == 0 && width % window == 0, op, ": H (", height, ") and W (", width,
              ") must be multiples of window (", window, "); pad the input before partitioning");
}

WindowGeometry make_geometry(const at::Tensor& tensor, int64_t batch, int64_t height, int64_t width, int64_t shift,
                             int64_t window) {
  return WindowGeometry{batch,
                        height,
                        width,
                        window,
                        normalize_shift(shift, height),
                        normalize_shift(shift, width),
                        tensor.size(3) * static_cast<int64_t>(tensor.element_size())};
}

// Copies a run of bytes in fixed 64-byte blocks, which the compiler turns into plain vector loads and stores. A
// variable-size std::memcpy of the typical run (a few KB) goes through `rep movsb` in glibc, which measured 10-20 %
// slower for this access pattern on an AMD EPYC.
inline void copy_run_bytes(char* destination, const char* source, int64_t bytes) {
  constexpr int64_t kBlock = 64;
  int64_t offset = 0;
  for (; offset + kBlock <= bytes; offset += kBlock) {
    std::memcpy(destination + offset, source + offset, kBlock);
  }
  if (offset < bytes) {
    std::memcpy(destination + offset, source + offset, bytes - offset);
  }
}

// Copies one window row (window pixels) per iteration. Because of the cyclic shift, the window row is made of at most
// two contiguous runs of image pixels: [w0, min(w0 + window, W)) and, if it wraps around, [0, rest).
//
// The window rows are visited in the order of the source, so that reads stream through memory and the writes land in
// runs of window * C elements: the partition walks the image row by row (b, wh, i, ww), the merge walks the windows
// in storage order (b, wh, ww, i). For the partition this measured 5-10 % faster than walking the windows.
void copy_windows_cpu(const void* source, void* destination, const WindowGeometry& g, bool merge) {
  const int64_t windows_per_row = g.width / g.window;
  const int64_t windows_per_column = g.height / g.window;
  const int64_t num_window_rows = g.batch * windows_per_column * windows_per_row * g.window;
  const int64_t window_row_bytes = g.window * g.pixel_bytes;
  if (num_window_rows == 0 || window_row_bytes == 0) {
    return;
  }
  const char* src = static_cast<const char*>(source);
  char* dst = static_cast<char*>(destination);
  auto copy_run = [src, dst, merge](int64_t image_offset, int64_t window_offset, int64_t bytes) {
    if (merge) {
      copy_run_bytes(dst + image_offset, src + window_offset, bytes);
    } else {
      copy_run_bytes(dst + window_offset, src + image_offset, bytes);
    }
  };
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerTask / window_row_bytes);

  at::parallel_for(0, num_window_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t step = begin; step < end; ++step) {
      // band = b * windows_per_column + wh: one horizontal band of windows.
      int64_t band, i, ww;
      if (merge) {
        i = step % g.window;
        ww = (step / g.window) % windows_per_row;
        band = step / g.window / windows_per_row;
      } else {
        ww = step % windows_per_row;
        i = (step / windows_per_row) % g.window;
        band = step / windows_per_row / g.window;
      }
      const int64_t b = band / windows_per_column;
      const int64_t wh = band - b * windows_per_column;

      int64_t h = wh * g.window + i + g.shift_h;
      h = h >= g.height ? h - g.height : h;
      int64_t w0 = ww * g.window + g.shift_w;
      w0 = w0 >= g.width ? w0 - g.width : w0;
      const int64_t first_run_bytes = std::min(g.window, g.width - w0) * g.pixel_bytes;
      const int64_t second_run_bytes = window_row_bytes - first_run_bytes;

      const int64_t image_row_offset = (b * g.height + h) * g.width * g.pixel_bytes;
      const int64_t window_row_offset = ((band * windows_per_row + ww) * g.window + i) * window_row_bytes;
      copy_run(image_row_offset + w0 * g.pixel_bytes, window_row_offset, first_run_bytes);
      if (second_run_bytes > 0) {
        copy_run(image_row_offset, window_row_offset + first_run_bytes, second_run_bytes);
      }
    }
  });
}

at::Tensor roll_and_window_partition_cpu(const at::Tensor& x, int64_t shift, int64_t window) {
  return roll_and_window_partition_with(x, shift, window, copy_windows_cpu);
}

at::Tensor window_merge_and_roll_cpu(const at::Tensor& windows, int64_t batch, int64_t height, int64_t width,
                                     int64_t shift, int64_t window) {
  return window_merge_and_roll_with(windows, batch, height, width, shift, window, copy_windows_cpu);
}

}  // namespace

at::Tensor roll_and_window_partition_with(const at::Tensor& x, int64_t shift, int64_t window, WindowCopyFn copy) {
  constexpr const char* op = "roll_and_window_partition";
  TORCH_CHECK(x.dim() == 4, op, ": expected x of shape (B, H, W, C), got a ", x.dim(), "-D tensor of shape ",
              x.sizes());
  const int64_t batch = x.size(0);
  const int64_t height = x.size(1);
  const int64_t width = x.size(2);
  check_window_size(op, height, width, window);

  const at::Tensor image = x.contiguous();
  const int64_t num_windows = batch * (height / window) * (width / window);
  at::Tensor windows = at::empty({num_windows, window, window, x.size(3)}, image.options());
  copy(image.const_data_ptr(), windows.mutable_data_ptr(), make_geometry(image, batch, height, width, shift, window),
       /*merge=*/false);
  return windows;
}

at::Tensor window_merge_and_roll_with(const at::Tensor& windows, int64_t batch, int64_t height, int64_t width,
                                      int64_t shift, int64_t window, WindowCopyFn copy) {
  constexpr const char* op = "window_merge_and_roll";
  TORCH_CHECK(windows.dim() == 4, op, ": expected windows of shape (B * nW, window, window, C), got a ",
              windows.dim(), "-D tensor of shape ", windows.sizes());
  TORCH_CHECK(batch >= 0 && height >= 0 && width >= 0, op, ": B, H and W must be non-negative, got B=", batch,
              ", H=", height, ", W=", width);
  check_window_size(op, height, width, window);
  const int64_t num_windows = batch * (height / window) * (width / window);
  TORCH_CHECK(windows.size(0) == num_windows && windows.size(1) == window && windows.size(2) == window, op,
              ": windows of shape ", windows.sizes(), " do not match B=", batch, ", H=", height, ", W=", width,
              ", window=", window, " (expected (", num_windows, ", ", window, ", ", window, ", C))");

  const at::Tensor source = windows.contiguous();
  at::Tensor image = at::empty({batch, height, width, windows.size(3)}, source.options());
  copy(source.const_data_ptr(), image.mutable_data_ptr(), make_geometry(source, batch, height, width, shift, window),
       /*merge=*/true);
  return image;
}

TORCH_LIBRARY(swin_window_process, m) {
  m.def("roll_and_window_partition(Tensor x, int shift, int window) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("window_merge_and_roll(Tensor windows, int B, int H, int W, int shift, int window) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(swin_window_process, CPU, m) {
  m.impl("roll_and_window_partition", &roll_and_window_partition_cpu);
  m.impl("window_merge_and_roll", &window_merge_and_roll_cpu);
}

}  // namespace swin_window_process
