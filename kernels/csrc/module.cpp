// Entry point of the skysense.kernels._C extension: the C++ CPU kernels register here.
#include <pybind11/pybind11.h>

#include "normalize_crop_flip.h"
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

static py::dict build_info() {
  py::dict d;
#ifdef _OPENMP
  d["openmp"] = true;
  d["max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["max_threads"] = 1;
#endif
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "SkySense C++ CPU kernels";
  m.def("build_info", &build_info, "Compile-time facts of the extension (OpenMP, threads).");
  register_normalize_crop_flip(m);
}
