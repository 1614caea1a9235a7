// One-pass band-stack normalisation for the data path: (T, C, H, W) or (T, H, W, C) integer or
// float32 pixels -> float32 (T, C, h, w) = (x - mean[c]) / std[c], zero where a pixel is invalid,
// plus a bool (T, h, w) validity mask (no band equal to nodata, every band finite). Crop, flips
// and quarter turns are folded into one affine map from output to source pixel, so every source
// pixel is read once and every output written once (numpy needs about nine passes for this).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "normalize_crop_flip.h"

namespace py = pybind11;

namespace {

struct Geometry {
  int64_t T, C, H, W;      // source
  int64_t h, w;            // output
  int64_t sT, sC, sY, sX;  // source strides, in elements
  // source (y, x) = (oy + yi * i + yj * j, ox + xi * i + xj * j) for output (i, j)
  int64_t oy, yi, yj, ox, xi, xj;
};

// Output elements below which one thread does the whole job: a fork/join on a busy machine
// (data-loader workers, other jobs) can cost milliseconds, far more than small tiles take.
constexpr int64_t kParallelGrain = int64_t(1) << 21;

template <typename S>
void run(const S* src, const float* mean, const float* stdv, bool has_nodata, S nodata,
         const Geometry& g, float* out, bool* valid, int threads) {
  const int64_t plane = g.h * g.w;
  const int64_t rows = g.T * g.h;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    // Per-thread row buffers: the bands of one output row, de-interleaved, then normalised
    // band by band in a loop the compiler vectorises.
    std::vector<float> tmp(static_cast<size_t>(g.C * g.w));
    std::vector<unsigned char> ok(static_cast<size_t>(g.w));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = r / g.h, i = r % g.h;
      const S* st = src + t * g.sT;
      for (int64_t j = 0; j < g.w; ++j) {
        const int64_t y = g.oy + g.yi * i + g.yj * j;
        const int64_t x = g.ox + g.xi * i + g.xj * j;
        const S* px = st + y * g.sY + x * g.sX;
        bool good = true;
        for (int64_t c = 0; c < g.C; ++c) {
          const S v = px[c * g.sC];
          if (has_nodata && v == nodata) good = false;
          const float f = static_cast<float>(v);
          if constexpr (std::is_floating_point_v<S>) {  // integer bands are always finite
            if (!std::isfinite(f)) good = false;
          }
          tmp[c * g.w + j] = f;
        }
        ok[j] = good;
      }
      bool* vt = valid + t * plane + i * g.w;
      for (int64_t j = 0; j < g.w; ++j) vt[j] = ok[j] != 0;
      for (int64_t c = 0; c < g.C; ++c) {
        // A true division (not a multiply by 1/std) keeps the result bit-identical to numpy's.
        const float m = mean[c], sd = stdv[c];
        const float* tp = tmp.data() + c * g.w;
        float* o = out + (t * g.C + c) * plane + i * g.w;
        const unsigned char* okp = ok.data();
        for (int64_t j = 0; j < g.w; ++j) {
          const float v = (tp[j] - m) / sd;
          o[j] = okp[j] ? v : 0.0f;
        }
      }
    }
  }
}

