// Streamed exact top-k on the CPU; see topk_stream.h.
//
// Note [Streamed top-k]
// Same selection rule as Note [Exact top-k selection] (csrc/cpu/topk.cpp), same bracket [lo, hi] from a
// sample, but one pass in windows of chunks: a key > hi is selected as soon as it is read, provided the
// bracket holds the threshold T, which is only known at the end. So entries with key > hi are emitted
// in index order (and zeroed in r in the same store) while the pass runs; candidates (lo <= key <= hi)
// wait for the end, where T is found among them and the chosen ones follow, in index order. The output
// is the same set as topk_compress's, in the order [above..., chosen candidates...].
//
// If the bracket did not hold T (more than k keys above hi, or fewer than k at or above lo; a sample of
// 64K keys with ~4 sigma margins makes this rare), the emitted prefix is wrong: valid() turns false,
// r is restored to y from the emitted values, and exact() reruns the plain exact selection on y. The
// caller must then discard what it already sent.
#include "cpu/topk_stream.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "cpu/topk_select.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#include <immintrin.h>
#define PYPARALLEL_HAVE_AVX2_STREAM 1
#endif

namespace pyparallel {
namespace {

using cpu::kMaxKey;
using cpu::magnitude_key;

constexpr int64_t kChunk = 1 << 18;     // elements per chunk (the unit of parallelism)
constexpr int64_t kWindowChunks = 4;    // chunks per scan_some(): ~1M elements, ~1 ms at memory speed

struct ScanArgs {
  const float* x;
  float* r;           // nullptr without error feedback
  float* zero;        // x when zero_input, else nullptr
  int32_t lo, hi;
  bool collect;       // false once the stream is invalid: only r = r + x (and the zeroing) remain
};

template <class Chunk>
inline void take(Chunk& c, int64_t i, float v, int32_t hi) {
  (magnitude_key(v) > hi ? c.above : c.candidates).push_back({static_cast<int32_t>(i), v});
}

// The pass over [begin, end): y = x or r + x (written to r, with 0 where key > hi while collecting),
// x zeroed when asked, and every key >= lo taken into c.
template <class Chunk>
void scan_scalar(const ScanArgs& a, int64_t begin, int64_t end, Chunk& c) {
  for (int64_t i = begin; i < end; ++i) {
    const float v = a.r != nullptr ? a.r[i] + a.x[i] : a.x[i];
    const int32_t key = magnitude_key(v);
    if (a.r != nullptr) a.r[i] = a.collect && key > a.hi ? 0.0f : v;
    if (a.zero != nullptr) a.zero[i] = 0.0f;
    if (a.collect && key >= a.lo) take(c, i, v, a.hi);
  }
}

#ifdef PYPARALLEL_HAVE_AVX2_STREAM
// Eight keys per compare; a movemask skips the ~99% of lanes below lo without a branch each. x is
// zeroed with plain stores: streaming (non-temporal) stores made the pass 4x slower on our EPYC VM.
template <class Chunk, bool kResidual, bool kZero>
__attribute__((target("avx2"))) void scan_avx2(const ScanArgs& a, int64_t begin, int64_t end, Chunk& c) {
  const __m256i abs_mask = _mm256_set1_epi32(kMaxKey);
  const __m256i below = _mm256_set1_epi32(a.collect ? a.lo - 1 : kMaxKey);  // lo >= 0: no wrap
  const __m256i hi = _mm256_set1_epi32(a.collect ? a.hi : kMaxKey);
  alignas(32) float lanes[8];
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    __m256 v = _mm256_loadu_ps(a.x + i);
    if constexpr (kResidual) v = _mm256_add_ps(_mm256_loadu_ps(a.r + i), v);
    const __m256i key = _mm256_and_si256(_mm256_castps_si256(v), abs_mask);
    if constexpr (kResidual) {
      const __m256 is_above = _mm256_castsi256_ps(_mm256_cmpgt_epi32(key, hi));
      _mm256_storeu_ps(a.r + i, _mm256_andnot_ps(is_above, v));
    }
    if constexpr (kZero) _mm256_storeu_ps(a.zero + i, _mm256_setzero_ps());
    unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, below))));
    if (m == 0) continue;
    _mm256_store_ps(lanes, v);
    do {
      const int b = __builtin_ctz(m);
      m &= m - 1;
      take(c, i + b, lanes[b], a.hi);
    } while (m != 0);
  }
  scan_scalar(a, i, end, c);
}
#endif

template <class Chunk>
void scan(const ScanArgs& a, int64_t begin, int64_t end, Chunk& c) {
#ifdef PYPARALLEL_HAVE_AVX2_STREAM
  if (cpu::cpu_has_avx2()) {
    const bool res = a.r != nullptr, zero = a.zero != nullptr;
    if (res && zero) return scan_avx2<Chunk, true, true>(a, begin, end, c);
    if (res) return scan_avx2<Chunk, true, false>(a, begin, end, c);
    if (!zero) return scan_avx2<Chunk, false, false>(a, begin, end, c);
  }
#endif
  scan_scalar(a, begin, end, c);
}

}  // namespace

