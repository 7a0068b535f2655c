// Exact top-k by magnitude with error feedback, and the scatter-add that decodes it, on CUDA.
// Selection semantics: Note [Exact top-k selection] in csrc/cpu/topk.cpp (same keys, same ties rule,
// ascending index order), so CPU and CUDA return identical values and indices.
//
// Algorithm (no sort): a three-pass radix select over the 31-bit magnitude keys (bits 30..20, 19..9,
// 8..0) finds the k-th largest key T and how many elements equal to T are taken. Each pass is one
// histogram kernel over the data, restricted to the prefix found so far, followed by a one-thread kernel
// that picks the bin; nothing goes back to the host. A stable compaction in tiles then writes the
// selected elements in index order: per-tile counts, an exclusive scan over tiles (CUB), and a block
// scan inside each tile.
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/cub.cuh>
#include <torch/library.h>

#include "common.h"

namespace pyparallel {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;                      // elements per thread in the compaction
constexpr int kTile = kThreads * kItems;       // 2048 elements per compaction tile
constexpr int kRadixBins = 2048;
constexpr int kPasses = 3;
constexpr int kShift[kPasses] = {20, 9, 0};
constexpr int kBits[kPasses] = {11, 11, 9};

// Device-side selection state, kept in one int64 workspace after the histograms.
struct SelectState {
  unsigned long long prefix;  // key bits fixed so far
  unsigned long long mask;    // which bits are fixed
  int64_t k_rem;              // how many of the elements matching `prefix` are still to be taken
};

template <typename T>
__device__ __forceinline__ uint32_t magnitude_key(T v) {
  return __float_as_uint(static_cast<float>(v)) & 0x7fffffffu;
}

template <typename T>
__global__ void residual_add_kernel(const T* __restrict__ x, T* __restrict__ r, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    r[i] = static_cast<T>(__fadd_rn(static_cast<float>(r[i]), static_cast<float>(x[i])));
  }
}

template <typename T>
__global__ void radix_histogram_kernel(const T* __restrict__ y, int64_t n, const SelectState* __restrict__ state,
                                       int shift, int bits, unsigned long long* __restrict__ hist) {
  __shared__ uint32_t local[kRadixBins];
  for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const uint32_t prefix = static_cast<uint32_t>(state->prefix);
  const uint32_t mask = static_cast<uint32_t>(state->mask);
  const uint32_t digit_mask = (1u << bits) - 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint32_t key = magnitude_key(y[i]);
    if ((key & mask) == prefix) atomicAdd(&local[(key >> shift) & digit_mask], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x) {
    if (local[b] != 0) atomicAdd(&hist[b], static_cast<unsigned long long>(local[b]));
  }
}

// One thread: walk the bins from the top until the running count reaches k_rem (k on the first pass;
// prefix and mask start as the zeros of the workspace).
__global__ void radix_pick_kernel(const unsigned long long* __restrict__ hist, SelectState* state, int shift,
                                  int bits, int64_t k, bool first) {
  const int64_t k_rem = first ? k : state->k_rem;
  int64_t above = 0;
  for (int b = (1 << bits) - 1; b >= 0; --b) {
    const int64_t c = static_cast<int64_t>(hist[b]);
    if (above + c >= k_rem) {
      state->prefix |= static_cast<unsigned long long>(b) << shift;
      state->mask |= static_cast<unsigned long long>((1u << bits) - 1) << shift;
      state->k_rem = k_rem - above;
      return;
    }
    above += c;
  }
}

template <typename T>
__global__ void tile_count_kernel(const T* __restrict__ y, int64_t n, const SelectState* __restrict__ state,
                                  int64_t* __restrict__ tile_gt, int64_t* __restrict__ tile_eq) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage tmp_gt, tmp_eq;
  const uint32_t threshold = static_cast<uint32_t>(state->prefix);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kTile;
  int gt = 0, eq = 0;
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = base + j * kThreads + threadIdx.x;  // striped: coalesced
    if (i < n) {
      const uint32_t key = magnitude_key(y[i]);
      gt += key > threshold;
      eq += key == threshold;
    }
  }
  gt = Reduce(tmp_gt).Sum(gt);
  eq = Reduce(tmp_eq).Sum(eq);
  if (threadIdx.x == 0) {
    tile_gt[blockIdx.x] = gt;
    tile_eq[blockIdx.x] = eq;
  }
}

