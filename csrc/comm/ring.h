// Pieces of the ring algorithms (allreduce.cpp, sparse.cpp): how a tensor is cut into chunks and
// pipeline segments, and the order in which a ring phase posts and consumes its steps. The messages
// themselves go through a Session (session.h); at step s rank r sends to rank + 1 and receives from
// rank - 1.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include <ATen/ATen.h>

namespace pyparallel {

// Splits numel elements into n chunks whose sizes are multiples of `align` (the last chunks may be
// shorter or empty), and each chunk into `segments` pipeline segments of equal aligned size.
class Partition {
 public:
  Partition(int64_t numel, int n, int64_t align, int64_t segment_elems);
  int64_t segments() const { return segments_; }
  // [begin, end) of segment j of chunk c, in elements (empty when begin == end).
  int64_t begin(int c, int64_t j) const;
  int64_t end(int c, int64_t j) const;
  int64_t chunk_begin(int c) const { return std::min(c * per_chunk_, numel_); }
  int64_t chunk_end(int c) const { return std::min((c + 1) * per_chunk_, numel_); }
  int64_t max_segment() const { return per_segment_; }

 private:
  int64_t numel_, per_chunk_, per_segment_, segments_;
};

inline int mod(int64_t a, int n) { return static_cast<int>(((a % n) + n) % n); }

// Note [Ring schedule]
// A ring phase (reduce-scatter or all-gather) is (n - 1) steps of J segments: op i = (step i / J,
// segment i % J). The data op i sends is what op i - J received (for i >= J), so op i may be posted
// once op i - J is consumed; `max_ahead` bounds how far posting runs ahead of consuming (1 when receives
// go through a double buffer). Posting the next op before consuming the current one is what overlaps a
// segment's transfer with the previous segment's reduction.
template <class Post, class Consume>
void ring_schedule(int64_t ops, int64_t segments, int64_t max_ahead, Post&& post, Consume&& consume) {
  int64_t posted = 0;
  for (int64_t i = 0; i < ops; ++i) {
    while (posted < ops && posted <= i + max_ahead && (posted < segments || posted - segments < i)) post(posted++);
    consume(i);
  }
}

}  // namespace pyparallel
