// The collectives over a process group's point-to-point transport, callable from C++ (the hierarchical
// composition runs them on the inter-host group). Each reduces `tensor` in place, bitwise identically on
// every rank, and returns the payload bytes this rank sent. Registered as ops in ops.cpp's schemas.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace pyparallel {

constexpr int64_t kDefaultSegmentBytes = 1 << 20;

// Note [Dense ring] in allreduce.cpp.
int64_t ring_all_reduce(at::Tensor& tensor, const std::string& group, bool average, int64_t segment_bytes);
// Note [Int8 ring] in allreduce.cpp.
int64_t ring_all_reduce_int8(at::Tensor& tensor, const std::string& group, bool average, int64_t block_size,
                             int64_t segment_bytes);
// Sparse all-gather of every rank's top k (sparse.cpp); residual: error feedback, updated in place.
int64_t topk_all_reduce(at::Tensor& tensor, const std::string& group, int64_t k,
                        const std::optional<at::Tensor>& residual, bool average);

}  // namespace pyparallel
