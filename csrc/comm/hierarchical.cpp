// Hierarchical all-reduce: exact inside a host (shared memory), compressed (optionally) across hosts.
//
// Note [Hierarchical all-reduce]
// The host's ranks reduce-scatter through shared memory, so local rank l holds the host's sum of region
// l (Note [Shared-memory collectives]); local rank l of every host then all-reduces that region with the
// local ranks l of the other hosts, over the inter-host group, with the caller's compression (our dense
// ring, the int8 ring, or top-k with error feedback, whose residual is kept by the region's owner); an
// average then divides by the world size; and the host's ranks all-gather the regions. Only the
// inter-host step crosses the network, each region once per host. Every host has the same number of
// ranks (the policy checks), so every host cuts the same regions, and every step gives the same bits
// on every rank that computes it, so all ranks end with the same bits.
//
// Note [Pipelined hierarchical all-reduce]
// The inter-host hop is the slow one and leaves the CPU idle while bytes are on the wire, so the tensor
// goes through in pieces of piece_bytes (0: one piece): while piece i crosses hosts, on a thread of its
// own, the calling thread reduce-scatters piece i+1 and all-gathers piece i-1 through shared memory.
// Every local rank runs its shared-memory steps in one order (RS 0, RS 1, AG 0, RS 2, AG 1, ...) and every
// rank runs its inter-host steps in piece order, so both sequences line up across ranks. Each piece is
// cut into regions and crosses hosts exactly as a whole tensor of its size would (the reference,
// pyparallel.reference.hierarchical_all_reduce, goes piece by piece too), so the bits depend on the piece
// size: every rank states it in the header.
#include <torch/library.h>

#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

#include "comm/collectives.h"
#include "comm/header.h"
#include "comm/session.h"
#include "comm/shm.h"
#include "common.h"

namespace pyparallel {
namespace {

// Runs cross(i) for i = 0, 1, ... on its own thread, each once post(i) has said piece i is ready.
class CrossHostSteps {
 public:
  CrossHostSteps(int64_t pieces, std::function<int64_t(int64_t)> cross)
      : cross_(std::move(cross)), thread_([this, pieces] { loop(pieces); }) {}

  // Stops after the piece in flight (a failed call leaves the rest unposted) and joins: the thread
  // writes into the caller's tensor, so it must be done before the call returns.
  ~CrossHostSteps() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  void post(int64_t piece) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      posted_ = piece + 1;
    }
    cv_.notify_all();
  }

  // Waits until piece `piece` has crossed; rethrows the error of any piece that failed.
  void wait(int64_t piece) {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return done_ > piece || error_; });
    if (error_) std::rethrow_exception(error_);
  }

  int64_t sent() {
    std::lock_guard<std::mutex> lock(mutex_);
    return sent_;
  }

 private:
  void loop(int64_t pieces) {
    for (int64_t i = 0; i < pieces; ++i) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return posted_ > i || stop_; });
        if (posted_ <= i) return;
      }
      try {
        const int64_t sent = cross_(i);
        std::lock_guard<std::mutex> lock(mutex_);
        sent_ += sent;
        done_ = i + 1;
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        error_ = std::current_exception();
      }
      cv_.notify_all();
      if (error_) return;  // the inter-host group is marked failed: later pieces would raise anyway
    }
  }

  std::function<int64_t(int64_t)> cross_;
  std::mutex mutex_;
  std::condition_variable cv_;
  int64_t posted_ = 0, done_ = 0, sent_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
  std::thread thread_;  // last: started once everything above exists
};

// What a rank that leaves a hierarchical all-reduce part-way tells its host's other ranks.
std::string left_because(const char* op, const std::exception& e) {
  std::string why = e.what();
  why = why.substr(0, why.find('\n'));  // without the C++ backtrace torch appends
  return std::string(op) + ": it left the collective part-way: " + why;
}

