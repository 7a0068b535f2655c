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


namespace pyparallel {
namespace {

constexpr int64_t kTopkChunk = 1 << 18;  // 256K elements: enough chunks for the threads
constexpr int64_t kKeyBlock = 2048;      // keys are materialized this many at a time
constexpr int64_t kSampleTarget = 1 << 16;
constexpr int32_t kMaxKey = 0x7fffffff;

template <typename T>
inline int32_t magnitude_key(T v) {
  const float f = static_cast<float>(v);
  int32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u & kMaxKey;  // |f|'s bits: integer order is magnitude order, NaN above Inf
}

// fp32 keys of v[0, n), with r = r + x first when kAdd (then v is r).
template <bool kAdd>
PYPARALLEL_VECTORIZE void float_keys(float* r, const float* x, int64_t n, int32_t* keys) {
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i];
    if constexpr (kAdd) {
      v = r[i] + v;
      r[i] = v;
    }
    int32_t u;
    std::memcpy(&u, &v, sizeof(u));
    keys[i] = u & kMaxKey;
  }
}

// Keys of y[lo, lo + n) into keys (n <= kKeyBlock); with update_residual, first r = r + x (= y).
template <typename T>
void chunk_keys(const T* x, T* r, int64_t lo, int64_t n, int32_t* keys, bool update_residual) {
  if constexpr (std::is_same_v<T, float>) {
    if (update_residual) {
      float_keys<true>(r + lo, x + lo, n, keys);
    } else {
      float_keys<false>(nullptr, (r != nullptr ? r : x) + lo, n, keys);
    }
  } else {
    const T* y = r != nullptr ? r : x;
    for (int64_t i = 0; i < n; ++i) {
      if (update_residual) r[lo + i] = r[lo + i] + x[lo + i];
      keys[i] = magnitude_key(y[lo + i]);
    }
  }
}

struct ChunkState {
  std::vector<int64_t> above;       // indices with key > hi (all selected), ascending
  std::vector<int64_t> candidates;  // indices with lo <= key <= hi, ascending
  int64_t ties = 0;                 // candidates taken with key == T
  int64_t offset = 0;               // first output slot
};

// Bracket [lo, hi] for the k-th largest key from a sample of y = (r +) x; margins of about four
// standard deviations of the sample rank make a miss rare (and a miss only costs time).
template <typename T>
std::pair<int32_t, int32_t> sample_bracket(const T* x, const T* r, int64_t n, int64_t k) {
  const int64_t stride = std::max<int64_t>(1, n / kSampleTarget);
  std::vector<int32_t> sample;
  sample.reserve(n / stride + 1);
  // One element at a pseudo-random place in every window of `stride`: a fixed stride would alias with the
  // row length of a gradient matrix and see a few columns only (dead units zero whole rows and columns).
  uint64_t state = 0x9E3779B97F4A7C15ull;
  for (int64_t w = 0; w + stride <= n; w += stride) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    const int64_t i = w + static_cast<int64_t>(state % static_cast<uint64_t>(stride));
    sample.push_back(magnitude_key(r != nullptr ? T(r[i] + x[i]) : x[i]));
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
  // Runs body(chunk, first index, keys of y[first, first + len), len) over all of y, in parallel.
  auto for_keys = [&](bool update_residual, auto&& body) {
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      int32_t keys[kKeyBlock];
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t end = std::min(n, (c + 1) * kTopkChunk);
        for (int64_t i0 = c * kTopkChunk; i0 < end; i0 += kKeyBlock) {
          const int64_t len = std::min(kKeyBlock, end - i0);
          chunk_keys(x, r, i0, len, keys, update_residual);
          body(chunks[c], i0, keys, len);
        }
      }
    });
  };
  auto collect = [&](int32_t lo, int32_t hi) {
    return [lo, hi](ChunkState& s, int64_t i0, const int32_t* keys, int64_t len) {
      for (int64_t i = 0; i < len; ++i) {
        if (keys[i] < lo) continue;
        (keys[i] > hi ? s.above : s.candidates).push_back(i0 + i);
      }
    };
  };
  if (k == 0) {
    if (r != nullptr) for_keys(true, [](ChunkState&, int64_t, const int32_t*, int64_t) {});
    return;
  }

  auto [lo, hi] = sample_bracket(x, r, n, k);
  for_keys(r != nullptr, collect(lo, hi));
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
    for_keys(false, collect(0, kMaxKey));
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
}  // namespace pyparallel

TORCH_LIBRARY_IMPL(pyparallel, CPU, m) {
  m.impl("topk_compress", &pyparallel::topk_compress_cpu);
  m.impl("scatter_add_", &pyparallel::scatter_add_cpu);
}
