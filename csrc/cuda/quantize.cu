// Blockwise symmetric int8 quantization on CUDA: kernels, ATen glue, CUDA registration.
// The arithmetic is exactly that of Note [Int8 arithmetic] in csrc/cpu/quantize.cpp (built with
// --fmad=false so that no multiply-add is fused), so CPU and CUDA results agree bitwise.
//
// Layout: one warp per quantization block. The warp reads its block twice (absmax, then quantize); the
// second read hits L1/L2 for the usual block sizes, so DRAM sees each input byte once. When the block
// size and pointers allow it, each lane moves 16 bytes per load.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/detail/UnpackRaw.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <curand_kernel.h>
#include <torch/library.h>

#include <mutex>

#include "common.h"

namespace pyparallel {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

__device__ __forceinline__ int8_t to_int8(float r) {
  return static_cast<int8_t>(static_cast<int>(fminf(fmaxf(r, -kInt8Max), kInt8Max)));
}

template <typename T, int VEC>
struct alignas(16) Pack {
  T v[VEC];
};

// Loads VEC elements (one 16-byte transaction when VEC > 1) as floats.
template <typename T, int VEC>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = static_cast<float>(p[0]);
  } else {
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = static_cast<float>(pk.v[j]);
  }
}

__device__ __forceinline__ uint32_t warp_max(uint32_t m) {
#pragma unroll
  for (int d = kWarp / 2; d > 0; d /= 2) m = max(m, __shfl_xor_sync(0xffffffffu, m, d));
  return m;
}

// Walks a block of n elements: full VEC-wide groups strided over the lanes, then a scalar tail.
template <typename T, int VEC, typename F>
__device__ __forceinline__ void for_each_in_block(const T* xb, int64_t n, int lane, F&& f) {
  const int64_t full = VEC > 1 ? (n / VEC) * VEC : 0;
  for (int64_t i = static_cast<int64_t>(lane) * VEC; i < full; i += kWarp * VEC) {
    float v[VEC];
    load_floats<T, VEC>(xb + i, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) f(i + j, v[j]);
  }
  for (int64_t i = full + lane; i < n; i += kWarp) {
    float v[1];
    load_floats<T, 1>(xb + i, v);
    f(i, v[0]);
  }
}

// Quantizes each block of y = (x + add_q * add_scale) / divisor (add_q may be null, divisor 1).
template <typename T, int VEC>
__global__ void quantize_int8_kernel(const T* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ scales,
                                     int64_t numel, int64_t block_size, int64_t nblocks,
                                     const int8_t* __restrict__ add_q, const float* __restrict__ add_scales,
                                     float divisor, bool stochastic, at::PhiloxCudaState philox) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  uint64_t seed = 0, offset = 0;
  if (stochastic) {
    const auto so = at::cuda::philox::unpack(philox);
    seed = std::get<0>(so);
    offset = std::get<1>(so);
  }
  for (int64_t b = warp; b < nblocks; b += nwarps) {
    const int64_t start = b * block_size;
    const int64_t n = min(block_size, numel - start);
    const T* xb = x + start;
    int8_t* qb = q + start;
    const int8_t* ab = add_q != nullptr ? add_q + start : nullptr;
    const float as = add_q != nullptr ? add_scales[b] : 0.0f;
    auto value = [&](int64_t i, float v) {
      if (ab != nullptr) v = __fadd_rn(v, __fmul_rn(static_cast<float>(ab[i]), as));
      return divisor != 1.0f ? __fdiv_rn(v, divisor) : v;
    };
    uint32_t m = 0;
    for_each_in_block<T, VEC>(xb, n, lane, [&](int64_t i, float v) { m = max(m, abs_bits(value(i, v))); });
    m = warp_max(m);
    const float absmax = __uint_as_float(m);
    if (m < kMinAbsmaxBits || m >= kInfBits) {
      if (lane == 0) scales[b] = m < kMinAbsmaxBits ? 0.0f : absmax;
      for (int64_t i = lane; i < n; i += kWarp) qb[i] = 0;
      continue;
    }
    if (lane == 0) scales[b] = __fdiv_rn(absmax, kInt8Max);
    const float inv = __fdiv_rn(kInt8Max, absmax);
    if (!stochastic) {
      for_each_in_block<T, VEC>(xb, n, lane,
                                [&](int64_t i, float v) { qb[i] = to_int8(rintf(__fmul_rn(value(i, v), inv))); });
    } else {
      for_each_in_block<T, VEC>(xb, n, lane, [&](int64_t i, float v) {
        curandStatePhilox4_32_10_t state;
        curand_init(seed, static_cast<uint64_t>(start + i), offset, &state);
        const float u = 1.0f - curand_uniform(&state);  // curand_uniform is in (0, 1]
        qb[i] = to_int8(floorf(__fadd_rn(__fmul_rn(value(i, v), inv), u)));
      });
    }
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int grid_for(int64_t work_items, int64_t items_per_block) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min(ceil_div(work_items, items_per_block), sms * 32)));
}

