// All-reduce and point-to-point transfers between the processes of one node through CUDA IPC (CUDA tensors).
//
// Note [CUDA IPC all-reduce]
// Each rank of the group allocates one device buffer (cudaMalloc) on its GPU: a signal area, then two
// staging sets of `capacity` bytes, then an outbox of `capacity` bytes (Note [CUDA IPC transport]). Its IPC handle goes to every other rank through the group's store
// (pyparallel/transport.py), and every rank opens every peer's buffer, so a kernel of any rank can read
// and write every rank's buffer directly. Ranks may share one GPU (processes time-sliced on it, or run
// side by side under MPS) or sit on peer-accessible GPUs (NVLink, PCIe P2P). One kernel launch does a
// whole collective; the host then waits for it (see "Failures").
//
// Algorithm (in the style of vLLM's custom all-reduce, csrc/custom_all_reduce.cuh). Every rank's
// kernel has the same grid (agreed at attach), and each block b synchronises only with the blocks b of
// the other ranks ("barrier": block b writes its barrier count into every rank's signal area, then
// waits until every rank's block b has written a count at least as large). Counts only grow, so no
// reset is ever needed, and a peer that runs one barrier ahead is harmless.
//   One-shot (up to kIpcOneShotBytes): each rank copies its tensor into its staging set; barrier; each
//     rank reads every rank's staging set and reduces the whole tensor itself, in rank order.
//   Two-shot (larger): the tensor goes through in chunks of n regions of R elements (R fixed for the
//     whole call, a multiple of 16 bytes, n R elements per chunk within `capacity`). Per chunk: each rank
//     copies its chunk into its staging set; barrier; rank r reduces region r over every rank's staging
//     set, in rank order, and writes the result over its own staging region r; barrier; every rank copies
//     region q of the result from rank q's staging set.
// Every element is summed in fp32 in rank order (x_0 + x_1 + ... + x_{n-1}), divided by n when
// averaging, and rounded once to the tensor's dtype: pyparallel.reference.shm_all_reduce, bitwise, and
// the same bits on every rank, whichever path ran.
//
// Why per-block barriers suffice: within a call, every access to element j of a region (copy-in,
// reduction, gather, on any rank) is made by global thread (j / V) mod (blocks * threads) (V: elements
// per 16 bytes), so what block b of one rank reads was written by block b of the writer, before a
// barrier they both passed. Successive chunks alternate between the two staging sets; a rank rewrites
// set u only after the first barrier of the next chunk, which its peers' blocks reach only after they
// finished reading set u. Across calls, kernels on one stream never overlap (and the host waits for
// each), so a peer that passed a barrier of call k+1 is done with call k entirely. The chunk counter
// (parity of the set) and the barrier count live on the host and advance identically on every rank.
//
// Header check: every rank's block b writes its header (collective, dtype, numel, reduction, device)
// into its own signal area before the first barrier and reads every rank's after it; if any differs,
// every rank sees it (each compares all n headers with its own), every block stops there, and the host
// raises the same message on every rank. Both paths start with exactly one barrier, so the counts stay
// in step and the communicator stays usable.
//
// Failures: a wait never spins forever. Every 1024 polls a waiting thread checks an abort word in
// host-mapped memory and the GPU's global timer against the group's timeout. The host, while it waits
// for the kernel, checks every 20 ms that the peers' processes are alive and sets the abort word when
// one died or the timeout passed; the kernel then stops, records which rank it waited for, and the host
// raises an error naming it. The communicator is then failed: later collectives raise at once (its
// barrier counts no longer agree with the peers'), and the host marks itself failed in every live peer's
// signal area, so that a peer that arrives late gives up its wait for this rank at once instead of
// timing out (a late peer's first barrier may still pass, on this rank's arrival before it failed, but
// then this rank's staging set holds that same collective's data). If the kernel does not stop after an
// abort (it never started, say), the host raises anyway and leaks the buffers, which the kernel may
// still touch. A peer process that dies while its buffer is mapped here leaves that mapping undefined
// (CUDA's rule for IPC memory whose exporter is gone): a kernel that writes a barrier count into it may
// then fault, and this process's CUDA context with it; the error still names the dead rank.
//
// Note [CUDA IPC transport]
// The same buffers also carry point-to-point messages, so that the collectives written against the
// Transport seam (the dense and int8 rings, the top-k all-gather) run on CUDA tensors of processes that
// share a GPU, where NCCL refuses to run. exchange(send -> to, recv <- from) is one kernel launch that the
// host waits for: chunk by chunk (capacity bytes each), the sender waits until every message it put in
// its outbox earlier has been consumed (done counts, written by the receivers into its signal area),
// copies the chunk into its outbox and raises the receiver's ready count; the receiver waits for that
// count, copies the chunk out of the sender's outbox, and raises the sender's done count. Every rank
// interleaves its sends and receives chunk by chunk, so a ring of exchanges cannot deadlock. As in the
// all-reduce, block b of the sender writes exactly the 16-byte units that block b of the receiver reads,
// so the counts are per block. Messages between two ranks are matched by their order (the tags are not
// used): every rank must issue its collectives on a communicator in the same order, as with NCCL, which
// the group's single worker thread does. Sizes of the two sides must agree; the collectives' header
// check (run over the same exchange, on fixed-size rows) makes sure of that before any payload moves.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "comm/header.h"
#include "comm/transport.h"

