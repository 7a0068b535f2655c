// The header check; see header.h.
#include "comm/header.h"

#include <sstream>
#include <string>

namespace pyparallel {
namespace {

constexpr const char* kFieldNames[CollectiveHeader::kFields] = {"collective", "dtype", "numel", "reduction",
                                                                "block size or k", "device",
                                                                "segment bytes"};

std::string field_value(int field, int64_t v) {
  switch (field) {
    case 0: return collective_name(v);
    case 1: return c10::toString(static_cast<at::ScalarType>(v));
    case 3: return v ? "average" : "sum";
    case 5: return c10::DeviceTypeName(static_cast<c10::DeviceType>(v), /*lower_case=*/true);
    default: return std::to_string(v);
  }
}

}  // namespace

const char* collective_name(int64_t kind) {
  switch (static_cast<Collective>(kind)) {
    case Collective::kDense: return "dense";
    case Collective::kInt8: return "int8";
    case Collective::kTopk: return "topk";
    case Collective::kShmAllReduce: return "shm all-reduce";
    case Collective::kShmReduceScatter: return "shm reduce-scatter";
    case Collective::kShmAllGather: return "shm all-gather";
    case Collective::kHierarchical: return "hierarchical";
    case Collective::kIpcAllReduce: return "CUDA IPC all-reduce";
  }
  return "unknown";
}

void check_headers_agree(const int64_t* all, int size, const char* op) {
  constexpr int kFields = CollectiveHeader::kFields;
  for (int f = 0; f < kFields; ++f) {
    bool same = true;
    for (int r = 1; r < size; ++r) same = same && all[r * kFields + f] == all[f];
    if (same) continue;
    std::ostringstream msg;
    msg << op << ": ranks disagree on the " << kFieldNames[f] << " (";
    for (int r = 0; r < size; ++r) msg << (r ? ", " : "") << "rank " << r << ": " << field_value(f, all[r * kFields + f]);
    msg << "); every rank must call the same collective on a tensor of the same numel, dtype and device";
    TORCH_CHECK(false, msg.str());
  }
}

}  // namespace pyparallel
