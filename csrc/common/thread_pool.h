// A small persistent thread pool for the CPU kernels.
//
// Why not OpenMP: torch wheels ship their own OpenMP runtime, and a second one in the same
// process oversubscribes cores and can deadlock after fork. This pool is ~100 lines, has no
// runtime to clash with, lets the caller pass torch.get_num_threads() on every call, and
// survives fork (the child starts a fresh pool).
//
// Work is split into items by the caller; which thread runs an item never changes what the item
// computes, so every kernel is deterministic whatever the thread count.
#pragma once
#include <cstdint>
#include <functional>

namespace pyops {

// Runs fn(item) for item in [0, n_items) on up to n_threads threads (the caller included).
// Items are claimed dynamically. fn must not throw. If the pool is busy (another Python thread
// is inside a kernel), the call runs on the calling thread alone rather than waiting.
void parallel_for(int64_t n_items, int n_threads, const std::function<void(int64_t)>& fn);

// Number of hardware threads (>= 1).
int hardware_threads();

}  // namespace pyops
