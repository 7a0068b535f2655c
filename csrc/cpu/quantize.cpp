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
// quantize_int8_into_ quantizes y = (x + q_add * scale_add) / divisor, each step rounded in fp32: the
// fused hop of the int8 ring (Note [Int8 ring], csrc/comm/allreduce.cpp).
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

// Elements are produced as fp32 in chunks of this size, so the fp32 loops below see every input dtype.
constexpr int64_t kChunk = 1024;

PYPARALLEL_VECTORIZE int32_t absmax_bits(const float* v, int64_t n) {
  int32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    int32_t b;
    std::memcpy(&b, v + i, sizeof(b));
    m = std::max(m, b & 0x7fffffff);  // bit order of |v| is numeric order, NaN above Inf
  }
  return m;
}

// round-half-to-even for |v| < 2^22 without a libm call: adding 1.5 * 2^23 makes the unit the last bit.
PYPARALLEL_VECTORIZE void quantize_nearest(const float* v, int64_t n, float inv, int8_t* q) {
  constexpr float kMagic = 12582912.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float r = (v[i] * inv + kMagic) - kMagic;
    q[i] = static_cast<int8_t>(static_cast<int32_t>(std::min(std::max(r, -kInt8Max), kInt8Max)));
  }
}

void quantize_stochastic(const float* v, int64_t n, float inv, int8_t* q, at::Philox4_32& rng) {
  for (int64_t i = 0; i < n; ++i) {
    const float u = static_cast<float>(rng() >> 8) * 0x1p-24f;  // uniform in [0, 1), 24 bits
    const float r = std::floor(v[i] * inv + u);
    q[i] = static_cast<int8_t>(static_cast<int32_t>(std::min(std::max(r, -kInt8Max), kInt8Max)));
  }
}

PYPARALLEL_VECTORIZE void dequantize_into(const int8_t* q, int64_t n, float s, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(q[i]) * s;
}

PYPARALLEL_VECTORIZE void dequantize_accumulate(const int8_t* q, int64_t n, float s, float* acc) {
  for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + static_cast<float>(q[i]) * s;
}

PYPARALLEL_VECTORIZE void divide(float* v, int64_t n, float d) {
  for (int64_t i = 0; i < n; ++i) v[i] = v[i] / d;
}

// The fp32 values of one block, chunk by chunk: x converted, plus an optional int8 payload decoded with
// its (single) block scale, divided by `divisor` unless it is 1.
template <typename T>
struct BlockSource {
  const T* x;
  const int8_t* add_q;  // nullptr: nothing to add
  float add_scale;
  float divisor;

  // Returns a pointer to len fp32 values starting at `start` (x itself when nothing needs computing).
  const float* get(int64_t start, int64_t len, float* buf) const {
    if constexpr (std::is_same_v<T, float>) {
      if (add_q == nullptr && divisor == 1.0f) return x + start;
      std::memcpy(buf, x + start, len * sizeof(float));
    } else {
      for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<float>(x[start + i]);
    }
    if (add_q != nullptr) dequantize_accumulate(add_q + start, len, add_scale, buf);
    if (divisor != 1.0f) divide(buf, len, divisor);
    return buf;
  }
};

template <typename T>
void quantize_block(const BlockSource<T>& src, int64_t n, int8_t* q, float* scale, at::Philox4_32* rng) {
  float buf[kChunk];
  int32_t m = 0;
  const float* v = nullptr;
  for (int64_t c = 0; c < n; c += kChunk) {
    v = src.get(c, std::min(kChunk, n - c), buf);
    m = std::max(m, absmax_bits(v, std::min(kChunk, n - c)));
  }
  float absmax;
  std::memcpy(&absmax, &m, sizeof(absmax));
  if (m < static_cast<int32_t>(kMinAbsmaxBits) || m >= static_cast<int32_t>(kInfBits)) {
    *scale = m < static_cast<int32_t>(kMinAbsmaxBits) ? 0.0f : absmax;
    std::memset(q, 0, n);
    return;
  }
  *scale = absmax / kInt8Max;
  const float inv = kInt8Max / absmax;
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t len = std::min(kChunk, n - c);
    if (n > kChunk) v = src.get(c, len, buf);  // a one-chunk block is still in buf (or is x itself)
    if (rng != nullptr) {
      quantize_stochastic(v, len, inv, q + c, *rng);
    } else {
      quantize_nearest(v, len, inv, q + c);
    }
  }
}

// Grain: enough blocks per task to amortize scheduling (~64K elements).
inline int64_t block_grain(int64_t block_size) { return std::max<int64_t>(1, 65536 / block_size); }

