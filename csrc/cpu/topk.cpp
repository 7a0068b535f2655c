// Exact top-k by magnitude with error feedback, and the scatter-add that decodes it, on the CPU.
//
// Note [Exact top-k selection]
// The key of an element is the bit pattern of |float(y)| read as an unsigned integer. For non-negative
// floats the bit order is the numeric order, and NaN (all-ones exponent, non-zero mantissa) sorts above
// +Inf, so a NaN is always selected and reaches the receiver. With T the k-th largest key, the selected
// set is every element with key > T plus the first (k - #{key > T}) elements with key == T in index
// order; values and indices come out in ascending index order. The selection is therefore a function of
// the input alone (no dependence on threads or devices), equal to torch.topk's set up to ties.
//
// With a residual r (error feedback), y = r + x is first written into r; the selected entries are then
// zeroed in r and returned as values, so r_new + scatter(values, indices) == r_old + x exactly.
//
// CPU algorithm, in fixed chunks (the result does not depend on how they are split):
//   0. keys of a sample of y (one element per window) give a bracket [lo, hi] that very likely holds T;
//   1. one pass: (y = r + x written to r,) keys, and every index with key > hi is selected and every
//      index inside the bracket is a candidate. The list sizes then tell whether the bracket held T
//      (#{> hi} < k <= #{>= lo}); if not, a second pass collects every index as a candidate: slower,
//      still exact;
//   2. nth_element on the candidates' keys gives T and the ties to take; each chunk then merges its two
//      index-ordered lists into its slice of the output (offsets are prefix sums of per-chunk counts).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "cpu/topk_select.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#include <immintrin.h>
#define PYPARALLEL_HAVE_AVX2_SCAN 1
#endif


namespace pyparallel {
namespace {

constexpr int64_t kTopkChunk = 1 << 18;  // 256K elements: enough chunks for the threads
constexpr int64_t kSampleTarget = 1 << 16;
using cpu::kMaxKey;

template <typename T>
inline int32_t magnitude_key(T v) {
  return cpu::magnitude_key(static_cast<float>(v));  // fp16/bf16 widen exactly
}

struct ChunkState {
  std::vector<int64_t> above;       // indices with key > hi (all selected), ascending
  std::vector<int64_t> candidates;  // indices with lo <= key <= hi, ascending
  int64_t ties = 0;                 // candidates taken with key == T
  int64_t offset = 0;               // first output slot
};

inline void classify(ChunkState& s, int64_t i, int32_t key, int32_t hi) {
  (key > hi ? s.above : s.candidates).push_back(i);
}

// One pass over y[begin, end): with update_residual first r = r + x (then y is r), and every index
// whose key is >= lo goes to s (classify). Portable version, any dtype.
template <typename T>
void scan_scalar(const T* x, T* r, int64_t begin, int64_t end, int32_t lo, int32_t hi, bool update_residual,
                 ChunkState& s) {
  const T* y = r != nullptr ? r : x;
  for (int64_t i = begin; i < end; ++i) {
    if (update_residual) r[i] = r[i] + x[i];
    const int32_t key = magnitude_key(y[i]);
    if (key >= lo) classify(s, i, key, hi);
  }
}

#ifdef PYPARALLEL_HAVE_AVX2_SCAN

// The fp32 pass with AVX2: 8 keys per compare, and a movemask so the ~99% of lanes below lo cost no
// branch. The pass is then bound by memory bandwidth (the scalar loop was ~4x slower). Same results
// as scan_scalar: same additions (r + x, one rounding), same keys, indices pushed in ascending order.
template <bool kAdd>
__attribute__((target("avx2"))) void scan_float_avx2(const float* x, float* r, int64_t begin, int64_t end,
                                                     int32_t lo, int32_t hi, ChunkState& s) {
  const float* y = kAdd ? r : (r != nullptr ? r : x);
  const __m256i abs_mask = _mm256_set1_epi32(kMaxKey);
  const __m256i below = _mm256_set1_epi32(lo - 1);  // keys are >= 0 and lo >= 0, so lo - 1 cannot wrap
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    __m256 v = _mm256_loadu_ps(y + i);
    if constexpr (kAdd) {
      v = _mm256_add_ps(v, _mm256_loadu_ps(x + i));
      _mm256_storeu_ps(r + i, v);
    }
    const __m256i key = _mm256_and_si256(_mm256_castps_si256(v), abs_mask);
    unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, below))));
    while (m != 0) {
      const int b = __builtin_ctz(m);
      m &= m - 1;
      classify(s, i + b, magnitude_key(y[i + b]), hi);
    }
  }
  scan_scalar<float>(x, kAdd ? r : const_cast<float*>(y), i, end, lo, hi, kAdd, s);
}

#endif

