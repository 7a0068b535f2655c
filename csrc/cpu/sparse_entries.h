// The top-k wire format, in one place: a selected element as it travels (index, value), and the decode
// of a run of them into a dense tensor. The streamed top-k (topk_stream.h) produces entries; the sparse
// all-gather (comm/sparse.cpp) sends and decodes them. Host memory, fp32, int32 indices.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace pyparallel {

struct SparseEntry {
  int32_t index;
  float value;
};
static_assert(sizeof(SparseEntry) == 8, "SparseEntry is the wire format");

// out[e.index] += e.value / divisor for each entry in order (divisor 1: the value itself, exactly). With
// `undo`, undo[j] first receives what out[e[j].index] held, so a run can be taken back. Raises, naming
// `source_rank`, on an index outside [0, numel) before anything is written.
inline void scatter_add_entries(float* out, int64_t numel, const SparseEntry* e, int64_t count, float divisor,
                                float* undo, int source_rank) {
  constexpr int64_t kAhead = 64;  // the writes land all over the tensor: prefetch them
  for (int64_t j = 0; j < count; ++j) {
    TORCH_CHECK(e[j].index >= 0 && e[j].index < numel, "sparse all-gather: rank ", source_rank, " sent index ",
                e[j].index, " out of range [0, ", numel, ")");
  }
  for (int64_t j = 0; j < count; ++j) {
    if (j + kAhead < count) __builtin_prefetch(out + e[j + kAhead].index, /*rw=*/1);
    float& o = out[e[j].index];
    if (undo != nullptr) undo[j] = o;
    o = o + e[j].value / divisor;
  }
}

}  // namespace pyparallel
