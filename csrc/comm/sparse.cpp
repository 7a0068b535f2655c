// Top-k all-reduce: every rank compresses its tensor to k (value, index) pairs, the pairs are
// all-gathered (they cannot be summed on the way: the index sets differ), and every rank decodes all n
// payloads with a scatter-add in rank order, so every rank computes the same bits. An average is
// sum_q (values_q / n): only the sent values are divided, never the dense tensor.
// Two transports: fp32 on the CPU streams the entries to every peer while selecting them (Note
// [Streamed sparse all-gather]); other dtypes and CUDA tensors select first, then run a ring all-gather.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "comm/collectives.h"
#include "comm/ring.h"
#include "comm/session.h"
#include "common.h"
#include "cpu/topk_stream.h"

namespace pyparallel {
namespace {

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

// Note [Streamed sparse all-gather]
// fp32 CPU tensors (the Gloo path): every rank sends its k entries straight to every other rank (each
// link carries the same (n - 1) payloads as a ring all-gather would, with one hop of latency), and it
// sends them while it is still selecting them: TopkStream emits the surely-selected entries during its
// pass over the input, and every full message of `m` entries goes out at once. Message sizes are fixed
// by k alone, so every receive is posted before the pass starts. A last small message per peer says
// whether the streamed entries stand; if the selection's bracket missed (rare), they are replaced by
// one message of all k exact entries. Decoding is the same as below: rank order, values / n for avg.
constexpr int64_t kMinMessageEntries = 4096;  // 32 KB: per-message costs stay small
constexpr int64_t kMaxMessages = 4;

int64_t topk_all_reduce_streamed(at::Tensor& tensor, Session& ring, int64_t k,
                                 const std::optional<at::Tensor>& residual, bool average) {
  const int n = ring.size(), me = ring.rank();
  const int64_t numel = tensor.numel();
  const int64_t m = std::max(kMinMessageEntries, ceil_div(k, kMaxMessages));
  const int64_t messages = ceil_div(k, m);
  const int64_t status_seq = messages, resend_seq = messages + 1;
  auto message = [&](const at::Tensor& t, int64_t j) { return t.slice(0, j * m, std::min(k, (j + 1) * m)); };

  // [n, k, 2] int32: (index, float bits) pairs; row `me` holds this rank's own entries.
  at::Tensor all = at::empty({n, k, 2}, tensor.options().dtype(at::kInt));
  at::Tensor status = at::empty({n}, tensor.options().dtype(at::kLong));
  auto entries_of = [&](int q) { return reinterpret_cast<SparseEntry*>(all.data_ptr<int32_t>()) + q * k; };
  std::vector<std::vector<size_t>> recvs(n);
  for (int q = 0; q < n; ++q) {
    if (q == me) continue;
    for (int64_t j = 0; j < messages; ++j) recvs[q].push_back(ring.post_recv(message(all[q], j), q, j));
    recvs[q].push_back(ring.post_recv(status.slice(0, q, q + 1), q, status_seq));
  }

  at::Tensor mine = all[me];
  float* x = tensor.data_ptr<float>();
  float* r = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  TopkStream stream(x, r, numel, k, /*zero_input=*/r != nullptr, entries_of(me));
  std::vector<size_t> sends;
  int64_t sent = 0;
  auto send_through = [&](int64_t upto) {
    for (; sent < upto; ++sent)
      for (int q = 0; q < n; ++q)
        if (q != me) sends.push_back(ring.post_send(message(mine, sent), q, sent));
  };
  while (stream.scanning()) {
    stream.scan_some();
    if (stream.valid()) send_through(stream.ready() / m);
  }
  const bool streamed_ok = stream.finish();
  if (!streamed_ok) {
    for (size_t id : sends) ring.wait(id);  // the transport must be done reading the wrong prefix
    stream.exact();
  }
  send_through(messages);  // the receivers expect every message; after a miss they discard them
  const at::Tensor my_status = at::full({1}, streamed_ok ? 1 : 2, status.options());
  for (int q = 0; q < n; ++q) {
    if (q == me) continue;
    ring.post_send(my_status, q, status_seq);
    if (!streamed_ok) ring.post_send(mine, q, resend_seq);
  }
  if (r == nullptr) tensor.zero_();  // x was read to the end; with a residual the pass zeroed it

  // Decode in rank order (the same additions on every rank), each rank's entries as soon as they are
  // final here: this rank's own now, a peer's message by message as it arrives, so most of the decoding
  // overlaps the last bytes on the wire. A peer's streamed entries stand only if its status says so at
  // the end; until then an undo log keeps the values they overwrote.
  const float div = average ? static_cast<float>(n) : 1.0f;
  std::vector<float> undo(k);
  auto decode = [&](int q, int64_t begin, int64_t end, float* log) {
    scatter_add_entries(x, numel, entries_of(q) + begin, end - begin, div, log == nullptr ? nullptr : log + begin, q);
  };
  for (int q = 0; q < n; ++q) {
    if (q == me) {
      decode(q, 0, k, nullptr);
      continue;
    }
    for (int64_t j = 0; j < messages; ++j) {
      ring.wait_recv(recvs[q][j]);
      decode(q, j * m, std::min(k, (j + 1) * m), undo.data());
    }
    ring.wait_recv(recvs[q][messages]);
    const int64_t s = status[q].item<int64_t>();
    TORCH_CHECK(s == 1 || s == 2, "topk_all_reduce_: corrupt status ", s, " from rank ", q);
    if (s == 2) {  // its selection's bracket missed: take back what was decoded, then decode the resend
      const SparseEntry* e = entries_of(q);
      for (int64_t j = 0; j < k; ++j) x[e[j].index] = undo[j];  // indices are distinct within one rank
      ring.wait_recv(ring.post_recv(all[q], q, resend_seq));
      decode(q, 0, k, nullptr);
    }
  }
  ring.finish();
  return ring.bytes_sent();
}

}  // namespace

int64_t topk_all_reduce(at::Tensor& tensor, const std::string& group, int64_t k,
                        const std::optional<at::Tensor>& residual, bool average) {
  const char* op = "topk_all_reduce_";
  Session ring(group, tensor, CollectiveHeader::of(tensor, Collective::kTopk, average, k), op);
  const at::ScalarType itype = tensor.numel() <= INT32_MAX ? at::kInt : at::kLong;
  check_topk_args(tensor, k, residual, itype, op);
  const int n = ring.size(), r = ring.rank();
  if (k == 0) {  // nothing is sent (every rank agreed on k in the header): all of x stays in the residual
    if (residual.has_value()) residual->view(-1).add_(tensor.reshape(-1));
    tensor.zero_();
    return 0;
  }
  if (n > 1 && tensor.device().is_cpu() && tensor.scalar_type() == at::kFloat && tensor.is_contiguous() &&
      itype == at::kInt) {
    return topk_all_reduce_streamed(tensor, ring, k, residual, average);
  }

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
  if (n > 1) {
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

}  // namespace pyparallel

TORCH_LIBRARY_IMPL(pyparallel, CompositeExplicitAutograd, m) {
  m.impl("topk_all_reduce_", &pyparallel::topk_all_reduce);
}
