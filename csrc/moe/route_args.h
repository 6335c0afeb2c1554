// The argument checks of moe_route that the C++ and the CUDA kernels share: host code only, no
// ISA or CUDA types, so that both translation units (g++ and nvcc) include it and every backend
// refuses the same arguments with the same message.
#pragma once

#include <cstdint>
#include <string>

#include "common/status.h"

namespace pyops {
namespace moe_args {

// score: 0 softmax, 1 sigmoid; capacity: -1 none; n_group / topk_group: 0 / 0 without groups.
inline Status check_route(int64_t T, int64_t E, int64_t k, int score, int64_t capacity, int64_t n_group,
                          int64_t topk_group, float routed_scaling) {
  if (T < 0) return Status::invalid("T: expected >= 0, got " + std::to_string(T));
  if (E < 1) return Status::invalid("E: expected >= 1 experts, got " + std::to_string(E));
  if (E > INT32_MAX) return Status::invalid("E: expected < 2^31 experts, got " + std::to_string(E));
  if (k < 1 || k > E)
    return Status::invalid("k: expected 1 <= k <= E = " + std::to_string(E) + ", got " + std::to_string(k));
  if (score != 0 && score != 1)
    return Status::invalid("score: expected 0 (softmax) or 1 (sigmoid), got " + std::to_string(score));
  if (capacity < -1)
    return Status::invalid("capacity: expected -1 (none) or >= 0, got " + std::to_string(capacity));
  if (n_group < 0 || n_group > E || (n_group > 0 && E % n_group != 0))
    return Status::invalid("n_group: expected 0 (none) or a divisor of E = " + std::to_string(E) +
                           ", got " + std::to_string(n_group));
  if (n_group == 0 ? topk_group != 0 : (topk_group < 1 || topk_group > n_group))
    return Status::invalid("topk_group: expected " +
                           (n_group == 0 ? std::string("0 without groups")
                                         : "1 <= topk_group <= n_group = " + std::to_string(n_group)) +
                           ", got " + std::to_string(topk_group));
  if (n_group > 0 && k > topk_group * (E / n_group))
    return Status::invalid("k: expected k <= topk_group * E / n_group = " +
                           std::to_string(topk_group * (E / n_group)) + " (the kept experts), got " +
                           std::to_string(k));
  // NaN fails the first comparison, +inf the second
  if (!(routed_scaling > 0.0f) || !(routed_scaling <= 3.4028234663852886e38f))
    return Status::invalid("routed_scaling: expected a finite number > 0, got " +
                           std::to_string(routed_scaling));
  return Status::ok();
}

}  // namespace moe_args
}  // namespace pyops
