// Exact top-k of an fp32 CPU tensor, with error feedback, produced as a stream: the entries that are
// surely selected come out while the input is still being read, so a collective can put them on the
// wire during the scan instead of after it (Note [Streamed top-k] in topk_stream.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/sparse_entries.h"

namespace pyparallel {

class TopkStream {
 public:
  // Selects the same set as topk_compress(x, k, r) into out[0, k) (in another order: see the note).
  // y = x, or with r (error feedback) y = r + x written into r, selected entries zeroed there.
  // zero_input (needs r): x is zeroed as it is read, for collectives that decode into x.
  TopkStream(float* x, float* r, int64_t n, int64_t k, bool zero_input, SparseEntry* out);

  bool scanning() const { return next_ < n_; }
  void scan_some();                          // reads the next window of the input
  int64_t ready() const { return ready_; }   // out[0, ready()) is final while valid()
  bool valid() const { return valid_; }

  // After the scan. Returns true with out[0, k) complete, or false if the sample misled the bracket:
  // then out[0, ready()) was not the selection's prefix, and exact() must be called (once nothing reads
  // out any more) to write the exact selection into out[0, k).
  bool finish();
  void exact();

 private:
  struct Chunk {
    std::vector<SparseEntry> above;       // key > hi: selected while the stream is valid
    std::vector<SparseEntry> candidates;  // lo <= key <= hi, ascending index
  };
  void restore_residual(const SparseEntry* begin, const SparseEntry* end) const;  // r[index] = value

  float* x_;
  float* r_;
  int64_t n_, k_;
  bool zero_input_;
  SparseEntry* out_;
  int32_t lo_ = 0, hi_ = 0;
  int64_t next_ = 0, ready_ = 0;
  bool valid_ = true;
  std::vector<Chunk> chunks_;
};

}  // namespace pyparallel
