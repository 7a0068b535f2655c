// Hierarchical all-reduce: exact inside a host (shared memory), compressed (optionally) across hosts.
//
// Note [Hierarchical all-reduce]
// The host's ranks reduce-scatter through shared memory, so local rank l holds the host's sum of region
// l (Note [Shared-memory collectives]); local rank l of every host then all-reduces that region with the
// local ranks l of the other hosts, over the inter-host group, with the caller's compression (our dense
// ring, the int8 ring, or top-k with error feedback, whose residual is kept by the region's owner); an
// average then divides by the world size; and the host's ranks all-gather the regions. Only the
// inter-host step crosses the network, each region once per host. Every host has the same number of
// ranks (the policy checks), so every host cuts the same regions, and every step gives the same bits
// on every rank that computes it, so all ranks end with the same bits.
#include <torch/library.h>

#include "comm/collectives.h"
#include "comm/header.h"
#include "comm/session.h"
#include "comm/shm.h"
#include "common.h"

namespace pyparallel {
namespace {

int64_t hierarchical_all_reduce(at::Tensor& tensor, const std::string& comm, const std::string& cross_group,
                                int64_t world_size, bool average, int64_t compression, int64_t param,
                                const std::optional<at::Tensor>& residual) {
  const char* op = "hierarchical_all_reduce_";
  check_float_tensor(tensor, op, "tensor");
  TORCH_CHECK(tensor.device().is_cpu(), op, ": tensor must be on the CPU, got ", tensor.device());
  TORCH_CHECK(world_size >= 1, op, ": world_size must be positive, got ", world_size);
  const auto kind = static_cast<Collective>(compression);
  TORCH_CHECK(kind == Collective::kDense || kind == Collective::kInt8 || kind == Collective::kTopk, op,
              ": compression must be 0 (none), 1 (int8) or 2 (top-k), got ", compression);
  if (kind == Collective::kInt8) check_block_size(param, op);
  if (kind == Collective::kTopk) {
    TORCH_CHECK(param >= 0 && param <= tensor.numel(), op, ": k must be in [0, ", tensor.numel(), "], got ", param);
  }
  if (residual.has_value()) {
    TORCH_CHECK(kind == Collective::kTopk, op, ": a residual is only used with top-k compression");
    TORCH_CHECK(residual->numel() == tensor.numel() && residual->scalar_type() == tensor.scalar_type() &&
                    residual->is_contiguous() && residual->device() == tensor.device(),
                op, ": residual must be a contiguous tensor like tensor (", tensor.numel(), " elements of ",
                tensor.scalar_type(), ")");
  }
  std::shared_ptr<ShmComm> shm = shm_comm(comm);
  at::Tensor flat = tensor.is_contiguous() ? tensor.view(-1) : tensor.contiguous().view(-1);
  const int64_t numel = flat.numel();
  const auto header = CollectiveHeader::of(flat, Collective::kHierarchical, average, (compression << 32) | param);

  const auto [b, e] = shm->region(numel, shm->rank());
  at::Tensor mine = flat.slice(0, b, e);
  try {
    shm->reduce_scatter(flat, header, op);
  } catch (const c10::Error&) {
    if (shm->failed()) throw;
    // This host's ranks disagree. Tell the other hosts too, or they would wait for us in the inter-host
    // step: a header no rank of theirs can match (numel -1) makes that step raise everywhere.
    CollectiveHeader poisoned = CollectiveHeader::of(mine, kind, false, 0);
    poisoned.numel = -1;
    try {
      Session tell(cross_group, mine, poisoned, op);
    } catch (const c10::Error&) {
    }
    throw;
  }
  int64_t sent = 0;
  switch (kind) {
    case Collective::kDense:
      sent = ring_all_reduce(mine, cross_group, false, kDefaultSegmentBytes);
      break;
    case Collective::kInt8:
      sent = ring_all_reduce_int8(mine, cross_group, false, param, kDefaultSegmentBytes);
      break;
    default: {  // top-k: the same fraction of this region as of the tensor
      const int64_t k = numel == 0 ? 0 : std::min(e - b, ceil_div(param * (e - b), numel));
      std::optional<at::Tensor> r;
      if (residual.has_value()) r = residual->view(-1).slice(0, b, e);
      sent = topk_all_reduce(mine, cross_group, k, r, false);
    }
  }
  if (average) mine.div_(world_size);
  shm->all_gather(flat, header, op);
  if (!tensor.is_contiguous()) tensor.copy_(flat.view(tensor.sizes()));
  return sent;
}

void release_group(const std::string& group) { release_group_state(group); }

}  // namespace
}  // namespace pyparallel

TORCH_LIBRARY_IMPL(pyparallel, CompositeExplicitAutograd, m) {
  m.impl("hierarchical_all_reduce_", &pyparallel::hierarchical_all_reduce);
}

TORCH_LIBRARY_IMPL(pyparallel, CatchAll, m) {
  m.impl("release_group", &pyparallel::release_group);
}
