// Error reporting for the torch-free native core: kernels never throw across the binding
// boundary and never abort; they return a Status that the bindings turn into a Python error.
#pragma once
#include <string>

namespace pyops {

enum class StatusCode : int { kOk = 0, kInvalidArgument = 1, kOutOfRange = 2, kInternal = 3 };

struct Status {
  StatusCode code = StatusCode::kOk;
  std::string message;

  static Status ok() { return {}; }
  static Status invalid(std::string msg) { return {StatusCode::kInvalidArgument, std::move(msg)}; }
  static Status out_of_range(std::string msg) { return {StatusCode::kOutOfRange, std::move(msg)}; }
  bool is_ok() const { return code == StatusCode::kOk; }
};

}  // namespace pyops