namespace pyparallel {

constexpr int kIpcMaxRanks = 8;
constexpr int kIpcMaxBlocks = 128;
constexpr int kIpcThreads = 512;
constexpr int64_t kIpcOneShotBytes = 256 << 10;
constexpr int64_t kIpcSignalBytes = 64 << 10;  // the signal area, before the staging sets

// At the start of every rank's buffer; written by its peers (arrived) and by itself (header).
struct IpcSignals {
  // arrived[b][p]: barriers that rank p's block b has reached; written by rank p.
  alignas(64) uint64_t arrived[kIpcMaxBlocks][kIpcMaxRanks];
  // header[parity of the collective][b]: this rank's header, written by its own block b.
  int64_t header[2][kIpcMaxBlocks][CollectiveHeader::kFields];
  // poisoned[p] != 0: rank p's communicator failed; a wait for rank p gives up instead of timing out.
  uint64_t poisoned[kIpcMaxRanks];
  // Point-to-point (Note [CUDA IPC transport]), by block: ready[b][p]: chunks rank p has put in its outbox
  // for this rank; done[b][p]: chunks of this rank's outbox that rank p has consumed.
  alignas(64) uint64_t ready[kIpcMaxBlocks][kIpcMaxRanks];
  alignas(64) uint64_t done[kIpcMaxBlocks][kIpcMaxRanks];
};
static_assert(sizeof(IpcSignals) <= kIpcSignalBytes, "the signal area outgrew its reserved bytes");

enum IpcStatus : int32_t { kIpcOk = 0, kIpcHeaderMismatch = 1, kIpcTimedOut = 2, kIpcAborted = 3, kIpcPeerFailed = 4 };

// Host-mapped (pinned) memory of one rank, private to its process.
struct IpcHostStatus {
  int32_t abort;        // host -> kernel: stop waiting
  int32_t status;       // kernel -> host: an IpcStatus
  int32_t waited_rank;  // the rank a failed wait was waiting for
  int32_t block;
  int64_t headers[kIpcMaxRanks][CollectiveHeader::kFields];  // every rank's header, on a mismatch
};

// One launch's arguments (passed by value: a kernel parameter).
struct IpcKernelArgs {
  char* staging[kIpcMaxRanks];        // each rank's staging set 0, in this process's address space
  IpcSignals* signals[kIpcMaxRanks];  // each rank's signal area
  void* data;                         // the tensor, reduced in place: contiguous, 16-byte aligned
  int64_t numel;
  int64_t region;    // two-shot: elements per region per chunk (a multiple of 16 bytes); one-shot: 0
  int64_t chunks;    // two-shot: chunks of size * region elements; one-shot: 1
  int64_t capacity;  // bytes of one staging set (set 1 starts capacity bytes after set 0)
  uint64_t barrier_base;  // barriers every block passed before this launch
  int64_t chunk_base;     // chunks before this launch: chunk c uses set (chunk_base + c) % 2
  int64_t header_parity;
  int64_t header[CollectiveHeader::kFields];
  IpcHostStatus* host;  // device address of this rank's IpcHostStatus
  uint64_t timeout_ns;
  int32_t rank, size, average, one_shot;
};

// One point-to-point exchange's arguments.
struct IpcExchangeArgs {
  char* outbox[kIpcMaxRanks];         // each rank's outbox, in this process's address space
  IpcSignals* signals[kIpcMaxRanks];  // each rank's signal area
  const char* send;
  char* recv;
  int64_t send_bytes, recv_bytes;
  int64_t capacity;                       // outbox bytes: messages go through in chunks of this size
  uint64_t sent_before[kIpcMaxRanks];     // chunks this rank put in its outbox for each rank before this call
  uint64_t received_before;               // chunks this rank received from `from` before this call
  IpcHostStatus* host;
  uint64_t timeout_ns;
  int32_t rank, size, to, from;
};

// Launches the all-reduce kernel (csrc/cuda/ipc.cu) for a float32, float16 or bfloat16 tensor.
void launch_ipc_all_reduce(const IpcKernelArgs& args, at::ScalarType dtype, int blocks, void* stream);
// Launches the exchange kernel (csrc/cuda/ipc.cu).
void launch_ipc_exchange(const IpcExchangeArgs& args, int blocks, void* stream);

// One rank's end of a CUDA IPC communicator (see the Note). Methods are serialised by a mutex.
class IpcComm {
 public:
  // Allocates this rank's buffer (2 * capacity bytes of staging, capacity bytes of outbox) on `device`.
  IpcComm(int device, int rank, int size, std::vector<int64_t> group_ranks, int64_t capacity, double timeout_s);
  ~IpcComm();
  IpcComm(const IpcComm&) = delete;
  IpcComm& operator=(const IpcComm&) = delete;