template <typename T>
void scan(const T* x, T* r, int64_t begin, int64_t end, int32_t lo, int32_t hi, bool update_residual,
          ChunkState& s) {
#ifdef PYPARALLEL_HAVE_AVX2_SCAN
  if constexpr (std::is_same_v<T, float>) {
    if (cpu::cpu_has_avx2()) {
      if (update_residual) {
        scan_float_avx2<true>(x, r, begin, end, lo, hi, s);
      } else {
        scan_float_avx2<false>(x, r, begin, end, lo, hi, s);
      }
      return;
    }
  }
#endif
  scan_scalar(x, r, begin, end, lo, hi, update_residual, s);
}


// Bracket [lo, hi] for the k-th largest key from a sample of y = (r +) x; margins of about four
// standard deviations of the sample rank make a miss rare (and a miss only costs time).
template <typename T>
std::pair<int32_t, int32_t> sample_bracket(const T* x, const T* r, int64_t n, int64_t k) {
  const int64_t stride = std::max<int64_t>(1, n / kSampleTarget);
  // One element at a pseudo-random place in every window of `stride`: a fixed stride would alias with the
  // row length of a gradient matrix and see a few columns only (dead units zero whole rows and columns).
  std::vector<int64_t> where;
  where.reserve(n / stride + 1);
  uint64_t state = 0x9E3779B97F4A7C15ull;
  for (int64_t w = 0; w + stride <= n; w += stride) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    where.push_back(w + static_cast<int64_t>(state % static_cast<uint64_t>(stride)));
  }
  // Every read misses the cache: prefetching a few dozen ahead overlaps the misses (3-4x faster).
  constexpr size_t kAhead = 32;
  std::vector<int32_t> sample(where.size());
  for (size_t s = 0; s < where.size(); ++s) {
    if (s + kAhead < where.size()) {
      __builtin_prefetch(x + where[s + kAhead]);
      if (r != nullptr) __builtin_prefetch(r + where[s + kAhead]);
    }
    const int64_t i = where[s];
    sample[s] = magnitude_key(r != nullptr ? T(r[i] + x[i]) : x[i]);
  }
  const int64_t m = static_cast<int64_t>(sample.size());
  const double expect = static_cast<double>(k) * m / n;  // rank of T within the sample
  const int64_t margin = static_cast<int64_t>(4.0 * std::sqrt(expect) + 8);
  const int64_t r_hi = static_cast<int64_t>(expect) - margin, r_lo = static_cast<int64_t>(expect) + margin;
  auto kth_largest = [&](int64_t rank) {  // 1-based
    std::nth_element(sample.begin(), sample.begin() + (rank - 1), sample.end(), std::greater<int32_t>());
    return sample[rank - 1];
  };
  const int32_t hi = r_hi >= 1 ? kth_largest(r_hi) : kMaxKey;
  const int32_t lo = r_lo <= m ? kth_largest(r_lo) : 0;
  return {lo, hi};
}