void launch_quantize(const at::Tensor& x, at::Tensor& q, at::Tensor& scales, int64_t block_size, const int8_t* add_q,
                     const float* add_scales, float divisor, bool stochastic, at::PhiloxCudaState philox) {
  const int64_t numel = x.numel();
  if (numel == 0) return;
  const int64_t nblocks = ceil_div(numel, block_size);
  const int grid = grid_for(nblocks, kThreads / kWarp);
  auto stream = at::cuda::getCurrentCUDAStream();
  PYPARALLEL_DISPATCH_FLOATING(x.scalar_type(), [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (block_size % kVec == 0 && aligned16(xp)) {
      quantize_int8_kernel<scalar_t, kVec><<<grid, kThreads, 0, stream>>>(
          xp, q.mutable_data_ptr<int8_t>(), scales.mutable_data_ptr<float>(), numel, block_size, nblocks, add_q,
          add_scales, divisor, stochastic, philox);
    } else {
      quantize_int8_kernel<scalar_t, 1><<<grid, kThreads, 0, stream>>>(
          xp, q.mutable_data_ptr<int8_t>(), scales.mutable_data_ptr<float>(), numel, block_size, nblocks, add_q,
          add_scales, divisor, stochastic, philox);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_cuda(const at::Tensor& x_in, int64_t block_size, bool stochastic,
                                                      std::optional<at::Generator> generator) {
  const char* op = "quantize_int8";
  check_float_tensor(x_in, op, "x");
  check_block_size(block_size, op);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({ceil_div(x.numel(), block_size)}, x.options().dtype(at::kFloat));
  at::PhiloxCudaState philox;
  if (stochastic && x.numel() > 0) {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator,
                                                                   at::cuda::detail::getDefaultCUDAGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(4);  // each element draws once from its own Philox subsequence
  }
  launch_quantize(x, q, scales, block_size, nullptr, nullptr, 1.0f, stochastic, philox);
  return {q, scales};
}

void quantize_int8_into_cuda(at::Tensor& q, at::Tensor& scales, const at::Tensor& x_in, int64_t block_size,
                             const std::optional<at::Tensor>& add_q, const std::optional<at::Tensor>& add_scales,
                             double divisor) {
  check_quantize_into_args(q, scales, x_in, block_size, add_q, add_scales, divisor, "quantize_int8_into_");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  launch_quantize(x, q, scales, block_size, add_q ? add_q->const_data_ptr<int8_t>() : nullptr,
                  add_q ? add_scales->const_data_ptr<float>() : nullptr, static_cast<float>(divisor), false,
                  at::PhiloxCudaState());
}

// Each thread handles VEC consecutive int8 values (one 16-byte load when VEC == 16), tracking the
// quantization block as it crosses block boundaries instead of dividing per element. Outputs (and the
// accumulator of dequantize_add_) move in 16-byte transactions when `vec_out` says they are aligned.
template <typename T, int VEC>
__device__ __forceinline__ void copy_elems(T* dst, const T* src, int count, bool vec) {
  if (vec && count == VEC) {
#pragma unroll
    for (int j = 0; j < VEC * static_cast<int>(sizeof(T)) / 16; ++j) {
      reinterpret_cast<int4*>(dst)[j] = reinterpret_cast<const int4*>(src)[j];
    }
  } else {
    for (int j = 0; j < count; ++j) dst[j] = src[j];
  }
}

template <typename T, int VEC, bool kAdd>
__global__ void dequantize_int8_kernel(const int8_t* __restrict__ q, const float* __restrict__ scales,
                                       T* __restrict__ out, int64_t numel, int64_t block_size, bool vec_out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i0 < numel; i0 += stride) {
    alignas(16) int8_t qv[VEC];
    alignas(16) T o[VEC];
    const int count = static_cast<int>(min(static_cast<int64_t>(VEC), numel - i0));
    copy_elems<int8_t, VEC>(qv, q + i0, count, VEC > 1);
    if constexpr (kAdd) copy_elems<T, VEC>(o, out + i0, count, vec_out);
    int64_t b = i0 / block_size;
    int64_t next = (b + 1) * block_size;
    float s = scales[b];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (j < count) {
        if (i0 + j == next) {
          ++b;
          next += block_size;
          s = scales[b];
        }
        const float v = __fmul_rn(static_cast<float>(qv[j]), s);
        if constexpr (kAdd) {
          o[j] = __fadd_rn(o[j], v);
        } else {
          o[j] = static_cast<T>(v);
        }
      }
    }
    copy_elems<T, VEC>(out + i0, o, count, vec_out);
  }
}

template <typename T, bool kAdd>
void launch_dequantize(const at::Tensor& q, const at::Tensor& scales, T* out, int64_t block_size) {
  const int64_t numel = q.numel();
  if (numel == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int8_t* qp = q.const_data_ptr<int8_t>();
  if (aligned16(qp)) {
    dequantize_int8_kernel<T, 16, kAdd><<<grid_for(numel, kThreads * 16), kThreads, 0, stream>>>(
        qp, scales.const_data_ptr<float>(), out, numel, block_size, aligned16(out));
  } else {
    dequantize_int8_kernel<T, 1, kAdd><<<grid_for(numel, kThreads), kThreads, 0, stream>>>(
        qp, scales.const_data_ptr<float>(), out, numel, block_size, false);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor dequantize_int8_cuda(const at::Tensor& q, const at::Tensor& scales, int64_t block_size,
                                std::optional<at::ScalarType> dtype) {
  const char* op = "dequantize_int8";
  check_int8_payload(q, scales, block_size, op);
  const at::ScalarType out_type = dtype.value_or(at::kFloat);
  TORCH_CHECK(is_float_type(out_type), op, ": dtype must be float32, float16 or bfloat16, got ", out_type);
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(out_type));
  PYPARALLEL_DISPATCH_FLOATING(out_type, [&] {
    launch_dequantize<scalar_t, false>(q, scales, out.mutable_data_ptr<scalar_t>(), block_size);
  });
  return out;
}

void dequantize_int8_into_cuda(at::Tensor& out, const at::Tensor& q, const at::Tensor& scales, int64_t block_size) {
  const char* op = "dequantize_int8_into_";
  check_int8_payload(q, scales, block_size, op);
  check_dequantize_out(out, q, op, "out");
  c10::cuda::CUDAGuard guard(out.device());
  PYPARALLEL_DISPATCH_FLOATING(out.scalar_type(), [&] {
    launch_dequantize<scalar_t, false>(q, scales, out.mutable_data_ptr<scalar_t>(), block_size);
  });
}

void dequantize_add_cuda(at::Tensor& acc, const at::Tensor& q, const at::Tensor& scales, int64_t block_size) {
  const char* op = "dequantize_add_";
  check_int8_payload(q, scales, block_size, op);
  TORCH_CHECK(acc.scalar_type() == at::kFloat, op, ": acc must be a float32 accumulator, got ", acc.scalar_type());
  check_dequantize_out(acc, q, op, "acc");
  c10::cuda::CUDAGuard guard(acc.device());
  launch_dequantize<float, true>(q, scales, acc.mutable_data_ptr<float>(), block_size);
}

}  // namespace
}  // namespace pyparallel

TORCH_LIBRARY_IMPL(pyparallel, CUDA, m) {
  m.impl("quantize_int8", &pyparallel::quantize_int8_cuda);
  m.impl("quantize_int8_into_", &pyparallel::quantize_int8_into_cuda);
  m.impl("dequantize_int8", &pyparallel::dequantize_int8_cuda);
  m.impl("dequantize_int8_into_", &pyparallel::dequantize_int8_into_cuda);
  m.impl("dequantize_add_", &pyparallel::dequantize_add_cuda);
}
