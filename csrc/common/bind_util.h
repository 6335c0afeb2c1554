// Helpers shared by the pybind11 binding files (csrc/<stem>/bind.cpp, csrc/<stem>/bind_cuda.cpp).
// Bindings are thin: integers become pointers, dtype codes are checked, the GIL is released
// around the kernel and a Status becomes ValueError (bad argument / index) or RuntimeError.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"

namespace pyops {
namespace bind {

inline DType to_dtype(int code, const char* what) {
  if (!valid_dtype(code))
    throw pybind11::value_error(std::string(what) + ": unknown dtype code " + std::to_string(code) +
                                " (expected 0 float32, 1 float16, 2 bfloat16)");
  return static_cast<DType>(code);
}

inline void raise_if_error(const Status& st) {
  if (st.is_ok()) return;
  if (st.code == StatusCode::kInvalidArgument || st.code == StatusCode::kOutOfRange)
    throw pybind11::value_error(st.message);
  throw std::runtime_error(st.message);
}

template <typename P>
P ptr(uintptr_t v) {
  return reinterpret_cast<P>(v);
}

template <typename P>
std::vector<P> as_pointers(const std::vector<uintptr_t>& v) {
  std::vector<P> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = reinterpret_cast<P>(v[i]);
  return out;
}

// Runs fn() (returning a Status) without the GIL, then raises on error.
template <typename Fn>
void run_released(Fn&& fn) {
  Status st;
  {
    pybind11::gil_scoped_release release;
    st = fn();
  }
  raise_if_error(st);
}

}  // namespace bind
}  // namespace pyops
