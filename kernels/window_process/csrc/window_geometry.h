// Geometry of the fused "cyclic shift + window partition" permutation.
//
// Plain C++ with no torch or CUDA dependency, so that the CUDA kernels can be compiled with a bare `nvcc -c`.
//
// The permutation maps window element (n, i, j, :) of the windows tensor (B * nW, window, window, C), with
// n = (b * (height / window) + wh) * (width / window) + ww, to image pixel
//   (b, (wh * window + i + shift_h) % height, (ww * window + j + shift_w) % width, :)
// of the image tensor (B, height, width, C). This is torch.roll(x, (-shift, -shift), (1, 2)) followed by the
// Swin window partition; the reverse direction (window merge then torch.roll by +shift) is its inverse.
#pragma once

#include <cstdint>

struct WindowGeometry {
  int64_t batch;
  int64_t height;
  int64_t width;
  int64_t window;
  // Cyclic shifts normalised to [0, height) and [0, width): window row i of window-row wh reads image row
  // (wh * window + i + shift_h) % height.
  int64_t shift_h;
  int64_t shift_w;
  // Bytes of one pixel, i.e. channels * element size; a pixel is always copied as one contiguous run.
  int64_t pixel_bytes;
};