template <typename S>
py::tuple dispatch(py::array src_any, py::array_t<float, py::array::c_style> mean,
                   py::array_t<float, py::array::c_style> stdv, const std::string& layout,
                   std::vector<int64_t> crop, std::vector<int64_t> affine, bool has_nodata,
                   double nodata, int threads) {
  auto src = py::array_t<S, py::array::c_style>::ensure(src_any);
  if (!src) throw std::invalid_argument("normalize_crop_flip: source is not C-contiguous");
  if (src.ndim() != 4)
    throw std::invalid_argument("normalize_crop_flip: source must be 4-d, got " +
                                std::to_string(src.ndim()) + "-d");
  Geometry g{};
  g.T = src.shape(0);
  if (layout == "TCHW") {
    g.C = src.shape(1), g.H = src.shape(2), g.W = src.shape(3);
    g.sT = g.C * g.H * g.W, g.sC = g.H * g.W, g.sY = g.W, g.sX = 1;
  } else if (layout == "THWC") {
    g.H = src.shape(1), g.W = src.shape(2), g.C = src.shape(3);
    g.sT = g.H * g.W * g.C, g.sC = 1, g.sY = g.W * g.C, g.sX = g.C;
  } else {
    throw std::invalid_argument("normalize_crop_flip: layout must be TCHW or THWC, got " + layout);
  }
  if (mean.size() != g.C || stdv.size() != g.C)
    throw std::invalid_argument("normalize_crop_flip: mean/std must have one value per band (" +
                                std::to_string(g.C) + ")");
  if (crop.size() != 4 || affine.size() != 8)
    throw std::invalid_argument("normalize_crop_flip: crop needs 4 values, affine 8");
  const int64_t top = crop[0], left = crop[1], ch = crop[2], cw = crop[3];
  if (top < 0 || left < 0 || ch <= 0 || cw <= 0 || top + ch > g.H || left + cw > g.W)
    throw std::invalid_argument("normalize_crop_flip: crop outside the source");
  g.h = affine[0], g.w = affine[1];
  g.oy = affine[2] + top, g.yi = affine[3], g.yj = affine[4];
  g.ox = affine[5] + left, g.xi = affine[6], g.xj = affine[7];
  auto out = py::array_t<float>({g.T, g.C, g.h, g.w});
  auto valid = py::array_t<bool>({g.T, g.h, g.w});
  const S nd = has_nodata ? static_cast<S>(nodata) : S(0);
  const S* sp = src.data();
  const float* mp = mean.data();
  const float* dp = stdv.data();
  float* op = out.mutable_data();
  bool* vp = valid.mutable_data();
#ifdef _OPENMP
  if (threads <= 0) threads = (g.T * g.C * g.h * g.w < kParallelGrain) ? 1 : omp_get_max_threads();
#else
  threads = 1;
#endif
  {
    py::gil_scoped_release release;
    run<S>(sp, mp, dp, has_nodata, nd, g, op, vp, threads);
  }
  return py::make_tuple(out, valid);
}

}  // namespace

void register_normalize_crop_flip(py::module_& m) {
  m.def(
      "normalize_crop_flip",
      [](py::array src, py::array_t<float, py::array::c_style> mean,
         py::array_t<float, py::array::c_style> stdv, const std::string& layout,
         std::vector<int64_t> crop, std::vector<int64_t> affine, bool has_nodata, double nodata,
         int threads) -> py::tuple {
        const auto dt = src.dtype();
        if (dt.is(py::dtype::of<uint16_t>()))
          return dispatch<uint16_t>(src, mean, stdv, layout, crop, affine, has_nodata, nodata, threads);
        if (dt.is(py::dtype::of<int16_t>()))
          return dispatch<int16_t>(src, mean, stdv, layout, crop, affine, has_nodata, nodata, threads);
        if (dt.is(py::dtype::of<uint8_t>()))
          return dispatch<uint8_t>(src, mean, stdv, layout, crop, affine, has_nodata, nodata, threads);
        if (dt.is(py::dtype::of<float>()))
          return dispatch<float>(src, mean, stdv, layout, crop, affine, has_nodata, nodata, threads);
        throw std::invalid_argument("normalize_crop_flip: source dtype " +
                                    std::string(py::str(dt)) +
                                    " not supported (uint8, int16, uint16, float32)");
      },
      py::arg("src"), py::arg("mean"), py::arg("std"), py::arg("layout"), py::arg("crop"),
      py::arg("affine"), py::arg("has_nodata"), py::arg("nodata"), py::arg("threads") = 0,
      "Band stack -> normalised float32 (T, C, h, w) + bool valid (T, h, w) in one pass. "
      "crop = (top, left, height, width); affine = (h, w, oy, yi, yj, ox, xi, xj) maps output "
      "(i, j) to cropped-source (oy + yi i + yj j, ox + xi i + xj j). threads: 0 = one for small tiles, else "
      "OpenMP's maximum.");
}
