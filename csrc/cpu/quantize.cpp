// Blockwise symmetric int8 quantization on the CPU: kernels, ATen glue, CPU registration.
//
// Note [Int8 arithmetic]
// For a block with absmax m (computed on the float32 value of each element):
//   scale = m / 127,  inv = 127 / m,  q = clamp(round_half_even(x * inv), -127, 127)
// and dequantization is q * scale. Every step is one correctly rounded fp32 operation, in the same order
// on CPU, CUDA and in pyparallel.reference, so the three agree bitwise (we compile with
// -ffp-contract=off / --fmad=false so no step is fused). Special blocks:
//   * absmax below 2^-120 (all zero, or only tiny values): scale 0, q 0 (127/m would overflow).
//   * any NaN or Inf in the block: scale = absmax (NaN if any NaN, else Inf) and q = 0, so a caller finds
//     non-finite input by checking the scales alone, and dequantization yields NaN for the whole block.
// Stochastic rounding replaces round_half_even(v) by floor(v + u), u uniform in [0, 1) from Philox keyed
// by (seed from the generator, block index), so the result does not depend on the thread count.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <mutex>

#include "common.h"

namespace pyparallel {
namespace {

inline int32_t abs_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return static_cast<int32_t>(u & 0x7fffffffu);
}

inline float from_bits(int32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

// round-half-to-even for |v| < 2^22 without a libm call: adding 1.5 * 2^23 makes the unit the last bit.
inline float round_half_even(float v) {
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
}

inline int8_t to_int8(float r) { return static_cast<int8_t>(static_cast<int32_t>(std::clamp(r, -kInt8Max, kInt8Max))); }

// Elements are converted to fp32 in chunks so the fp32 loops below vectorize for every input dtype.
constexpr int64_t kChunk = 1024;

template <typename T>
inline const float* as_float(const T* x, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]);
    return buf;
  }
}

template <typename T>
void quantize_block(const T* x, int64_t n, int8_t* q, float* scale, bool stochastic, uint64_t seed,
                    int64_t block_index) {
  float buf[kChunk];
  int32_t m = 0;
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t len = std::min(kChunk, n - c);
    const float* v = as_float(x + c, len, buf);
    for (int64_t i = 0; i < len; ++i) m = std::max(m, abs_bits(v[i]));
  }
  const float absmax = from_bits(m);
  if (m < static_cast<int32_t>(kMinAbsmaxBits) || m >= static_cast<int32_t>(kInfBits)) {
    *scale = m < static_cast<int32_t>(kMinAbsmaxBits) ? 0.0f : absmax;
    std::memset(q, 0, n);
    return;
  }
  *scale = absmax / kInt8Max;
  const float inv = kInt8Max / absmax;
  if (!stochastic) {
    for (int64_t c = 0; c < n; c += kChunk) {
      const int64_t len = std::min(kChunk, n - c);
      const float* v = as_float(x + c, len, buf);
      for (int64_t i = 0; i < len; ++i) q[c + i] = to_int8(round_half_even(v[i] * inv));
    }
  } else {
    at::Philox4_32 rng(seed, static_cast<uint64_t>(block_index), 0);
    for (int64_t c = 0; c < n; c += kChunk) {
      const int64_t len = std::min(kChunk, n - c);
      const float* v = as_float(x + c, len, buf);
      for (int64_t i = 0; i < len; ++i) {
        const float u = static_cast<float>(rng() >> 8) * 0x1p-24f;  // uniform in [0, 1), 24 bits
        q[c + i] = to_int8(std::floor(v[i] * inv + u));
      }
    }
  }
}

// Grain: enough blocks per task to amortize scheduling (~64K elements).
inline int64_t block_grain(int64_t block_size) { return std::max<int64_t>(1, 65536 / block_size); }

std::tuple<at::Tensor, at::Tensor> quantize_int8_cpu(const at::Tensor& x_in, int64_t block_size, bool stochastic,
                                                     std::optional<at::Generator> generator) {
  const char* op = "quantize_int8";
  check_float_tensor(x_in, op, "x");
  check_block_size(block_size, op);
  const at::Tensor x = x_in.contiguous();
  const int64_t numel = x.numel();
  const int64_t nblocks = ceil_div(numel, block_size);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({nblocks}, x.options().dtype(at::kFloat));
  uint64_t seed = 0;
  if (stochastic) {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  PYPARALLEL_DISPATCH_FLOATING(x.scalar_type(), [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    int8_t* qp = q.mutable_data_ptr<int8_t>();
    float* sp = scales.mutable_data_ptr<float>();
    at::parallel_for(0, nblocks, block_grain(block_size), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * block_size;
        quantize_block(xp + start, std::min(block_size, numel - start), qp + start, sp + b, stochastic, seed, b);
      }
    });
  });
  return {q, scales};
}

// out[i] = q[i] * scale (fp32), then converted to out's dtype; with kAdd, acc[i] = acc[i] + q[i] * scale.
template <typename T, bool kAdd>
void dequantize_blocks(const int8_t* q, const float* scales, T* out, int64_t numel, int64_t block_size) {
  const int64_t nblocks = ceil_div(numel, block_size);
  at::parallel_for(0, nblocks, block_grain(block_size), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block_size;
      const int64_t n = std::min(block_size, numel - start);
      const float s = scales[b];
      const int8_t* qb = q + start;
      T* ob = out + start;
      for (int64_t i = 0; i < n; ++i) {
        const float v = static_cast<float>(qb[i]) * s;
        if constexpr (kAdd) {
          ob[i] = ob[i] + v;
        } else {
          ob[i] = static_cast<T>(v);
        }
      }
    }
  });
}

at::Tensor dequantize_int8_cpu(const at::Tensor& q, const at::Tensor& scales, int64_t block_size,
                               std::optional<at::ScalarType> dtype) {
  const char* op = "dequantize_int8";
  check_int8_payload(q, scales, block_size, op);
  const at::ScalarType out_type = dtype.value_or(at::kFloat);
  TORCH_CHECK(is_float_type(out_type), op, ": dtype must be float32, float16 or bfloat16, got ", out_type);
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(out_type));
  PYPARALLEL_DISPATCH_FLOATING(out_type, [&] {
    dequantize_blocks<scalar_t, false>(q.const_data_ptr<int8_t>(), scales.const_data_ptr<float>(),
                                       out.mutable_data_ptr<scalar_t>(), q.numel(), block_size);
  });
  return out;
}

void dequantize_add_cpu(at::Tensor& acc, const at::Tensor& q, const at::Tensor& scales, int64_t block_size) {
  const char* op = "dequantize_add_";
  check_int8_payload(q, scales, block_size, op);
  TORCH_CHECK(acc.scalar_type() == at::kFloat, op, ": acc must be a float32 accumulator, got ", acc.scalar_type());
  TORCH_CHECK(acc.is_contiguous(), op, ": acc must be contiguous");
  TORCH_CHECK(acc.numel() == q.numel(), op, ": acc has ", acc.numel(), " elements but q has ", q.numel());
  check_same_device(acc, q, op, "acc", "q");
  dequantize_blocks<float, true>(q.const_data_ptr<int8_t>(), scales.const_data_ptr<float>(),
                                 acc.mutable_data_ptr<float>(), q.numel(), block_size);
}

}  // namespace
}  // namespace pyparallel

TORCH_LIBRARY_IMPL(pyparallel, CPU, m) {
  m.impl("quantize_int8", &pyparallel::quantize_int8_cpu);
  m.impl("dequantize_int8", &pyparallel::dequantize_int8_cpu);
  m.impl("dequantize_add_", &pyparallel::dequantize_add_cpu);
}
