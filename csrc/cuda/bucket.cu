// Copies between many tensors and one flat bucket on CUDA, in one kernel launch.
//
// The host plans pieces of at most kPieceBytes (csrc/bucket_plan.h) and sends the table
// (src, dst, bytes) to the device through pinned memory; each CTA copies pieces with the widest access
// (16, 8, 4 or 1 bytes) that the piece's addresses and length allow.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "bucket_plan.h"
#include "common.h"

namespace pyparallel {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kPieceBytes = 64 * 1024;

using Piece = CopyPiece;
static_assert(sizeof(Piece) == 3 * sizeof(int64_t), "the piece table is shipped as int64 triples");

template <typename W>
__device__ __forceinline__ void copy_words(const char* src, char* dst, int64_t bytes) {
  const W* s = reinterpret_cast<const W*>(src);
  W* d = reinterpret_cast<W*>(dst);
  const int64_t n = bytes / static_cast<int64_t>(sizeof(W));
  constexpr int kUnroll = 4;
  int64_t i = threadIdx.x;
  for (; i + (kUnroll - 1) * kThreads < n; i += kUnroll * kThreads) {
    W w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) w[u] = s[i + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) d[i + u * kThreads] = w[u];
  }
  for (; i < n; i += kThreads) d[i] = s[i];
}

__global__ void piece_copy_kernel(const Piece* __restrict__ pieces, int64_t npieces) {
  for (int64_t p = blockIdx.x; p < npieces; p += gridDim.x) {
    const Piece pc = pieces[p];
    const uintptr_t a = reinterpret_cast<uintptr_t>(pc.src) | reinterpret_cast<uintptr_t>(pc.dst) |
                        static_cast<uintptr_t>(pc.bytes);
    if (a % 16 == 0) {
      copy_words<int4>(pc.src, pc.dst, pc.bytes);
    } else if (a % 8 == 0) {
      copy_words<int2>(pc.src, pc.dst, pc.bytes);
    } else if (a % 4 == 0) {
      copy_words<int>(pc.src, pc.dst, pc.bytes);
    } else {
      copy_words<char>(pc.src, pc.dst, pc.bytes);
    }
  }
}

void bucket_copy_cuda(at::TensorList tensors, const at::Tensor& flat, bool to_flat) {
  c10::cuda::CUDAGuard guard(flat.device());
  const std::vector<Piece> pieces = plan_bucket_copy(tensors, flat, to_flat, kPieceBytes);
  if (pieces.empty()) return;
  const int64_t npieces = static_cast<int64_t>(pieces.size());
  at::Tensor table_host = at::empty({npieces * 3}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(table_host.data_ptr(), pieces.data(), pieces.size() * sizeof(Piece));
  // Pinned source + non_blocking: the caching host allocator keeps the buffer alive until the copy ran.
  at::Tensor table = table_host.to(flat.device(), /*non_blocking=*/true);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int grid = static_cast<int>(std::min<int64_t>(npieces, sms * 16));
  piece_copy_kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const Piece*>(table.const_data_ptr<int64_t>()), npieces);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void bucket_flatten_cuda(at::TensorList tensors, const at::Tensor& out) {
  check_bucket_args(tensors, out, "bucket_flatten");
  bucket_copy_cuda(tensors, out.view(-1), /*to_flat=*/true);
}

void bucket_unflatten_cuda(const at::Tensor& flat, at::TensorList tensors) {
  check_bucket_args(tensors, flat, "bucket_unflatten");
  bucket_copy_cuda(tensors, flat.view(-1), /*to_flat=*/false);
}

}  // namespace
}  // namespace pyparallel

TORCH_LIBRARY_IMPL(pyparallel, CUDA, m) {
  m.impl("bucket_flatten", &pyparallel::bucket_flatten_cuda);
  m.impl("bucket_unflatten", &pyparallel::bucket_unflatten_cuda);
}
