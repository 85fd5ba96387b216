// Fused SimCLR view generation on the CPU: crop + bilinear resize + flip, colour jitter in the
// sample's op order, grayscale, Gaussian blur and the final scaling, one view at a time.
//
// Torch-free C++17: raw pointers, sizes and element strides. The torch glue lives in
// csrc/bindings/simclr_views.cpp; the plain-PyTorch reference is
// mgm_fast/data/augment.py (apply_torch, the batched path), and this kernel reproduces its
// formulas, clamping points and op order in float32 (up to float rounding, ~1e-6):
//
//   v   = clamp(x * 0.5 + 0.5, 0, 1)                     input [-1, 1] -> [0, 1]
//   crop + resize: bilinear, align_corners=False, no antialias, of the integer box
//         [top, top + h) x [left, left + w) to (out_h, out_w); columns first, then rows; the
//         flip reverses the column taps; the last row/column of the box is repeated, never
//         a pixel outside it
//   jitter (if set), for r = 0..3, op = order[r], f = factors[op]:
//         brightness  v = clamp(f v)
//         contrast    v = clamp(f v + (1 - f) * sum_c w_c mean(v_c))   (mean of the CURRENT image)
//         saturation  v = clamp(f v + (1 - f) * gray(v))
//         hue         if f != 0: rotate the HSV hue by f turns (m + C * clamp(2 - d_k, 0, 1),
//                     see hue_rotate); S and V are unchanged
//   gray (if set): every channel = gray(v) = 0.299 r + 0.587 g + 0.114 b (w above)
//   blur (if set): separable normalised Gaussian exp(-t^2 / (2 sigma^2)), t = -K/2..K/2,
//         reflect-101 borders (OpenCV BORDER_REFLECT_101), rows first, then columns
//   out = clamp(2 v - 1, -1, 1)
//
// Work per view: the view's pixels live in a thread-local (out_h, 3, out_w) float buffer
// (~200 KB at 128 x 128, so it stays in L2); the source is read once (the two input rows of the
// current output row are resampled along the columns on demand) and the output written once.
// The jitter is split only at contrast ops (they need the mean of the current image): ops
// before the first contrast run on each row as it is resampled, the channel sums needed by
// the contrast are accumulated on the way, and each later segment is one pass over the L2
// buffer. Views are independent, so the result does not depend on the thread count.
#pragma once

#include <cstdint>

namespace mgm_fast {
namespace cpu {

/// Jitter op codes (mgm_fast.data.augment BRIGHTNESS, CONTRAST, SATURATION, HUE).
enum JitterOp : int64_t { kBrightness = 0, kContrast = 1, kSaturation = 2, kHue = 3 };

/// Element strides of the (B, 3, H, W) input images.
struct ImageStrides {
  int64_t n, c, h, w;
};

/// N views of B images. Every per-view array is contiguous and indexed by the view n.
struct SimclrViewsProblem {
  const float* images = nullptr;  ///< (B, 3, H, W) float32 in [-1, 1], any strides
  ImageStrides image_strides{};
  int64_t batch = 0, height = 0, width = 0;
  int64_t views = 0;                    ///< N
  const int64_t* src_index = nullptr;   ///< (N,) image of view n, in [0, B)
  const int64_t* crop = nullptr;        ///< (N, 4) top, left, height, width (input pixels)
  const uint8_t* flip = nullptr;        ///< (N,) 0/1
  const uint8_t* jitter = nullptr;      ///< (N,) 0/1
  const int64_t* order = nullptr;       ///< (N, 4) jitter op codes in application order
  const float* factors = nullptr;       ///< (N, 4) brightness, contrast, saturation, hue shift
  const uint8_t* gray = nullptr;        ///< (N,) 0/1
  const uint8_t* blur = nullptr;        ///< (N,) 0/1
  const float* sigma = nullptr;         ///< (N,) blur sigma in output pixels
  float* out = nullptr;                 ///< (N, 3, out_height, out_width) contiguous output
  int64_t out_height = 0, out_width = 0;
  int64_t blur_kernel = 3;              ///< odd K; K / 2 < min(out_height, out_width)
};

/// What check_simclr_views found wrong (the first problem, in the order listed).
enum class ViewsError : int {
  kNone = 0,
  kOutputSize,   ///< out_height or out_width < 1
  kBlurKernel,   ///< blur_kernel even or < 1, or K / 2 >= min(out_height, out_width)
  kSrcIndex,     ///< src_index[view] outside [0, batch)
  kCrop,         ///< crop[view] not inside the H x W image (or an empty box)
  kOrder,        ///< an order[view] entry outside [0, 4)
};

struct ViewsCheck {
  ViewsError error = ViewsError::kNone;
  int64_t view = -1;  ///< the first offending view (kSrcIndex, kCrop, kOrder)
};

/// Validates sizes and every view's parameters; simclr_views requires kNone.
ViewsCheck check_simclr_views(const SimclrViewsProblem& problem);

/// Writes all N views. Precondition: check_simclr_views(problem).error == kNone.
/// num_threads <= 0 uses the OpenMP default. Views are spread over threads (dynamic schedule);
/// each view's arithmetic does not depend on the thread that runs it.
void simclr_views(const SimclrViewsProblem& problem, int num_threads);

// ---------------------------------------------------------------------------------------------
// Building blocks, exposed for the unit tests (csrc/tests/test_simclr_views.cpp).

/// Bilinear taps of a resize (align_corners=False) of a window of `length` samples to
/// `out_len`, with torch's float32 arithmetic: src = max(length / out_len * (j + 0.5) - 0.5, 0),
/// i0 = min(floor(src), length - 1), i1 = min(i0 + 1, length - 1), lam = clamp(src - floor(src),
/// 0, 1); output j = (1 - lam) x[i0] + lam x[i1]. Indices are relative to the window.
void bilinear_taps(int64_t length, int64_t out_len, int32_t* i0, int32_t* i1, float* lam);

/// The K normalised Gaussian taps for `sigma`, computed in double and rounded to float
/// (mgm_fast.data.augment.gaussian_kernel1d).
void gaussian_taps(float sigma, int64_t size, float* taps);

/// Rotates the HSV hue of n pixels (planes r, g, b, clamped to [0, 1] first) by `shift` turns,
/// in place, with the arithmetic of augment._hue_rotate_: with M = max, m = min, C = M - m and
/// the hue h in sextants [0, 6) (R wins ties, then G), each channel becomes
/// (m + 2C) - C * clamp(d_k, 1, 2), d_k the circular distance from h + 6 shift to the
/// channel's hue (0, 2, 4). Grays (C = 0) are unchanged. |shift| up to 2^21 turns.
void hue_rotate(float* r, float* g, float* b, int64_t n, float shift);

/// Separable blur of `channels` planes of (height, width) float32 values in place with the
/// symmetric taps (K = size odd, K / 2 < min(height, width)) and reflect-101 borders:
/// a pass along the rows (vertical) then along the columns, each accumulated as
/// t[K/2] x[i] + sum_{d=1..K/2} (t[K/2 + d] x[i - d] + t[K/2 + d] x[i + d]) in that order.
void gaussian_blur(float* planes, int64_t channels, int64_t height, int64_t width,
                   const float* taps, int64_t size);

}  // namespace cpu
}  // namespace mgm_fast