TopkStream::TopkStream(float* x, float* r, int64_t n, int64_t k, bool zero_input, SparseEntry* out)
    : x_(x), r_(r), n_(n), k_(k), zero_input_(zero_input), out_(out) {
  TORCH_CHECK(n <= INT32_MAX, "TopkStream: int32 indices cannot address ", n, " elements");
  TORCH_CHECK(k >= 1 && k <= n, "TopkStream: k must be in [1, ", n, "], got ", k);
  TORCH_CHECK(!zero_input || r != nullptr, "TopkStream: zero_input needs a residual (else x is needed later)");
  chunks_.resize((n + kChunk - 1) / kChunk);
  std::tie(lo_, hi_) = cpu::topk_bracket(x, r, n, k);
}

void TopkStream::restore_residual(const SparseEntry* begin, const SparseEntry* end) const {
  if (r_ == nullptr) return;
  for (const SparseEntry* e = begin; e != end; ++e) r_[e->index] = e->value;
}

void TopkStream::scan_some() {
  const int64_t c0 = next_ / kChunk;
  const int64_t c1 = std::min<int64_t>(static_cast<int64_t>(chunks_.size()), c0 + kWindowChunks);
  const ScanArgs args{x_, r_, zero_input_ ? x_ : nullptr, lo_, hi_, valid_};
  at::parallel_for(c0, c1, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) scan(args, c * kChunk, std::min(n_, (c + 1) * kChunk), chunks_[c]);
  });
  next_ = std::min(n_, c1 * kChunk);
  if (!valid_) return;
  int64_t above = 0;
  for (int64_t c = c0; c < c1; ++c) above += static_cast<int64_t>(chunks_[c].above.size());
  if (ready_ + above > k_) {  // more than k keys above hi: T > hi, the bracket missed
    valid_ = false;
    for (int64_t c = c0; c < c1; ++c) {
      const std::vector<SparseEntry>& above = chunks_[c].above;
      restore_residual(above.data(), above.data() + above.size());
    }
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    std::copy(chunks_[c].above.begin(), chunks_[c].above.end(), out_ + ready_);
    ready_ += static_cast<int64_t>(chunks_[c].above.size());
    std::vector<SparseEntry>().swap(chunks_[c].above);
  }
}

bool TopkStream::finish() {
  TORCH_CHECK(!scanning(), "TopkStream::finish: the scan is not done");
  if (!valid_) return false;
  std::vector<int32_t> keys;
  for (const Chunk& c : chunks_)
    for (const SparseEntry& e : c.candidates) keys.push_back(magnitude_key(e.value));
  const int64_t rank = k_ - ready_;  // candidates still to choose
  if (rank > static_cast<int64_t>(keys.size())) {  // fewer than k keys >= lo: T < lo, the bracket missed
    valid_ = false;
    return false;
  }
  if (rank == 0) return true;
  std::nth_element(keys.begin(), keys.begin() + (rank - 1), keys.end(), std::greater<int32_t>());
  const int32_t threshold = keys[rank - 1];
  int64_t ties = rank;  // the ties to take, in index order: rank - #{key > T}
  for (int32_t key : keys) ties -= key > threshold;
  for (Chunk& c : chunks_) {
    for (const SparseEntry& e : c.candidates) {
      const int32_t key = magnitude_key(e.value);
      if (key < threshold || (key == threshold && ties == 0)) continue;
      ties -= key == threshold;
      out_[ready_++] = e;
      if (r_ != nullptr) r_[e.index] = 0.0f;
    }
    std::vector<SparseEntry>().swap(c.candidates);
  }
  TORCH_INTERNAL_ASSERT(ready_ == k_, "TopkStream: selection count mismatch");
  return true;
}

void TopkStream::exact() {
  TORCH_CHECK(!scanning() && !valid_, "TopkStream::exact: only after finish() returned false");
  restore_residual(out_, out_ + ready_);  // now r == y everywhere
  std::vector<float> values(k_);
  std::vector<int32_t> indices(k_);
  // y lives in r with error feedback (x may be zeroed by then), else in x (never zeroed without r).
  if (r_ != nullptr) {
    cpu::topk_select(r_, nullptr, n_, k_, values.data(), indices.data());
    for (int64_t j = 0; j < k_; ++j) r_[indices[j]] = 0.0f;
  } else {
    cpu::topk_select(x_, nullptr, n_, k_, values.data(), indices.data());
  }
  for (int64_t j = 0; j < k_; ++j) out_[j] = {indices[j], values[j]};
  ready_ = k_;
  for (Chunk& c : chunks_) std::vector<SparseEntry>().swap(c.candidates);
}

}  // namespace pyparallel
