// Copies between many tensors and one flat bucket on the CPU: the pieces of plan_bucket_copy
// (csrc/bucket_plan.h) are copied with memcpy in parallel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "bucket_plan.h"
#include "common.h"

namespace pyparallel {
namespace {

constexpr int64_t kPieceBytes = 1 << 20;

void bucket_copy(at::TensorList tensors, const at::Tensor& flat, bool to_flat) {
  const std::vector<CopyPiece> pieces = plan_bucket_copy(tensors, flat, to_flat, kPieceBytes);
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) std::memcpy(pieces[p].dst, pieces[p].src, pieces[p].bytes);
  });
}

void bucket_flatten_cpu(at::TensorList tensors, const at::Tensor& out) {
  check_bucket_args(tensors, out, "bucket_flatten");
  bucket_copy(tensors, out.view(-1), /*to_flat=*/true);
}

void bucket_unflatten_cpu(const at::Tensor& flat, at::TensorList tensors) {
  check_bucket_args(tensors, flat, "bucket_unflatten");
  bucket_copy(tensors, flat.view(-1), /*to_flat=*/false);
}

}  // namespace
}  // namespace pyparallel

TORCH_LIBRARY_IMPL(pyparallel, CPU, m) {
  m.impl("bucket_flatten", &pyparallel::bucket_flatten_cpu);
  m.impl("bucket_unflatten", &pyparallel::bucket_unflatten_cpu);
}