template <typename T, typename I>
__global__ void tile_write_kernel(const T* __restrict__ y, T* __restrict__ residual, int64_t n,
                                  const SelectState* __restrict__ state, const int64_t* __restrict__ gt_before,
                                  const int64_t* __restrict__ eq_before, T* __restrict__ values,
                                  I* __restrict__ indices) {
  using Load = cub::BlockLoad<T, kThreads, kItems, cub::BLOCK_LOAD_WARP_TRANSPOSE>;
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  __shared__ union {
    typename Load::TempStorage load;
    typename Scan::TempStorage scan;
  } tmp;
  const uint32_t threshold = static_cast<uint32_t>(state->prefix);
  const int64_t ties_wanted = state->k_rem;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kTile;
  const int valid = static_cast<int>(min(static_cast<int64_t>(kTile), n - base));
  T items[kItems];
  Load(tmp.load).Load(y + base, items, valid, T(0));
  __syncthreads();
  // Blocked arrangement: thread t holds elements base + t*kItems + j. Pack (gt << 16 | eq): both < 2^12.
  uint32_t mine = 0;
  for (int j = 0; j < kItems; ++j) {
    if (threadIdx.x * kItems + j < valid) {
      const uint32_t key = magnitude_key(items[j]);
      mine += (key > threshold ? (1u << 16) : 0u) + (key == threshold ? 1u : 0u);
    }
  }
  uint32_t prefix;
  Scan(tmp.scan).ExclusiveSum(mine, prefix);
  int64_t gt = gt_before[blockIdx.x] + (prefix >> 16);
  int64_t eq = eq_before[blockIdx.x] + (prefix & 0xffffu);
  for (int j = 0; j < kItems; ++j) {
    const int local = threadIdx.x * kItems + j;
    if (local >= valid) break;
    const uint32_t key = magnitude_key(items[j]);
    int64_t pos = -1;
    if (key > threshold) {
      pos = gt + min(eq, ties_wanted);
      ++gt;
    } else if (key == threshold) {
      if (eq < ties_wanted) pos = gt + eq;
      ++eq;
    }
    if (pos >= 0) {
      const int64_t i = base + local;
      values[pos] = items[j];
      indices[pos] = static_cast<I>(i);
      if (residual != nullptr) residual[i] = T(0);
    }
  }
}

inline int grid_for(int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min(ceil_div(n, kThreads), sms * 8)));
}

void exclusive_sum(const at::Tensor& in, at::Tensor& out, cudaStream_t stream) {
  size_t bytes = 0;
  const int n = static_cast<int>(in.numel());
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, bytes, in.const_data_ptr<int64_t>(),
                                               out.mutable_data_ptr<int64_t>(), n, stream));
  at::Tensor tmp = at::empty({static_cast<int64_t>(bytes)}, in.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(tmp.data_ptr(), bytes, in.const_data_ptr<int64_t>(),
                                               out.mutable_data_ptr<int64_t>(), n, stream));
}

