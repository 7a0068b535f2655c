// Ring all-reduce (reduce-scatter then all-gather, 2(n-1) steps), dense and int8-compressed.
// Device-generic: the arithmetic goes through ATen and our own ops via the dispatcher, so the same code
// runs Gloo with CPU tensors and NCCL with CUDA tensors.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "comm/collectives.h"
#include "comm/ring.h"
#include "comm/session.h"
#include "cpu/reduce.h"
#include "common.h"

namespace pyparallel {
namespace {

constexpr int64_t kDenseAlign = 16;  // elements: chunk starts stay 64-byte aligned for fp32
constexpr int64_t kRecvBuffers = 3;  // reduce-scatter receive buffers: two ops may run ahead of the reduction

// Last hop of an averaging reduce-scatter: (partial + own) / n, rounded once to the tensor's dtype.
void add_and_average(at::Tensor& dst, const at::Tensor& got, int n) {
  if (dst.scalar_type() == at::kFloat) {
    dst.add_(got).div_(n);
  } else {
    dst.copy_(dst.to(at::kFloat).add_(got.to(at::kFloat)).div_(n));
  }
}

}  // namespace

// Note [Dense ring]
// Reduce-scatter: at step s rank r sends chunk r - s to r + 1 and adds the chunk r - s - 1 it receives
// into its own, so chunk c accumulates x_c + x_{c+1} + ... in ring order and rank c - 1 ends up with
// its total. Each hop adds in fp32 and rounds to the tensor's dtype (partial sums travel in the
// tensor's dtype, as in NCCL). All-gather: rank r forwards the finished chunk r + 1 and every chunk it
// receives, unchanged, so every rank ends with the same bits. A tensor of at most kCarryBytes travels
// with the header check instead, where the transport can carry it (Note [Carried header]): summed in rank
// order in fp32 and rounded once, as shared memory does.
int64_t ring_all_reduce(at::Tensor& tensor, const std::string& group, bool average, int64_t segment_bytes) {
  const char* op = "ring_all_reduce_";
  at::Tensor flat = tensor.is_contiguous() ? tensor.view(-1) : tensor.contiguous().view(-1);
  Session ring(group, tensor, CollectiveHeader::of(tensor, Collective::kDense, average, 0, segment_bytes), op, &flat);
  check_float_tensor(tensor, op, "tensor");  // after the header check: a rank that raises alone would leave the others waiting
  TORCH_CHECK(segment_bytes > 0, op, ": segment_bytes must be positive, got ", segment_bytes);
  const int n = ring.size(), r = ring.rank();
  if (n == 1 || tensor.numel() == 0) return 0;
  if (ring.carried()) {  // Note [Carried header]: every rank's tensor came with the headers
    std::vector<const void*> rows(n);
    for (int q = 0; q < n; ++q) rows[q] = ring.carried_row(q);
    cpu::reduce_sources(flat.scalar_type(), rows.data(), n, flat.data_ptr(), nullptr, flat.numel(),
                        average ? static_cast<float>(n) : 1.0f);
    if (!tensor.is_contiguous()) tensor.copy_(flat.view(tensor.sizes()));
    return ring.bytes_sent();
  }

  const int64_t esize = flat.element_size();
  const Partition part(flat.numel(), n, kDenseAlign, segment_bytes / esize);
  const int64_t J = part.segments(), ops = (n - 1) * J;
  auto seg = [&](int64_t c, int64_t j) { return flat.slice(0, part.begin(mod(c, n), j), part.end(mod(c, n), j)); };
  at::Tensor tmp = at::empty({kRecvBuffers, part.max_segment()}, flat.options());
  std::vector<size_t> ids(2 * ops);

  // One schedule for both phases (Note [Ring schedule]): ops [0, ops) reduce-scatter, [ops, 2 ops)
  // all-gather. An all-gather receive overwrites the slice that reduce-scatter op s*J + j sent, so that
  // one send must be complete first (it nearly always is by then).
  ring_schedule(
      2 * ops, J, /*max_ahead=*/kRecvBuffers - 1,
      [&](int64_t p) {
        if (p < ops) {
          const int64_t s = p / J, j = p % J;
          ids[p] = ring.post(seg(r - s, j), tmp[p % kRecvBuffers].slice(0, 0, seg(r - s - 1, j).numel()), p);
        } else {
          const int64_t s = (p - ops) / J, j = (p - ops) % J;
          ring.wait(ids[s * J + j]);
          ids[p] = ring.post(seg(r + 1 - s, j), seg(r - s, j), p);
        }
      },
      [&](int64_t p) {
        ring.wait_recv(ids[p]);
        if (p >= ops) return;
        const int64_t s = p / J, j = p % J;
        at::Tensor dst = seg(r - s - 1, j);
        const at::Tensor got = tmp[p % kRecvBuffers].slice(0, 0, dst.numel());
        if (average && s == n - 2) {
          add_and_average(dst, got, n);
        } else {
          dst.add_(got);
        }
      });
  ring.finish();

  if (!tensor.is_contiguous()) tensor.copy_(flat.view(tensor.sizes()));
  return ring.bytes_sent();
}

namespace {

// Our int8 ops, reached through the dispatcher so the device's own kernels run.
void quantize_into(at::Tensor& q, at::Tensor& scales, const at::Tensor& x, int64_t block_size,
                   const std::optional<at::Tensor>& add_q, const std::optional<at::Tensor>& add_scales,
                   double divisor) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pyparallel::quantize_int8_into_", "")
                       .typed<void(at::Tensor&, at::Tensor&, const at::Tensor&, int64_t,
                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double)>();
  op.call(q, scales, x, block_size, add_q, add_scales, divisor);
}

void dequantize_into(at::Tensor& out, const at::Tensor& q, const at::Tensor& scales, int64_t block_size) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pyparallel::dequantize_int8_into_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  op.call(out, q, scales, block_size);
}

}  // namespace

