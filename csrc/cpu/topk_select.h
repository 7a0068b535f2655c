// Pieces of the CPU exact top-k (csrc/cpu/topk.cpp) that the streamed top-k (topk_stream.cpp) reuses.
// No kernels are launched from here: plain functions on host pointers.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

namespace pyparallel {
namespace cpu {

constexpr int32_t kMaxKey = 0x7fffffff;

// |f|'s bits as an integer: integer order is magnitude order, NaN above Inf (Note [Exact top-k selection]).
inline int32_t magnitude_key(float f) {
  int32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u & kMaxKey;
}

// Bracket [lo, hi] that very likely holds the k-th largest key of y = x (+ r), from a sample of y.
std::pair<int32_t, int32_t> topk_bracket(const float* x, const float* r, int64_t n, int64_t k);

// topk_compress on host memory, fp32 with int32 indices: values/indices in ascending index order; with
// r, y = r + x is written into r and the selected entries are zeroed there.
void topk_select(const float* x, float* r, int64_t n, int64_t k, float* values, int32_t* indices);

bool cpu_has_avx2();

}  // namespace cpu
}  // namespace pyparallel