template <typename T, typename I>
void topk_select_cuda(const T* x, T* r, int64_t n, int64_t k, T* values, I* indices, const at::Tensor& like) {
  auto stream = at::cuda::getCurrentCUDAStream();
  if (r != nullptr) {
    residual_add_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(x, r, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (k == 0) return;
  const T* y = r != nullptr ? r : x;
  const auto opts = like.options().dtype(at::kLong);
  // kPasses histograms of kRadixBins counters, then the SelectState (3 words).
  at::Tensor ws = at::zeros({kPasses * kRadixBins + 3}, opts);
  auto* hist = reinterpret_cast<unsigned long long*>(ws.data_ptr<int64_t>());
  auto* state = reinterpret_cast<SelectState*>(ws.data_ptr<int64_t>() + kPasses * kRadixBins);
  for (int p = 0; p < kPasses; ++p) {
    unsigned long long* h = hist + p * kRadixBins;
    radix_histogram_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(y, n, state, kShift[p], kBits[p], h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    radix_pick_kernel<<<1, 1, 0, stream>>>(h, state, kShift[p], kBits[p], k, /*first=*/p == 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t ntiles = ceil_div(n, kTile);
  TORCH_CHECK(ntiles <= INT32_MAX, "topk_compress: too many elements for one launch: ", n);
  at::Tensor counts = at::empty({4, ntiles}, opts);  // gt, eq, gt_before, eq_before
  at::Tensor tile_gt = counts[0], tile_eq = counts[1], gt_before = counts[2], eq_before = counts[3];
  tile_count_kernel<T><<<static_cast<int>(ntiles), kThreads, 0, stream>>>(
      y, n, state, tile_gt.data_ptr<int64_t>(), tile_eq.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  exclusive_sum(tile_gt, gt_before, stream);
  exclusive_sum(tile_eq, eq_before, stream);
  tile_write_kernel<T, I><<<static_cast<int>(ntiles), kThreads, 0, stream>>>(
      y, r, n, state, gt_before.const_data_ptr<int64_t>(), eq_before.const_data_ptr<int64_t>(), values, indices);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> topk_compress_cuda(const at::Tensor& x_in, int64_t k,
                                                      const std::optional<at::Tensor>& residual,
                                                      std::optional<at::ScalarType> index_dtype) {
  const char* op = "topk_compress";
  const at::ScalarType itype = index_dtype_or_default(index_dtype, op);
  check_topk_args(x_in, k, residual, itype, op);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor values = at::empty({k}, x.options());
  at::Tensor indices = at::empty({k}, x.options().dtype(itype));
  if (x.numel() == 0) return {values, indices};
  PYPARALLEL_DISPATCH_FLOATING(x.scalar_type(), [&] {
    scalar_t* r = residual.has_value() ? residual->mutable_data_ptr<scalar_t>() : nullptr;
    if (itype == at::kLong) {
      topk_select_cuda<scalar_t, int64_t>(x.const_data_ptr<scalar_t>(), r, x.numel(), k,
                                          values.mutable_data_ptr<scalar_t>(), indices.mutable_data_ptr<int64_t>(), x);
    } else {
      topk_select_cuda<scalar_t, int32_t>(x.const_data_ptr<scalar_t>(), r, x.numel(), k,
                                          values.mutable_data_ptr<scalar_t>(), indices.mutable_data_ptr<int32_t>(), x);
    }
  });
  return {values, indices};
}

// Atomic adds so duplicate indices within one call are all counted (their order is then unspecified;
// top-k payloads have unique indices, so decoding them is deterministic). Out-of-range indices trip a
// device assert, as ATen's own index_add_ does.
template <typename T, typename I>
__global__ void scatter_add_kernel(T* __restrict__ out, int64_t n, const I* __restrict__ idx,
                                   const T* __restrict__ vals, int64_t count) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < count; j += stride) {
    const int64_t i = static_cast<int64_t>(idx[j]);
    CUDA_KERNEL_ASSERT(i >= 0 && i < n && "scatter_add_: index out of range");
    gpuAtomicAdd(out + i, vals[j]);
  }
}

void scatter_add_cuda(at::Tensor& out, const at::Tensor& indices_in, const at::Tensor& values_in) {
  const char* op = "scatter_add_";
  check_scatter_args(out, indices_in, values_in, op);
  c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const int64_t count = values.numel();
  if (count == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  PYPARALLEL_DISPATCH_FLOATING(out.scalar_type(), [&] {
    if (indices.scalar_type() == at::kLong) {
      scatter_add_kernel<<<grid_for(count), kThreads, 0, stream>>>(
          out.mutable_data_ptr<scalar_t>(), out.numel(), indices.const_data_ptr<int64_t>(),
          values.const_data_ptr<scalar_t>(), count);
    } else {
      scatter_add_kernel<<<grid_for(count), kThreads, 0, stream>>>(
          out.mutable_data_ptr<scalar_t>(), out.numel(), indices.const_data_ptr<int32_t>(),
          values.const_data_ptr<scalar_t>(), count);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace pyparallel

TORCH_LIBRARY_IMPL(pyparallel, CUDA, m) {
  m.impl("topk_compress", &pyparallel::topk_compress_cuda);
  m.impl("scatter_add_", &pyparallel::scatter_add_cuda);
}