// Note [Int8 ring]
// Same schedule as the dense ring, but partial sums travel as blockwise int8 (+ fp32 scales, about
// 1/4 of fp32's bytes). Chunks and segments are whole quantization blocks. In reduce-scatter the
// receiver quantizes (its own chunk + the dequantized partial) in one fused pass for the next hop; the
// owner of a finished chunk quantizes the total (divided by n first when averaging). The all-gather
// forwards those final int8 chunks unchanged, and every rank decodes the same bytes (each segment as
// soon as it arrives), so all ranks agree bitwise. Chunk c is quantized n times in all (x_c first,
// then each partial), which gives the error bound stated in pyparallel.comm.Int8.

int64_t ring_all_reduce_int8(at::Tensor& tensor, const std::string& group, bool average, int64_t block_size,
                             int64_t segment_bytes) {
  const char* op = "ring_all_reduce_int8_";
  Session ring(group, tensor,
               CollectiveHeader::of(tensor, Collective::kInt8, average, block_size, segment_bytes), op);
  check_float_tensor(tensor, op, "tensor");
  check_block_size(block_size, op);
  TORCH_CHECK(segment_bytes > 0, op, ": segment_bytes must be positive, got ", segment_bytes);
  const int n = ring.size(), r = ring.rank();
  const int64_t numel = tensor.numel();
  if (n == 1 || numel == 0) return 0;

  // This rank's input, read until the reduce-scatter ends; the all-gather then decodes into it.
  at::Tensor flat = tensor.is_contiguous() ? tensor.view(-1) : tensor.contiguous().view(-1);
  const Partition part(numel, n, block_size, segment_bytes);  // int8: one byte per element
  const int64_t J = part.segments(), ops = (n - 1) * J;
  // Every chunk's current payload (own, partial, then final) lives at its place in one int8 buffer.
  at::Tensor gq = at::empty({numel}, flat.options().dtype(at::kChar));
  at::Tensor gs = at::empty({ceil_div(numel, block_size)}, flat.options().dtype(at::kFloat));
  auto range = [&](int64_t c, int64_t j) { return std::make_pair(part.begin(mod(c, n), j), part.end(mod(c, n), j)); };
  auto q_of = [&](int64_t c, int64_t j) { auto [b, e] = range(c, j); return gq.slice(0, b, e); };
  auto s_of = [&](int64_t c, int64_t j) {
    auto [b, e] = range(c, j);  // b is block-aligned unless the segment is empty (clamped to numel)
    return b == e ? gs.slice(0, 0, 0) : gs.slice(0, b / block_size, ceil_div(e, block_size));
  };
  auto x_of = [&](int64_t c, int64_t j) { auto [b, e] = range(c, j); return flat.slice(0, b, e); };
  auto decode = [&](int64_t c, int64_t j) {
    at::Tensor out = x_of(c, j);
    dequantize_into(out, q_of(c, j), s_of(c, j), block_size);
  };
  at::Tensor tq = at::empty({kRecvBuffers, part.max_segment()}, gq.options());
  at::Tensor ts = at::empty({kRecvBuffers, ceil_div(part.max_segment(), block_size)}, gs.options());
  std::vector<std::pair<size_t, size_t>> ids(2 * ops);

  // Both phases in one schedule, as in the dense ring.
  ring_schedule(
      2 * ops, J, /*max_ahead=*/kRecvBuffers - 1,
      [&](int64_t p) {
        if (p < ops) {
          const int64_t s = p / J, j = p % J, b = p % kRecvBuffers;
          if (s == 0) {
            at::Tensor q = q_of(r, j), sc = s_of(r, j);
            quantize_into(q, sc, x_of(r, j), block_size, std::nullopt, std::nullopt, 1.0);
          }
          const int64_t recv_q = q_of(r - s - 1, j).numel(), recv_s = s_of(r - s - 1, j).numel();
          ids[p] = {ring.post(q_of(r - s, j), tq[b].slice(0, 0, recv_q), 2 * p),
                    ring.post(s_of(r - s, j), ts[b].slice(0, 0, recv_s), 2 * p + 1)};
        } else {
          const int64_t s = (p - ops) / J, j = (p - ops) % J;
          ring.wait(ids[s * J + j].first);  // the slices received into were sent by reduce-scatter op s*J + j
          ring.wait(ids[s * J + j].second);
          ids[p] = {ring.post(q_of(r + 1 - s, j), q_of(r - s, j), 2 * p),
                    ring.post(s_of(r + 1 - s, j), s_of(r - s, j), 2 * p + 1)};
        }
      },
      [&](int64_t p) {
        ring.wait_recv(ids[p].first);
        ring.wait_recv(ids[p].second);
        if (p >= ops) {
          decode(r - (p - ops) / J, (p - ops) % J);
          return;
        }
        const int64_t s = p / J, j = p % J, b = p % kRecvBuffers;
        at::Tensor q = q_of(r - s - 1, j), sc = s_of(r - s - 1, j);
        quantize_into(q, sc, x_of(r - s - 1, j), block_size, tq[b].slice(0, 0, q.numel()),
                      ts[b].slice(0, 0, sc.numel()), average && s == n - 2 ? n : 1.0);
        if (s == n - 2) decode(r - s - 1, j);  // this rank's finished chunk: its input is no longer needed
      });
  ring.finish();

  if (!tensor.is_contiguous()) tensor.copy_(flat.view(tensor.sizes()));
  return ring.bytes_sent();
}

}  // namespace pyparallel

TORCH_LIBRARY_IMPL(pyparallel, CompositeExplicitAutograd, m) {
  m.impl("ring_all_reduce_", &pyparallel::ring_all_reduce);
  m.impl("ring_all_reduce_int8_", &pyparallel::ring_all_reduce_int8);
}