int64_t hierarchical_all_reduce(at::Tensor& tensor, const std::string& comm, const std::string& cross_group,
                                int64_t world_size, bool average, int64_t compression, int64_t param,
                                const std::optional<at::Tensor>& residual, int64_t piece_bytes) {
  const char* op = "hierarchical_all_reduce_";
  check_float_tensor(tensor, op, "tensor");
  TORCH_CHECK(tensor.device().is_cpu(), op, ": tensor must be on the CPU, got ", tensor.device());
  TORCH_CHECK(world_size >= 1, op, ": world_size must be positive, got ", world_size);
  TORCH_CHECK(piece_bytes >= 0, op, ": piece_bytes must be >= 0 (0: one piece), got ", piece_bytes);
  const auto kind = static_cast<Collective>(compression);
  TORCH_CHECK(kind == Collective::kDense || kind == Collective::kInt8 || kind == Collective::kTopk, op,
              ": compression must be 0 (none), 1 (int8) or 2 (top-k), got ", compression);
  if (kind == Collective::kInt8) check_block_size(param, op);
  if (kind == Collective::kTopk) {
    TORCH_CHECK(param >= 0 && param <= tensor.numel(), op, ": k must be in [0, ", tensor.numel(), "], got ", param);
  }
  if (residual.has_value()) {
    TORCH_CHECK(kind == Collective::kTopk, op, ": a residual is only used with top-k compression");
    TORCH_CHECK(residual->numel() == tensor.numel() && residual->scalar_type() == tensor.scalar_type() &&
                    residual->is_contiguous() && residual->device() == tensor.device(),
                op, ": residual must be a contiguous tensor like tensor (", tensor.numel(), " elements of ",
                tensor.scalar_type(), ")");
  }
  std::shared_ptr<ShmComm> shm = shm_comm(comm);
  at::Tensor flat = tensor.is_contiguous() ? tensor.view(-1) : tensor.contiguous().view(-1);
  const int64_t numel = flat.numel();
  // Every piece's shared-memory steps state the whole call (numel, compression, piece size), so ranks
  // that disagree on any of it fail at the first step, before anything crosses hosts.
  const auto header =
      CollectiveHeader::of(flat, Collective::kHierarchical, average, (compression << 32) | param, piece_bytes);
  const int64_t piece_numel = piece_bytes == 0 ? std::max<int64_t>(numel, 1)
                                               : std::max<int64_t>(1, piece_bytes / flat.element_size());
  const int64_t pieces = std::max<int64_t>(1, ceil_div(numel, piece_numel));
  auto piece = [&](int64_t i) { return flat.slice(0, i * piece_numel, std::min(numel, (i + 1) * piece_numel)); };

  // The inter-host all-reduce of this rank's region of piece i, then the average's division.
  auto cross = [&](int64_t i) -> int64_t {
    const int64_t p0 = i * piece_numel;
    at::Tensor part = piece(i);
    const auto [b, e] = shm->region(part.numel(), shm->rank());
    at::Tensor mine = part.slice(0, b, e);
    int64_t sent = 0;
    switch (kind) {
      case Collective::kDense:
        sent = ring_all_reduce(mine, cross_group, false, kDefaultSegmentBytes);
        break;
      case Collective::kInt8:
        sent = ring_all_reduce_int8(mine, cross_group, false, param, kDefaultSegmentBytes);
        break;
      default: {  // top-k: the same fraction of this region as of the tensor
        const int64_t k = numel == 0 ? 0 : std::min(e - b, ceil_div(param * (e - b), numel));
        std::optional<at::Tensor> r;
        if (residual.has_value()) r = residual->view(-1).slice(0, p0 + b, p0 + e);
        sent = topk_all_reduce(mine, cross_group, k, r, false);
      }
    }
    if (average) mine.div_(world_size);
    return sent;
  };

  at::Tensor first = piece(0);
  std::exception_ptr host_disagrees;
  try {
    shm->reduce_scatter(first, header, op);
  } catch (const c10::Error&) {
    if (shm->failed()) throw;
    host_disagrees = std::current_exception();  // the other hosts learn it below
  }
  // Note [Whole call checked across hosts]
  // The inter-host steps compare only what they see: one region's numel and k, and never the reduction
  // (they all sum). Hosts whose ranks agree among themselves but not with another host's (avg here and
  // sum there, a different numel or k) would go on: a silent wrong result, or some local ranks' regions
  // matching across hosts while others' do not, so part of a host left the collective and the rest
  // waited for it. So every rank checks the whole call's header with its inter-host group first: each
  // inter-host group compares the same host headers, so every rank gets the same verdict. A host whose
  // ranks disagree sends a header no rank can match (numel -1), so the other hosts raise too. It costs
  // one more small exchange across hosts per call; the inter-host steps' own checks stay as they were.
  {
    CollectiveHeader across = header;
    if (host_disagrees) across.numel = -1;
    try {
      Session check(cross_group, flat, across, op);
    } catch (const std::exception& e) {
      if (!group_failure(cross_group).empty()) shm->abort(left_because(op, e));  // Note [Published failures]
      if (host_disagrees) std::rethrow_exception(host_disagrees);  // this host's own, more precise error
      throw;
    }
    if (host_disagrees) std::rethrow_exception(host_disagrees);
  }
  int64_t sent = 0;
  // From here every rank has agreed on the whole call: a rank that raises has lost a peer or a transfer,
  // and leaves its host's ranks waiting at shared-memory barriers it will not reach. It publishes that
  // (Note [Published failures] in shm.cpp) before it waits for its inter-host thread.
  try {
    if (pieces == 1) {
      sent = cross(0);
    } else {
      CrossHostSteps steps(pieces, cross);
      try {
        steps.post(0);
        for (int64_t i = 1; i < pieces; ++i) {
          at::Tensor next = piece(i);
          shm->reduce_scatter(next, header, op);
          steps.post(i);
          steps.wait(i - 1);
          at::Tensor done = piece(i - 1);
          shm->all_gather(done, header, op);
        }
        steps.wait(pieces - 1);
      } catch (const std::exception& e) {
        shm->abort(left_because(op, e));
        throw;
      }
      sent = steps.sent();
    }
    at::Tensor last = piece(pieces - 1);
    shm->all_gather(last, header, op);
  } catch (const std::exception& e) {
    shm->abort(left_because(op, e));
    throw;
  }
  if (!tensor.is_contiguous()) tensor.copy_(flat.view(tensor.sizes()));
  return sent;
}

void release_group(const std::string& group) { release_group_state(group); }

}  // namespace
}  // namespace pyparallel

TORCH_LIBRARY_IMPL(pyparallel, CompositeExplicitAutograd, m) {
  m.impl("hierarchical_all_reduce_", &pyparallel::hierarchical_all_reduce);
}

TORCH_LIBRARY_IMPL(pyparallel, CatchAll, m) {
  m.impl("release_group", &pyparallel::release_group);
}
