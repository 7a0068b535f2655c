// What every rank states before a collective moves data, and the one place where the collectives and
// the header's fields are numbered and named (the ring, the sparse all-gather, shared memory and the
// hierarchical composition, CUDA IPC all use these).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>

namespace pyparallel {

// Which collective a header describes. Compressed variants are distinct kinds, so two ranks that ask
// for different compressions fail the header check instead of exchanging incompatible messages.
enum class Collective : int64_t {
  kDense = 0,         // exact ring
  kInt8 = 1,          // int8 ring (param: block size)
  kTopk = 2,          // top-k sparse all-gather (param: k)
  kShmAllReduce = 3,  // shared-memory all-reduce
  kShmReduceScatter = 4,
  kShmAllGather = 5,
  kHierarchical = 6,  // param: the inter-host compression (a Collective) * 2^32 + its parameter
  kIpcAllReduce = 7,  // CUDA IPC all-reduce (csrc/comm/ipc.h)
};

const char* collective_name(int64_t kind);

struct CollectiveHeader {
  static constexpr int kFields = 7;
  int64_t kind;     // a Collective
  int64_t dtype;    // at::ScalarType
  int64_t numel;
  int64_t average;  // 0 = sum, 1 = average
  int64_t param;    // see Collective
  int64_t device;   // at::DeviceType
  int64_t segment;  // pipeline segment bytes of a ring (0 where none): it fixes every message's size

  static CollectiveHeader of(const at::Tensor& t, Collective kind, bool average, int64_t param,
                             int64_t segment = 0) {
    return {static_cast<int64_t>(kind), static_cast<int64_t>(t.scalar_type()), t.numel(), average, param,
            static_cast<int64_t>(t.device().type()), segment};
  }
  std::array<int64_t, kFields> fields() const { return {kind, dtype, numel, average, param, device, segment}; }
};

// `all` holds every rank's fields, rank after rank ([size][kFields]). Raises, with a message that names
// each rank's value of the first field that differs, if any two ranks disagree. Every rank sees the
// same `all`, so every rank raises the same error or none does.
void check_headers_agree(const int64_t* all, int size, const char* op);

}  // namespace pyparallel
