// Top-k all-reduce: every rank compresses its tensor to k (value, index) pairs, the pairs travel by a
// ring all-gather (they cannot be summed on the way: the index sets differ), and every rank decodes
// all n payloads with a scatter-add in rank order, so every rank computes the same bits. An average is
// sum_q (values_q / n): only the sent values are divided, never the dense tensor.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "comm/ring.h"
#include "common.h"

namespace pyparallel {
namespace {

constexpr int64_t kTopkKind = 2;
constexpr int64_t kSlotAlign = 8;  // bytes: the index and value parts of a slot stay aligned

std::tuple<at::Tensor, at::Tensor> topk(const at::Tensor& x, int64_t k, const std::optional<at::Tensor>& residual,
                                        at::ScalarType index_dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pyparallel::topk_compress", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t,
                                                                 const std::optional<at::Tensor>&,
                                                                 std::optional<at::ScalarType>)>();
  return op.call(x, k, residual, index_dtype);
}

void scatter_add(at::Tensor& out, const at::Tensor& indices, const at::Tensor& values) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pyparallel::scatter_add_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  op.call(out, indices, values);
}

int64_t topk_all_reduce(at::Tensor& tensor, const std::string& group, int64_t k,
                        const std::optional<at::Tensor>& residual, bool average, bool verify) {
  const char* op = "topk_all_reduce_";
  Ring ring(group, tensor);
  if (verify) {
    ring.verify({kTopkKind, static_cast<int64_t>(tensor.scalar_type()), tensor.numel(), average, k,
                 static_cast<int64_t>(tensor.device().type())},
                op);
  }
  const at::ScalarType itype = tensor.numel() <= INT32_MAX ? at::kInt : at::kLong;
  check_topk_args(tensor, k, residual, itype, op);
  const int n = ring.size(), r = ring.rank();

  auto [values, indices] = topk(tensor, k, residual, itype);
  // One slot per rank: [indices | values], each part padded to kSlotAlign bytes.
  const int64_t index_bytes = ceil_div(k * indices.element_size(), kSlotAlign) * kSlotAlign;
  const int64_t value_bytes = ceil_div(k * values.element_size(), kSlotAlign) * kSlotAlign;
  const int64_t slot_bytes = index_bytes + value_bytes;
  at::Tensor slots = at::zeros({n, slot_bytes}, tensor.options().dtype(at::kByte));
  auto index_part = [&](int q) { return slots[q].slice(0, 0, k * indices.element_size()).view(itype); };
  auto value_part = [&](int q) {
    return slots[q].slice(0, index_bytes, index_bytes + k * values.element_size()).view(tensor.scalar_type());
  };
  index_part(r).copy_(indices);
  value_part(r).copy_(values);

  // Decoded in place (or into a contiguous copy), zeroed while the first step is on the wire.
  at::Tensor out = tensor.is_contiguous() ? tensor.view(-1) : at::empty({tensor.numel()}, tensor.options());
  if (n > 1 && k > 0) {
    // Ring all-gather of whole slots: at step s rank r forwards slot r - s and receives slot r - s - 1.
    std::vector<size_t> ids(n - 1);
    ring_schedule(
        n - 1, /*segments=*/1, /*max_ahead=*/1,
        [&](int64_t s) { ids[s] = ring.post(slots[mod(r - s, n)], slots[mod(r - s - 1, n)], s); },
        [&](int64_t s) {
          if (s == 0) out.zero_();
          ring.wait_recv(ids[s]);
        });
    ring.finish();
  } else {
    out.zero_();
  }
  for (int q = 0; q < n; ++q) {  // rank order on every rank; an average divides the k values, not the tensor
    at::Tensor values_q = value_part(q);
    if (average) values_q.div_(n);
    scatter_add(out, index_part(q), values_q);
  }
  if (!tensor.is_contiguous()) tensor.copy_(out.view(tensor.sizes()));
  return ring.bytes_sent();
}

}  // namespace
}  // namespace pyparallel

TORCH_LIBRARY_IMPL(pyparallel, CompositeExplicitAutograd, m) {
  m.impl("topk_all_reduce_", &pyparallel::topk_all_reduce);
}
