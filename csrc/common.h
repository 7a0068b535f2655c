// Argument checks and small helpers shared by the CPU (.cpp) and CUDA (.cu) glue.
// No kernels here: this header is about validating user input with messages that name the argument.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>

// CPU inner loops marked with this are compiled twice, for AVX2 and for the baseline ISA; the loader
// picks the one the machine runs (GCC function multi-versioning).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define PYPARALLEL_VECTORIZE __attribute__((target_clones("avx2", "default")))
#else
#define PYPARALLEL_VECTORIZE
#endif

namespace pyparallel {

// The three floating types every op accepts; defines scalar_t inside the body. Callers check the dtype
// first (check_float_tensor) so users see a message naming the op and the argument.
#define PYPARALLEL_DISPATCH_FLOATING(TYPE, ...)                                   \
  AT_DISPATCH_SWITCH(TYPE, "pyparallel", AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                             AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                             AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Blocks whose absmax is below 2^-120 quantize to zero (scale 0): 127/absmax would overflow fp32.
// As float bits: exponent field 127 - 120 = 7.
constexpr uint32_t kMinAbsmaxBits = 0x03800000u;
constexpr uint32_t kInfBits = 0x7f800000u;

// Symmetric int8 uses [-127, 127]; -128 is never produced so that negation is exact.
constexpr float kInt8Max = 127.0f;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_float_type(t.scalar_type()), op, ": ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_block_size(int64_t block_size, const char* op) {
  TORCH_CHECK(block_size > 0, op, ": block_size must be positive, got ", block_size);
  TORCH_CHECK(block_size <= (int64_t{1} << 30), op, ": block_size must be at most 2^30, got ", block_size);
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na,
                              const char* nb) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", na, " is on ", a.device(), " but ", nb, " is on ",
              b.device());
}

// Validates (q, scales) as produced by quantize_int8 for `numel` elements.
inline void check_int8_payload(const at::Tensor& q, const at::Tensor& scales, int64_t block_size,
                               const char* op) {
  check_block_size(block_size, op);
  TORCH_CHECK(q.scalar_type() == at::kChar, op, ": q must be int8, got ", q.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kFloat, op, ": scales must be float32, got ", scales.scalar_type());
  check_same_device(q, scales, op, "q", "scales");
  TORCH_CHECK(q.is_contiguous() && scales.is_contiguous(), op, ": q and scales must be contiguous");
  const int64_t want = ceil_div(q.numel(), block_size);
  TORCH_CHECK(scales.numel() == want, op, ": scales has ", scales.numel(), " elements but q has ", q.numel(),
              " elements, which with block_size ", block_size, " needs ", want);
}

// `out` receives a dequantized payload q in place (dequantize_int8_into_, dequantize_add_).
inline void check_dequantize_out(const at::Tensor& out, const at::Tensor& q, const char* op, const char* name) {
  check_float_tensor(out, op, name);
  TORCH_CHECK(out.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(out.numel() == q.numel(), op, ": ", name, " has ", out.numel(), " elements but q has ", q.numel());
  check_same_device(out, q, op, name, "q");
}

inline void check_quantize_into_args(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& x,
                                     int64_t block_size, const std::optional<at::Tensor>& add_q,
                                     const std::optional<at::Tensor>& add_scales, double divisor, const char* op) {
  check_float_tensor(x, op, "x");
  check_int8_payload(q, scales, block_size, op);
  TORCH_CHECK(q.numel() == x.numel(), op, ": q has ", q.numel(), " elements but x has ", x.numel());
  check_same_device(q, x, op, "q", "x");
  TORCH_CHECK(add_q.has_value() == add_scales.has_value(), op, ": pass both add_q and add_scales, or neither");
  if (add_q.has_value()) {
    check_int8_payload(*add_q, *add_scales, block_size, op);
    TORCH_CHECK(add_q->numel() == x.numel(), op, ": add_q has ", add_q->numel(), " elements but x has ", x.numel());
    check_same_device(*add_q, x, op, "add_q", "x");
  }
  TORCH_CHECK(std::isfinite(divisor) && divisor != 0.0, op, ": divisor must be finite and non-zero, got ", divisor);
}

inline at::ScalarType index_dtype_or_default(std::optional<at::ScalarType> index_dtype, const char* op) {
  const at::ScalarType t = index_dtype.value_or(at::kLong);
  TORCH_CHECK(t == at::kLong || t == at::kInt, op, ": index_dtype must be int64 or int32, got ", t);
  return t;
}

inline void check_topk_args(const at::Tensor& x, int64_t k, const std::optional<at::Tensor>& residual,
                            at::ScalarType index_dtype, const char* op) {
  check_float_tensor(x, op, "x");
  TORCH_CHECK(k >= 0 && k <= x.numel(), op, ": k must be in [0, x.numel()] = [0, ", x.numel(), "], got ", k);
  if (index_dtype == at::kInt) {
    TORCH_CHECK(x.numel() <= INT32_MAX, op, ": int32 indices cannot address ", x.numel(), " elements");
  }
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.scalar_type() == x.scalar_type(), op, ": residual must have x's dtype ", x.scalar_type(),
                ", got ", r.scalar_type());
    TORCH_CHECK(r.numel() == x.numel(), op, ": residual has ", r.numel(), " elements but x has ", x.numel());
    check_same_device(x, r, op, "x", "residual");
    TORCH_CHECK(r.is_contiguous(), op, ": residual must be contiguous (it is updated in place)");
  }
}

inline void check_scatter_args(const at::Tensor& out, const at::Tensor& indices, const at::Tensor& values,
                               const char* op) {
  check_float_tensor(out, op, "out");
  TORCH_CHECK(values.scalar_type() == out.scalar_type(), op, ": values must have out's dtype ",
              out.scalar_type(), ", got ", values.scalar_type());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, op,
              ": indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK(indices.dim() <= 1 && values.dim() <= 1, op, ": indices and values must be 1-D");
  TORCH_CHECK(indices.numel() == values.numel(), op, ": indices has ", indices.numel(),
              " elements but values has ", values.numel());
  check_same_device(out, indices, op, "out", "indices");
  check_same_device(out, values, op, "out", "values");
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
}

// Checks shared by bucket_flatten and bucket_unflatten; returns the total element count.
inline int64_t check_bucket_args(at::TensorList tensors, const at::Tensor& flat, const char* op) {
  TORCH_CHECK(flat.is_contiguous(), op, ": the flat bucket must be contiguous");
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.scalar_type() == flat.scalar_type(), op, ": tensors[", i, "] is ", t.scalar_type(),
                " but the flat bucket is ", flat.scalar_type());
    TORCH_CHECK(t.device() == flat.device(), op, ": tensors[", i, "] is on ", t.device(),
                " but the flat bucket is on ", flat.device());
    total += t.numel();
  }
  TORCH_CHECK(total == flat.numel(), op, ": the tensors hold ", total, " elements but the flat bucket has ",
              flat.numel());
  return total;
}

}  // namespace pyparallel
