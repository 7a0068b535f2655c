// Multi-source reduction for the shared-memory collectives; see reduce.h.
#include "cpu/reduce.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstring>

#include "common.h"

namespace pyparallel {
namespace cpu {
namespace {

constexpr int64_t kBlock = 1024;  // elements: the fp32 accumulator of one block stays in L1

template <class T>
inline float widen(T v) { return static_cast<float>(v); }

// Block by block: acc = src0; acc += src1; ... ; then one rounding per element. The inner loops have
// no dependence across i, so they vectorize; the order over sources is the same for every element.
// 2-4 sources (the usual local ranks): one pass that reads every source at once, so the hardware
// prefetchers follow all the streams together; the block loop below reads one source's 4 KiB at a time,
// a page each, and restarts every prefetch stream at each page. Same additions in the same order.
template <class T, int kSources>
PYPARALLEL_VECTORIZE void reduce_fused(const T* const* srcs, T* dst, T* dst2, int64_t n, float divisor) {
  const T* s0 = srcs[0];
  const T* s1 = srcs[1];
  const T* s2 = kSources > 2 ? srcs[2] : nullptr;
  const T* s3 = kSources > 3 ? srcs[3] : nullptr;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    T* d = dst + b;
    for (int64_t i = b; i < b + m; ++i) {
      float acc = widen(s0[i]) + widen(s1[i]);
      if constexpr (kSources > 2) acc += widen(s2[i]);
      if constexpr (kSources > 3) acc += widen(s3[i]);
      if (divisor != 1.0f) acc = acc / divisor;
      d[i - b] = static_cast<T>(acc);
    }
    if (dst2 != nullptr) std::memcpy(dst2 + b, d, m * sizeof(T));
  }
}

template <class T>
PYPARALLEL_VECTORIZE void reduce_typed(const T* const* srcs, int nsrc, T* dst, T* dst2, int64_t n, float divisor) {
  if (nsrc == 2) return reduce_fused<T, 2>(srcs, dst, dst2, n, divisor);
  if (nsrc == 3) return reduce_fused<T, 3>(srcs, dst, dst2, n, divisor);
  if (nsrc == 4) return reduce_fused<T, 4>(srcs, dst, dst2, n, divisor);
  float acc[kBlock];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    const T* s0 = srcs[0] + b;
    for (int64_t i = 0; i < m; ++i) acc[i] = widen(s0[i]);
    for (int q = 1; q < nsrc; ++q) {
      const T* s = srcs[q] + b;
      for (int64_t i = 0; i < m; ++i) acc[i] += widen(s[i]);
    }
    if (divisor != 1.0f) {
      for (int64_t i = 0; i < m; ++i) acc[i] = acc[i] / divisor;
    }
    T* d = dst + b;
    for (int64_t i = 0; i < m; ++i) d[i] = static_cast<T>(acc[i]);
    if (dst2 != nullptr) std::memcpy(dst2 + b, d, m * sizeof(T));
  }
}

}  // namespace

void reduce_sources(c10::ScalarType dtype, const void* const* srcs, int nsrc, void* dst, void* dst2, int64_t n,
                    float divisor) {
  TORCH_INTERNAL_ASSERT(nsrc >= 1);
  switch (dtype) {
    case c10::kFloat:
      return reduce_typed(reinterpret_cast<const float* const*>(srcs), nsrc, static_cast<float*>(dst),
                          static_cast<float*>(dst2), n, divisor);
    case c10::kHalf:
      return reduce_typed(reinterpret_cast<const c10::Half* const*>(srcs), nsrc, static_cast<c10::Half*>(dst),
                          static_cast<c10::Half*>(dst2), n, divisor);
    case c10::kBFloat16:
      return reduce_typed(reinterpret_cast<const c10::BFloat16* const*>(srcs), nsrc,
                          static_cast<c10::BFloat16*>(dst), static_cast<c10::BFloat16*>(dst2), n, divisor);
    default:
      TORCH_CHECK(false, "reduce_sources: unsupported dtype ", dtype);
  }
}

}  // namespace cpu
}  // namespace pyparallel
