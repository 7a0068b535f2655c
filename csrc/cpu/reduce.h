// Sum of several source buffers into one or two destinations, accumulated in fp32 in source order, for
// the shared-memory collectives (comm/shm.cpp). Host memory only; no tensors.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace pyparallel {
namespace cpu {

// dst[i] = round_to_T((sum over q = 0, 1, ... of float(srcs[q][i])) / divisor) for i < n, written to dst
// and, when dst2 is not null, to dst2 too. The order of additions is fixed (source order), so every
// caller computes the same bits. divisor 1 leaves the sum as it is. dst may alias a source.
void reduce_sources(c10::ScalarType dtype, const void* const* srcs, int nsrc, void* dst, void* dst2, int64_t n,
                    float divisor);

}  // namespace cpu
}  // namespace pyparallel