template <typename T, typename I>
void topk_select(const T* x, T* r, int64_t n, int64_t k, T* values, I* indices) {
  const T* y = r != nullptr ? r : x;  // y lives in r when error feedback is on
  const int64_t nchunks = ceil_div(n, kTopkChunk);
  std::vector<ChunkState> chunks(nchunks);
  // One pass over all of y in chunks, in parallel (see scan).
  auto scan_all = [&](int32_t lo, int32_t hi, bool update_residual) {
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        scan(x, r, c * kTopkChunk, std::min(n, (c + 1) * kTopkChunk), lo, hi, update_residual, chunks[c]);
      }
    });
  };
  if (k == 0) {
    if (r != nullptr) scan_all(kMaxKey, kMaxKey, true);  // only r = r + x; the lists are not used
    return;
  }

  auto [lo, hi] = sample_bracket(x, r, n, k);
  scan_all(lo, hi, r != nullptr);
  int64_t above = 0, at_least_lo = 0;
  for (const auto& s : chunks) {
    above += static_cast<int64_t>(s.above.size());
    at_least_lo += static_cast<int64_t>(s.above.size() + s.candidates.size());
  }
  if (above >= k || at_least_lo < k) {  // the sample misled us: every key becomes a candidate
    for (auto& s : chunks) {
      s.above.clear();
      s.candidates.clear();
    }
    above = 0;
    scan_all(0, kMaxKey, false);
  }

  // T: the (k - above)-th largest key among the candidates.
  std::vector<int32_t> cand_keys;
  for (const auto& s : chunks)
    for (int64_t i : s.candidates) cand_keys.push_back(magnitude_key(y[i]));
  const int64_t rank = k - above;
  std::nth_element(cand_keys.begin(), cand_keys.begin() + (rank - 1), cand_keys.end(), std::greater<int32_t>());
  const int32_t threshold = cand_keys[rank - 1];
  int64_t gt = 0;
  for (int32_t key : cand_keys) gt += key > threshold;
  int64_t ties_left = rank - gt;
  int64_t offset = 0;
  for (auto& s : chunks) {
    int64_t eq = 0, take = 0;
    for (int64_t i : s.candidates) {
      const int32_t key = magnitude_key(y[i]);
      take += key > threshold;
      eq += key == threshold;
    }
    s.ties = std::min(eq, ties_left);
    ties_left -= s.ties;
    s.offset = offset;
    offset += static_cast<int64_t>(s.above.size()) + take + s.ties;
  }
  TORCH_INTERNAL_ASSERT(ties_left == 0 && offset == k, "topk_compress: selection count mismatch");

  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const ChunkState& s = chunks[c];
      int64_t pos = s.offset, ties = s.ties;
      auto emit = [&](int64_t i) {
        values[pos] = y[i];
        indices[pos] = static_cast<I>(i);
        ++pos;
      };
      size_t a = 0;
      for (int64_t i : s.candidates) {
        const int32_t key = magnitude_key(y[i]);
        if (key < threshold || (key == threshold && ties == 0)) continue;
        ties -= key == threshold;
        for (; a < s.above.size() && s.above[a] < i; ++a) emit(s.above[a]);
        emit(i);
      }
      for (; a < s.above.size(); ++a) emit(s.above[a]);
      if (r != nullptr) {
        for (int64_t p = s.offset; p < pos; ++p) r[static_cast<int64_t>(indices[p])] = T(0);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> topk_compress_cpu(const at::Tensor& x_in, int64_t k,
                                                     const std::optional<at::Tensor>& residual,
                                                     std::optional<at::ScalarType> index_dtype) {
  const char* op = "topk_compress";
  const at::ScalarType itype = index_dtype_or_default(index_dtype, op);
  check_topk_args(x_in, k, residual, itype, op);
  const at::Tensor x = x_in.contiguous();
  at::Tensor values = at::empty({k}, x.options());
  at::Tensor indices = at::empty({k}, x.options().dtype(itype));
  PYPARALLEL_DISPATCH_FLOATING(x.scalar_type(), [&] {
    scalar_t* r = residual.has_value() ? residual->mutable_data_ptr<scalar_t>() : nullptr;
    if (itype == at::kLong) {
      topk_select<scalar_t, int64_t>(x.const_data_ptr<scalar_t>(), r, x.numel(), k,
                                     values.mutable_data_ptr<scalar_t>(), indices.mutable_data_ptr<int64_t>());
    } else {
      topk_select<scalar_t, int32_t>(x.const_data_ptr<scalar_t>(), r, x.numel(), k,
                                     values.mutable_data_ptr<scalar_t>(), indices.mutable_data_ptr<int32_t>());
    }
  });
  return {values, indices};
}

// Sequential on purpose: duplicate indices then add in order, so the result is deterministic; the
// decoded payload is small (k elements), so one thread keeps up. Indices are all checked before the
// first write, so a bad index leaves out untouched.
template <typename T, typename I>
void scatter_add_loop(T* out, int64_t n, const I* idx, const T* vals, int64_t count) {
  for (int64_t j = 0; j < count; ++j) {
    const int64_t i = static_cast<int64_t>(idx[j]);
    TORCH_CHECK(i >= 0 && i < n, "scatter_add_: index ", i, " at position ", j, " is out of range for out with ",
                n, " elements");
  }
  for (int64_t j = 0; j < count; ++j) out[idx[j]] = out[idx[j]] + vals[j];
}

void scatter_add_cpu(at::Tensor& out, const at::Tensor& indices_in, const at::Tensor& values_in) {
  const char* op = "scatter_add_";
  check_scatter_args(out, indices_in, values_in, op);
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  PYPARALLEL_DISPATCH_FLOATING(out.scalar_type(), [&] {
    if (indices.scalar_type() == at::kLong) {
      scatter_add_loop(out.mutable_data_ptr<scalar_t>(), out.numel(), indices.const_data_ptr<int64_t>(),
                       values.const_data_ptr<scalar_t>(), values.numel());
    } else {
      scatter_add_loop(out.mutable_data_ptr<scalar_t>(), out.numel(), indices.const_data_ptr<int32_t>(),
                       values.const_data_ptr<scalar_t>(), values.numel());
    }
  });
}

}  // namespace

namespace cpu {

bool cpu_has_avx2() {
#ifdef PYPARALLEL_HAVE_AVX2_SCAN
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

std::pair<int32_t, int32_t> topk_bracket(const float* x, const float* r, int64_t n, int64_t k) {
  return sample_bracket(x, r, n, k);
}

void topk_select(const float* x, float* r, int64_t n, int64_t k, float* values, int32_t* indices) {
  pyparallel::topk_select<float, int32_t>(x, r, n, k, values, indices);
}

}  // namespace cpu
}  // namespace pyparallel

TORCH_LIBRARY_IMPL(pyparallel, CPU, m) {
  m.impl("topk_compress", &pyparallel::topk_compress_cpu);
  m.impl("scatter_add_", &pyparallel::scatter_add_cpu);
}
