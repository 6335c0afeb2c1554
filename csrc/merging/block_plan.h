// How a flattened tensor cut into blocks is split into work items for the thread pool.
//
// Large blocks are split into several items (partial sums combined afterwards, in order); small
// blocks are grouped so that each block lies inside exactly one item. The split depends only on
// (numel, block_size), never on the thread count, so per-item partial results, and therefore
// every reduction, are bit-identical whatever the number of threads.
#pragma once
#include <algorithm>
#include <cstdint>

#include "common/isa.h"

namespace pyops {
inline namespace PYOPS_PER_ISA_NS {

// Elements per work item.
constexpr int64_t kChunk = int64_t(1) << 16;

struct Plan {
  int64_t numel, block_size, n_blocks;
  bool large;
  int64_t items_per_block;  // large blocks
  int64_t blocks_per_item;  // small blocks
  int64_t n_items;

  // A block larger than the tensor is the whole tensor: clamping keeps n_items (and the
  // arithmetic below) bounded whatever block_size the caller passes.
  Plan() : Plan(0, 1) {}
  Plan(int64_t numel_, int64_t bs) : numel(numel_), block_size(std::max<int64_t>(1, std::min(bs, numel_))) {
    n_blocks = numel == 0 ? 0 : (numel + block_size - 1) / block_size;
    large = block_size >= kChunk;
    items_per_block = large ? (block_size + kChunk - 1) / kChunk : 1;
    blocks_per_item = large ? 1 : std::max<int64_t>(1, kChunk / block_size);
    n_items = large ? n_blocks * items_per_block : (n_blocks + blocks_per_item - 1) / blocks_per_item;
  }

  // Calls seg(block, lo, hi) for each block segment of item k.
  template <class F>
  void for_segments(int64_t k, F&& seg) const {
    if (large) {
      const int64_t b = k / items_per_block, c = k % items_per_block;
      const int64_t lo = b * block_size + c * kChunk;
      const int64_t hi = std::min({lo + kChunk, (b + 1) * block_size, numel});
      if (lo < hi) seg(b, lo, hi);
    } else {
      const int64_t b1 = std::min(n_blocks, (k + 1) * blocks_per_item);
      for (int64_t b = k * blocks_per_item; b < b1; ++b)
        seg(b, b * block_size, std::min((b + 1) * block_size, numel));
    }
  }
};

}  // inline namespace PYOPS_PER_ISA_NS
}  // namespace pyops
