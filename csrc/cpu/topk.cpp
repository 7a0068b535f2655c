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
// CPU algorithm, three passes over the data in fixed chunks:
//   1. (y = r + x,) histogram of key >> 20 per chunk;      -> the coarse bin B holding the k-th key
//   2. collect the indices whose coarse bin is B;            -> nth_element on their keys gives T
//   3. per-chunk counts give each chunk's output offset and its share of the ties; write the outputs.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "common.h"

namespace pyparallel {
namespace {

constexpr int kCoarseShift = 20;                         // bits 30..20 of the key (bit 31 is always 0)
constexpr int kCoarseBins = 1 << (31 - kCoarseShift);    // 2048
constexpr int64_t kTopkChunk = 1 << 18;  // 256K elements: enough chunks for the threads, few histograms

template <typename T>
inline uint32_t magnitude_key(T v) {
  const float f = static_cast<float>(v);
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u & 0x7fffffffu;
}

struct ChunkState {
  int64_t coarse_gt = 0;            // keys in bins above B
  std::vector<int64_t> candidates;  // indices whose key is in bin B, ascending
  int64_t gt = 0;                   // keys > T
  int64_t eq = 0;                   // keys == T
  int64_t take_eq = 0;              // ties this chunk contributes
  int64_t offset = 0;               // first output slot
};

template <typename T, typename I>
void topk_select(const T* x, T* r, int64_t n, int64_t k, T* values, I* indices) {
  // y lives in r when error feedback is on; otherwise y is x itself.
  const T* y = r != nullptr ? r : x;
  const int64_t nchunks = ceil_div(n, kTopkChunk);
  std::vector<ChunkState> chunks(nchunks);
  std::vector<std::array<uint32_t, kCoarseBins>> hists(nchunks);

  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      auto& h = hists[c];
      h.fill(0);
      const int64_t lo = c * kTopkChunk, hi = std::min(n, lo + kTopkChunk);
      if (r != nullptr) {
        for (int64_t i = lo; i < hi; ++i) {
          const T v = r[i] + x[i];
          r[i] = v;
          ++h[magnitude_key(v) >> kCoarseShift];
        }
      } else {
        for (int64_t i = lo; i < hi; ++i) ++h[magnitude_key(y[i]) >> kCoarseShift];
      }
    }
  });
  if (k == 0) return;

  std::array<int64_t, kCoarseBins> hist{};
  for (const auto& h : hists)
    for (int b = 0; b < kCoarseBins; ++b) hist[b] += h[b];
  int bin = kCoarseBins - 1;
  int64_t above = 0;  // keys in bins > bin
  while (above + hist[bin] < k) above += hist[bin--];
  const int64_t rank_in_bin = k - above;  // 1-based rank of T among the keys in `bin`

  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      ChunkState& s = chunks[c];
      const int64_t lo = c * kTopkChunk, hi = std::min(n, lo + kTopkChunk);
      for (int64_t i = lo; i < hi; ++i) {
        const int b = static_cast<int>(magnitude_key(y[i]) >> kCoarseShift);
        s.coarse_gt += b > bin;
        if (b == bin) s.candidates.push_back(i);
      }
    }
  });
  std::vector<uint32_t> keys;
  keys.reserve(hist[bin]);
  for (const auto& s : chunks)
    for (int64_t i : s.candidates) keys.push_back(magnitude_key(y[i]));
  std::nth_element(keys.begin(), keys.begin() + (rank_in_bin - 1), keys.end(), std::greater<uint32_t>());
  const uint32_t threshold = keys[rank_in_bin - 1];

  int64_t total_gt = 0;
  for (auto& s : chunks) {
    s.gt = s.coarse_gt;
    for (int64_t i : s.candidates) {
      const uint32_t key = magnitude_key(y[i]);
      s.gt += key > threshold;
      s.eq += key == threshold;
    }
    total_gt += s.gt;
  }
  int64_t ties_left = k - total_gt;
  int64_t offset = 0;
  for (auto& s : chunks) {
    s.take_eq = std::min(s.eq, ties_left);
    ties_left -= s.take_eq;
    s.offset = offset;
    offset += s.gt + s.take_eq;
  }
  TORCH_INTERNAL_ASSERT(ties_left == 0 && offset == k, "topk_compress: selection count mismatch");

  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const ChunkState& s = chunks[c];
      int64_t pos = s.offset, ties = s.take_eq;
      const int64_t lo = c * kTopkChunk, hi = std::min(n, lo + kTopkChunk);
      for (int64_t i = lo; i < hi; ++i) {
        const uint32_t key = magnitude_key(y[i]);
        if (key > threshold || (key == threshold && ties > 0)) {
          ties -= key == threshold;
          values[pos] = y[i];
          indices[pos] = static_cast<I>(i);
          ++pos;
          if (r != nullptr) r[i] = T(0);
        }
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