// Quantizes blocks of (x + add) / divisor into q and scales, in parallel over blocks.
template <typename T>
void quantize_blocks(const T* x, int64_t numel, int64_t block_size, const int8_t* add_q, const float* add_scales,
                     float divisor, int8_t* q, float* scales, std::optional<uint64_t> seed) {
  const int64_t nblocks = ceil_div(numel, block_size);
  at::parallel_for(0, nblocks, block_grain(block_size), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block_size;
      const BlockSource<T> src{x + start, add_q ? add_q + start : nullptr, add_q ? add_scales[b] : 0.0f, divisor};
      std::optional<at::Philox4_32> rng;
      if (seed) rng.emplace(*seed, static_cast<uint64_t>(b), 0);
      quantize_block(src, std::min(block_size, numel - start), q + start, scales + b, rng ? &*rng : nullptr);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_cpu(const at::Tensor& x_in, int64_t block_size, bool stochastic,
                                                     std::optional<at::Generator> generator) {
  const char* op = "quantize_int8";
  check_float_tensor(x_in, op, "x");
  check_block_size(block_size, op);
  const at::Tensor x = x_in.contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({ceil_div(x.numel(), block_size)}, x.options().dtype(at::kFloat));
  std::optional<uint64_t> seed;
  if (stochastic) {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  PYPARALLEL_DISPATCH_FLOATING(x.scalar_type(), [&] {
    quantize_blocks<scalar_t>(x.const_data_ptr<scalar_t>(), x.numel(), block_size, nullptr, nullptr, 1.0f,
                              q.mutable_data_ptr<int8_t>(), scales.mutable_data_ptr<float>(), seed);
  });
  return {q, scales};
}

void quantize_int8_into_cpu(at::Tensor& q, at::Tensor& scales, const at::Tensor& x_in, int64_t block_size,
                            const std::optional<at::Tensor>& add_q, const std::optional<at::Tensor>& add_scales,
                            double divisor) {
  const char* op = "quantize_int8_into_";
  check_quantize_into_args(q, scales, x_in, block_size, add_q, add_scales, divisor, op);
  const at::Tensor x = x_in.contiguous();
  PYPARALLEL_DISPATCH_FLOATING(x.scalar_type(), [&] {
    quantize_blocks<scalar_t>(x.const_data_ptr<scalar_t>(), x.numel(), block_size,
                              add_q ? add_q->const_data_ptr<int8_t>() : nullptr,
                              add_q ? add_scales->const_data_ptr<float>() : nullptr, static_cast<float>(divisor),
                              q.mutable_data_ptr<int8_t>(), scales.mutable_data_ptr<float>(), std::nullopt);
  });
}

// out = q * scale per block (fp32, then out's dtype), or with kAdd: acc = acc + q * scale (fp32 acc).
template <typename T, bool kAdd>
void dequantize_blocks(const int8_t* q, const float* scales, T* out, int64_t numel, int64_t block_size) {
  const int64_t nblocks = ceil_div(numel, block_size);
  at::parallel_for(0, nblocks, block_grain(block_size), [&](int64_t b0, int64_t b1) {
    float buf[kChunk];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block_size, n = std::min(block_size, numel - start);
      for (int64_t c = start; c < start + n; c += kChunk) {
        const int64_t len = std::min(kChunk, start + n - c);
        if constexpr (kAdd) {
          dequantize_accumulate(q + c, len, scales[b], out + c);
        } else if constexpr (std::is_same_v<T, float>) {
          dequantize_into(q + c, len, scales[b], out + c);
        } else {
          dequantize_into(q + c, len, scales[b], buf);
          for (int64_t i = 0; i < len; ++i) out[c + i] = static_cast<T>(buf[i]);
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

void dequantize_int8_into_cpu(at::Tensor& out, const at::Tensor& q, const at::Tensor& scales, int64_t block_size) {
  const char* op = "dequantize_int8_into_";
  check_int8_payload(q, scales, block_size, op);
  check_dequantize_out(out, q, op, "out");
  PYPARALLEL_DISPATCH_FLOATING(out.scalar_type(), [&] {
    dequantize_blocks<scalar_t, false>(q.const_data_ptr<int8_t>(), scales.const_data_ptr<float>(),
                                       out.mutable_data_ptr<scalar_t>(), q.numel(), block_size);
  });
}

void dequantize_add_cpu(at::Tensor& acc, const at::Tensor& q, const at::Tensor& scales, int64_t block_size) {
  const char* op = "dequantize_add_";
  check_int8_payload(q, scales, block_size, op);
  TORCH_CHECK(acc.scalar_type() == at::kFloat, op, ": acc must be a float32 accumulator, got ", acc.scalar_type());
  check_dequantize_out(acc, q, op, "acc");
  dequantize_blocks<float, true>(q.const_data_ptr<int8_t>(), scales.const_data_ptr<float>(),
                                 acc.mutable_data_ptr<float>(), q.numel(), block_size);
}

}  // namespace
}  // namespace pyparallel

TORCH_LIBRARY_IMPL(pyparallel, CPU, m) {
  m.impl("quantize_int8", &pyparallel::quantize_int8_cpu);
  m.impl("quantize_int8_into_", &pyparallel::quantize_int8_into_cpu);
  m.impl("dequantize_int8", &pyparallel::dequantize_int8_cpu);
  m.impl("dequantize_int8_into_", &pyparallel::dequantize_int8_into_cpu);
  m.impl("dequantize_add_", &pyparallel::dequantize_add_cpu);
}