  // This rank's buffer, for its peers: "<IPC handle in hex>:<PCI bus id of the GPU>".
  std::string handle() const;
  // Opens every peer's buffer. capacity: the staging bytes every rank allocated at least (the minimum
  // over ranks); blocks: the grid, the same on every rank; pids: for the liveness checks.
  void open(const std::vector<std::string>& handles, const std::vector<int64_t>& pids, int64_t capacity,
            int64_t blocks);
  int64_t all_reduce(at::Tensor& tensor, bool average, const char* op);
  // Sends `send` to rank `to` and receives `recv` from rank `from` (contiguous, on this communicator's
  // device, either may be empty); returns once both are done (Note [CUDA IPC transport]).
  void exchange(const at::Tensor& send, int to, const at::Tensor& recv, int from);
  int rank() const { return rank_; }
  int size() const { return size_; }
  // Lives as long as this communicator: what Transport::incarnation() hands out.
  c10::weak_intrusive_ptr<c10::intrusive_ptr_target> incarnation() const {
    return c10::weak_intrusive_ptr<c10::intrusive_ptr_target>(token_);
  }

 private:
  struct Plan {
    bool one_shot;
    int64_t region, chunks;
  };
  Plan plan(int64_t numel, int64_t element_size) const;
  void check_usable(const char* op) const;
  void start_kernel(const char* op, const std::function<void(void*)>& launch);  // status reset, launch, record
  void wait_for_kernel(const char* op);  // polls the kernel's event, checks peers, aborts when needed
  [[noreturn]] void fail(const std::string& why, bool kernel_may_run);
  std::string describe_failure(const char* op, int32_t status) const;
  void release();  // frees everything this rank holds (CUDA errors ignored: also runs after failures)
  void poison_peers();  // tells every live peer that this communicator failed

  std::mutex mutex_;
  int device_, rank_, size_;
  std::vector<int64_t> group_ranks_, pids_;
  int64_t capacity_;  // staging bytes per set in use (after open: the minimum over ranks)
  int64_t allocated_capacity_;
  int blocks_ = 0;
  double timeout_s_;
  char* buffer_ = nullptr;                 // this rank's buffer
  std::vector<char*> peers_;               // every rank's buffer as mapped here (own included)
  IpcHostStatus* host_status_ = nullptr;      // pinned, mapped: the host's address
  IpcHostStatus* host_status_dev_ = nullptr;  // ... and the kernel's
  void* done_ = nullptr;                   // cudaEvent_t recorded after each launch
  uint64_t barriers_ = 0;
  int64_t chunks_ = 0, collectives_ = 0;
  std::vector<uint64_t> sent_, received_;  // point-to-point chunks, by peer
  struct Token final : c10::intrusive_ptr_target {};
  c10::intrusive_ptr<c10::intrusive_ptr_target> token_ = c10::make_intrusive<Token>();
  std::string failure_;
  bool leak_ = false;  // a kernel may still be running: never free what it touches
  std::string abort_reason_;
};

// The communicator attached under `name` (ipc_create); raises if there is none.
std::shared_ptr<IpcComm> ipc_comm(const std::string& name);
// The point-to-point transport over the communicator attached under `name`, or nullptr if there is none
// (transport_for() asks here first: collectives name an IPC communicator as their group).
std::shared_ptr<Transport> ipc_transport_for(const std::string& name);

}  // namespace pyparallel
