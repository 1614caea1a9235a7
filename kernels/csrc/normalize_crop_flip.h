// Registration of the one-pass band-stack normalisation kernel (normalize_crop_flip.cpp).
#pragma once
#include <pybind11/pybind11.h>

void register_normalize_crop_flip(pybind11::module_& m);
