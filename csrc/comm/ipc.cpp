// The host side of the CUDA IPC all-reduce: buffers, handles, launching, waiting and failing; see
// Note [CUDA IPC all-reduce] in ipc.h. The kernel is csrc/cuda/ipc.cu. Compiled only in CUDA builds: in
// a CPU-only build the ipc_* ops have no implementation and pyparallel/transport.py never picks "ipc".
#ifdef PYPARALLEL_WITH_CUDA

#include "comm/ipc.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <thread>
#include <unordered_map>

#include "comm/process.h"
#include "comm/session.h"
#include "common.h"

namespace pyparallel {
namespace {

constexpr double kPeerCheckSeconds = 0.02;
constexpr double kAbortGraceSeconds = 10.0;  // after an abort, how long the kernel may take to stop
constexpr int64_t kBusyPolls = 4000;         // event polls before the waiting thread starts to yield
constexpr int64_t kYieldPolls = 40000;       // ... and then to sleep between polls
constexpr int kSleepMicros = 50;
constexpr double kHostTimeoutSlackSeconds = 1.0;
const char* const kTimeoutReason = "timeout";  // abort_reason_ when the host's timeout ran out

volatile int32_t& shared_word(int32_t& x) { return *reinterpret_cast<volatile int32_t*>(&x); }

std::string to_hex(const void* p, size_t n) {
  static const char* digits = "0123456789abcdef";
  const auto* b = static_cast<const unsigned char*>(p);
  std::string out(2 * n, '0');
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = digits[b[i] >> 4];
    out[2 * i + 1] = digits[b[i] & 15];
  }
  return out;
}

bool from_hex(const std::string& s, void* out, size_t n) {
  if (s.size() != 2 * n) return false;
  auto* b = static_cast<unsigned char*>(out);
  for (size_t i = 0; i < n; ++i) {
    unsigned v = 0;
    if (std::sscanf(s.c_str() + 2 * i, "%2x", &v) != 1) return false;
    b[i] = static_cast<unsigned char>(v);
  }
  return true;
}

std::string cuda_text(cudaError_t e) { return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e); }

double seconds(std::chrono::steady_clock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

IpcComm::IpcComm(int device, int rank, int size, std::vector<int64_t> group_ranks, int64_t capacity,
                 double timeout_s)
    : device_(device),
      rank_(rank),
      size_(size),
      group_ranks_(std::move(group_ranks)),
      capacity_(capacity),
      allocated_capacity_(capacity),
      timeout_s_(timeout_s) {
  const char* op = "ipc_create";
  TORCH_CHECK(size >= 1 && size <= kIpcMaxRanks, op, ": the CUDA IPC all-reduce supports 1 to ", kIpcMaxRanks,
              " ranks, got ", size);
  TORCH_CHECK(rank >= 0 && rank < size, op, ": rank ", rank, " is not in [0, ", size, ")");
  TORCH_CHECK(static_cast<int>(group_ranks_.size()) == size, op, ": ", group_ranks_.size(), " group ranks given for ",
              size, " ranks");
  TORCH_CHECK(capacity >= (64 << 10) && capacity % 4096 == 0, op,
              ": capacity must be a multiple of 4096 and at least 65536 bytes, got ", capacity);
  TORCH_CHECK(timeout_s > 0, op, ": timeout_s must be positive, got ", timeout_s);
  const int devices = static_cast<int>(c10::cuda::device_count());
  TORCH_CHECK(device >= 0 && device < devices, op, ": no CUDA device ", device, " (this process sees ", devices, ")");
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  try {
    void* p = nullptr;
    const int64_t bytes = kIpcSignalBytes + 3 * capacity;  // signals, two staging sets, the outbox
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      TORCH_CHECK(false, op, ": cannot allocate ", bytes, " bytes on cuda:", device, " for the CUDA IPC buffer (",
                  cuda_text(e), ")");
    }
    buffer_ = static_cast<char*>(p);
    // Peers write barrier counts into the signal area as soon as they have opened it: it must be zero
    // before the handle is handed out (the caller publishes it after this constructor returns).
    C10_CUDA_CHECK(cudaMemset(buffer_, 0, kIpcSignalBytes));
    C10_CUDA_CHECK(cudaDeviceSynchronize());
    void* h = nullptr;
    C10_CUDA_CHECK(cudaHostAlloc(&h, sizeof(IpcHostStatus), cudaHostAllocMapped));
    host_status_ = static_cast<IpcHostStatus*>(h);
    std::memset(host_status_, 0, sizeof(IpcHostStatus));
    void* d = nullptr;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&d, h, 0));
    host_status_dev_ = static_cast<IpcHostStatus*>(d);
    cudaEvent_t event = nullptr;
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    done_ = event;
  } catch (...) {
    release();
    throw;
  }
}

IpcComm::~IpcComm() {
  if (leak_) return;  // a kernel may still read or write these
  release();
}

void IpcComm::release() {
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
  (void)cudaSetDevice(device_);
  for (int p = 0; p < static_cast<int>(peers_.size()); ++p) {
    if (p != rank_ && peers_[p] != nullptr) (void)cudaIpcCloseMemHandle(peers_[p]);
  }
  peers_.clear();
  if (done_ != nullptr) (void)cudaEventDestroy(static_cast<cudaEvent_t>(done_));
  if (host_status_ != nullptr) (void)cudaFreeHost(host_status_);
  if (buffer_ != nullptr) (void)cudaFree(buffer_);
  done_ = nullptr;
  host_status_ = nullptr;
  buffer_ = nullptr;
  (void)cudaGetLastError();  // nothing here may leave an error behind for the next CUDA call
  if (previous >= 0) (void)cudaSetDevice(previous);
}

std::string IpcComm::handle() const {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  cudaIpcMemHandle_t h;
  const cudaError_t e = cudaIpcGetMemHandle(&h, buffer_);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    TORCH_CHECK(false, "ipc_create: cannot export the CUDA IPC buffer on cuda:", device_, " (", cuda_text(e), ")");
  }
  char bus[32] = {0};
  C10_CUDA_CHECK(cudaDeviceGetPCIBusId(bus, sizeof(bus), device_));
  return to_hex(&h, sizeof(h)) + ":" + bus;
}

void IpcComm::open(const std::vector<std::string>& handles, const std::vector<int64_t>& pids, int64_t capacity,
                   int64_t blocks) {
  const char* op = "ipc_open";
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(peers_.empty(), op, ": the communicator is open already");
  TORCH_CHECK(static_cast<int>(handles.size()) == size_ && static_cast<int>(pids.size()) == size_, op, ": ",
              handles.size(), " handles and ", pids.size(), " pids given for ", size_, " ranks");
  TORCH_CHECK(capacity >= size_ * 16 && capacity <= allocated_capacity_ && capacity % 16 == 0, op, ": capacity ",
              capacity, " must be a multiple of 16 in [", size_ * 16, ", ", allocated_capacity_, "]");
  TORCH_CHECK(blocks >= 1 && blocks <= kIpcMaxBlocks, op, ": blocks must be in [1, ", kIpcMaxBlocks, "], got ", blocks);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  std::vector<char*> mapped(size_, nullptr);
  try {
    for (int p = 0; p < size_; ++p) {
      if (p == rank_) {
        mapped[p] = buffer_;
        continue;
      }
      const std::string& text = handles[p];
      const size_t colon = text.find(':');
      cudaIpcMemHandle_t h;
      TORCH_CHECK(colon != std::string::npos && from_hex(text.substr(0, colon), &h, sizeof(h)), op,
                  ": rank ", group_ranks_[p], "'s handle is malformed: '", text, "'");
      const std::string bus = text.substr(colon + 1);
      int dev = -1;
      cudaError_t e = cudaDeviceGetByPCIBusId(&dev, bus.c_str());
      if (e != cudaSuccess) {
        (void)cudaGetLastError();
        TORCH_CHECK(false, op, ": rank ", group_ranks_[p], "'s GPU (PCI ", bus,
                    ") is not visible to this process (CUDA_VISIBLE_DEVICES must show every rank's GPU): ",
                    cuda_text(e));
      }
      if (dev != device_) {
        int can = 0;
        C10_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, device_, dev));
        TORCH_CHECK(can, op, ": cuda:", device_, " cannot access rank ", group_ranks_[p], "'s GPU cuda:", dev,
                    " peer to peer, which the CUDA IPC all-reduce needs");
      }
      void* q = nullptr;
      e = cudaIpcOpenMemHandle(&q, h, cudaIpcMemLazyEnablePeerAccess);
      if (e != cudaSuccess) {
        (void)cudaGetLastError();
        TORCH_CHECK(false, op, ": cannot open rank ", group_ranks_[p], "'s CUDA IPC buffer (", cuda_text(e), ")");
      }
      mapped[p] = static_cast<char*>(q);
    }
  } catch (...) {
    for (int p = 0; p < size_; ++p) {
      if (p != rank_ && mapped[p] != nullptr) (void)cudaIpcCloseMemHandle(mapped[p]);
    }
    throw;
  }
  peers_ = std::move(mapped);
  sent_.assign(size_, 0);
  received_.assign(size_, 0);
  pids_ = pids;
  capacity_ = capacity;
  blocks_ = static_cast<int>(blocks);
}

IpcComm::Plan IpcComm::plan(int64_t numel, int64_t element_size) const {
  const int64_t V = 16 / element_size;  // elements per 16 bytes
  if (ceil_div(numel, V) * 16 <= std::min(kIpcOneShotBytes, capacity_)) return {true, 0, 1};
  const int64_t max_region = capacity_ / size_ / 16 * V;  // >= V: open() checked capacity >= 16 size
  const int64_t region = std::min(max_region, ceil_div(ceil_div(numel, size_), V) * V);
  return {false, region, ceil_div(numel, size_ * region)};
}

void IpcComm::check_usable(const char* op) const {
  TORCH_CHECK(failure_.empty(), op, ": an earlier CUDA IPC collective on this group failed (", failure_,
              "); the group cannot be used any more");
  TORCH_CHECK(!peers_.empty(), op, ": the CUDA IPC communicator was not opened");
}

void IpcComm::start_kernel(const char* op, const std::function<void(void*)>& launch) {
  shared_word(host_status_->status) = kIpcOk;
  shared_word(host_status_->abort) = 0;
  std::atomic_thread_fence(std::memory_order_seq_cst);
  abort_reason_.clear();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
  try {
    launch(stream);
    C10_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(done_), stream));
  } catch (const c10::Error& e) {
    fail(std::string(op) + ": cannot launch the CUDA IPC kernel: " + e.what_without_backtrace(), false);
  }
}

int64_t IpcComm::all_reduce(at::Tensor& tensor, bool average, const char* op) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable(op);
  check_float_tensor(tensor, op, "tensor");
  TORCH_CHECK(tensor.is_cuda() && tensor.device().index() == device_, op, ": tensor must be on cuda:", device_,
              " (where this group's CUDA IPC buffers are), got ", tensor.device());
  if (size_ == 1) return 0;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  // The kernel reads and writes 16 bytes at a time: a non-contiguous or misaligned tensor goes through a copy.
  const bool direct = tensor.is_contiguous() && reinterpret_cast<uintptr_t>(tensor.data_ptr()) % 16 == 0;
  at::Tensor work = direct ? tensor.view(-1) : at::empty(tensor.sizes(), tensor.options()).copy_(tensor).view(-1);
  const int64_t numel = work.numel();
  const Plan pl = plan(numel, work.element_size());

  IpcKernelArgs a{};
  for (int p = 0; p < size_; ++p) {
    a.staging[p] = peers_[p] + kIpcSignalBytes;
    a.signals[p] = reinterpret_cast<IpcSignals*>(peers_[p]);
  }
  a.data = work.data_ptr();
  a.numel = numel;
  a.region = pl.region;
  a.chunks = pl.chunks;
  a.capacity = capacity_;
  a.barrier_base = barriers_;
  a.chunk_base = chunks_;
  a.header_parity = collectives_ % 2;
  const auto fields = CollectiveHeader::of(work, Collective::kIpcAllReduce, average, 0).fields();
  std::copy(fields.begin(), fields.end(), a.header);
  a.host = host_status_dev_;
  a.timeout_ns = static_cast<uint64_t>(timeout_s_ * 1e9);
  a.rank = rank_;
  a.size = size_;
  a.average = average;
  a.one_shot = pl.one_shot;

  ++collectives_;
  start_kernel(op, [&](void* stream) { launch_ipc_all_reduce(a, work.scalar_type(), blocks_, stream); });
  wait_for_kernel(op);

  const int32_t status = shared_word(host_status_->status);
  if (status == kIpcHeaderMismatch) {  // every rank stopped after the first barrier: still in step
    barriers_ += 1;
    chunks_ += 1;
    std::vector<int64_t> all(size_ * CollectiveHeader::kFields);
    for (int p = 0; p < size_; ++p) {
      std::copy_n(host_status_->headers[p], CollectiveHeader::kFields, all.data() + p * CollectiveHeader::kFields);
    }
    check_headers_agree(all.data(), size_, op);
    fail(std::string(op) + ": the kernel reported differing headers that the host reads as equal", false);
  }
  if (status != kIpcOk) fail(describe_failure(op, status), false);
  barriers_ += pl.one_shot ? 1 : 2 * pl.chunks;
  chunks_ += pl.chunks;
  if (!direct) tensor.copy_(work.view(tensor.sizes()));
  return 0;  // nothing crossed a network
}

void IpcComm::exchange(const at::Tensor& send, int to, const at::Tensor& recv, int from) {
  const char* op = "CUDA IPC exchange";
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable(op);
  const bool do_send = send.numel() > 0, do_recv = recv.numel() > 0;
  if (!do_send && !do_recv) return;
  TORCH_CHECK(to >= 0 && to < size_ && to != rank_ && from >= 0 && from < size_ && from != rank_, op,
              ": peers must be other ranks in [0, ", size_, "), got to=", to, " from=", from);
  for (const at::Tensor* t : {&send, &recv}) {
    if (t->numel() == 0) continue;
    TORCH_CHECK(t->is_cuda() && t->device().index() == device_, op, ": tensors must be on cuda:", device_,
                " (where this group's CUDA IPC buffers are), got ", t->device());
    TORCH_CHECK(t->is_contiguous(), op, ": tensors must be contiguous");
  }
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  IpcExchangeArgs a{};
  for (int p = 0; p < size_; ++p) {
    a.outbox[p] = peers_[p] + kIpcSignalBytes + 2 * capacity_;
    a.signals[p] = reinterpret_cast<IpcSignals*>(peers_[p]);
    a.sent_before[p] = sent_[p];
  }
  a.send = do_send ? static_cast<const char*>(send.const_data_ptr()) : nullptr;
  a.recv = do_recv ? static_cast<char*>(recv.data_ptr()) : nullptr;
  a.send_bytes = do_send ? send.numel() * send.element_size() : 0;
  a.recv_bytes = do_recv ? recv.numel() * recv.element_size() : 0;
  a.capacity = capacity_;
  a.received_before = received_[from];
  a.host = host_status_dev_;
  a.timeout_ns = static_cast<uint64_t>(timeout_s_ * 1e9);
  a.rank = rank_;
  a.size = size_;
  a.to = to;
  a.from = from;
  start_kernel(op, [&](void* stream) { launch_ipc_exchange(a, blocks_, stream); });
  wait_for_kernel(op);
  const int32_t status = shared_word(host_status_->status);
  if (status != kIpcOk) fail(describe_failure(op, status), false);
  sent_[to] += ceil_div(a.send_bytes, capacity_);
  received_[from] += ceil_div(a.recv_bytes, capacity_);
}

void IpcComm::wait_for_kernel(const char* op) {
  using clock = std::chrono::steady_clock;
  const auto event = static_cast<cudaEvent_t>(done_);
  const auto start = clock::now();
  auto checked = start;
  bool aborted = false;
  auto aborted_at = start;
  for (int64_t polls = 0;; ++polls) {
    const cudaError_t e = cudaEventQuery(event);
    if (e == cudaSuccess) return;
    if (e != cudaErrorNotReady) {
      (void)cudaGetLastError();
      std::string dead;  // a fault in a dead peer's mapping (see the Note): say who died first
      for (int p = 0; p < size_; ++p) {
        if (p != rank_ && !process_alive(static_cast<int>(pids_[p]))) {
          dead += "rank " + std::to_string(group_ranks_[p]) + " (pid " + std::to_string(pids_[p]) +
                  ", on this node) died during a CUDA IPC collective; ";
        }
      }
      fail(std::string(op) + ": " + dead + "CUDA error while waiting for the CUDA IPC kernel: " +
               cuda_text(e),
           true);
    }
    if (polls < kBusyPolls) continue;  // most calls end here: a few microseconds
    if (polls < kYieldPolls) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(kSleepMicros));
    }
    const auto now = clock::now();
    if (aborted) {
      if (seconds(now - aborted_at) > kAbortGraceSeconds) {
        const std::string why = abort_reason_ == kTimeoutReason
                                    ? std::string(op) + ": timed out after " + std::to_string(timeout_s_) +
                                          " s: the CUDA IPC kernel did not finish"
                                    : abort_reason_;
        fail(why + " (and it did not stop within " + std::to_string(kAbortGraceSeconds) +
                 " s of the abort, so its buffers are kept)",
             true);
      }
      continue;
    }
    if (seconds(now - checked) > kPeerCheckSeconds) {
      checked = now;
      for (int p = 0; p < size_ && abort_reason_.empty(); ++p) {
        if (p == rank_ || process_alive(static_cast<int>(pids_[p]))) continue;
        std::ostringstream msg;
        msg << op << ": rank " << group_ranks_[p] << " (pid " << pids_[p]
            << ", on this node) died during a CUDA IPC collective";
        abort_reason_ = msg.str();
      }
    }
    // The kernel times out by itself (naming the rank it waited for) timeout_s after it started; this is
    // for a kernel that started late or not at all, counted from the launch.
    if (abort_reason_.empty() && seconds(now - start) > timeout_s_ + kHostTimeoutSlackSeconds) {
      abort_reason_ = kTimeoutReason;
    }
    if (!abort_reason_.empty()) {
      shared_word(host_status_->abort) = 1;
      std::atomic_thread_fence(std::memory_order_seq_cst);
      aborted = true;
      aborted_at = now;
    }
  }
}

std::string IpcComm::describe_failure(const char* op, int32_t status) const {
  const bool host_timeout = status == kIpcAborted && abort_reason_ == kTimeoutReason;
  if (status == kIpcAborted && !host_timeout && !abort_reason_.empty()) return abort_reason_;
  const int waited = shared_word(const_cast<int32_t&>(host_status_->waited_rank));
  const std::string who = waited >= 0 && waited < size_ ? std::to_string(group_ranks_[waited]) : "?";
  std::ostringstream msg;
  if (status == kIpcPeerFailed) {
    msg << op << ": rank " << who << "'s CUDA IPC communicator failed in an earlier collective (it raised there),"
        << " so this group cannot be used any more";
  } else if (status == kIpcTimedOut || host_timeout) {
    msg << op << ": timed out after " << timeout_s_ << " s waiting for rank " << who
        << " (it is alive but did not arrive: did every rank call the same collectives?)";
  } else {
    msg << op << ": aborted while waiting for rank " << who << " (status " << status << ")";
  }
  return msg.str();
}

void IpcComm::fail(const std::string& why, bool kernel_may_run) {
  failure_ = why;
  leak_ = leak_ || kernel_may_run;
  if (!leak_) poison_peers();
  TORCH_CHECK(false, why);
}

void IpcComm::poison_peers() {
  const uint64_t one = 1;
  for (int p = 0; p < static_cast<int>(peers_.size()); ++p) {
    if (p == rank_ || !process_alive(static_cast<int>(pids_[p]))) continue;
    auto* signals = reinterpret_cast<IpcSignals*>(peers_[p]);
    (void)cudaMemcpy(&signals->poisoned[rank_], &one, sizeof(one), cudaMemcpyHostToDevice);
  }
  (void)cudaGetLastError();  // best effort: the error being raised is the one that matters
}

namespace {

std::mutex registry_mutex;
std::unordered_map<std::string, std::shared_ptr<IpcComm>>& registry() {
  static auto* r = new std::unordered_map<std::string, std::shared_ptr<IpcComm>>();
  return *r;
}

std::string ipc_create(const std::string& comm, int64_t device, int64_t rank, int64_t size,
                       at::IntArrayRef group_ranks, int64_t capacity, double timeout_s) {
  auto c = std::make_shared<IpcComm>(static_cast<int>(device), static_cast<int>(rank), static_cast<int>(size),
                                     group_ranks.vec(), capacity, timeout_s);
  std::string handle = c->handle();
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry()[comm] = std::move(c);
  return handle;
}

void ipc_open(const std::string& comm, const std::string& handles, at::IntArrayRef pids, int64_t capacity,
              int64_t blocks) {
  std::vector<std::string> list;
  std::istringstream in(handles);
  for (std::string h; in >> h;) list.push_back(h);
  ipc_comm(comm)->open(list, pids.vec(), capacity, blocks);
}

void ipc_detach(const std::string& comm) {
  std::shared_ptr<IpcComm> c;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto it = registry().find(comm);
    if (it == registry().end()) return;
    c = std::move(it->second);
    registry().erase(it);
  }
  c.reset();  // frees the buffers outside the registry's lock (cudaFree synchronises the device)
  release_group_state(comm);  // the collective numbers of the rings that ran over it (session.h)
}

int64_t ipc_all_reduce(at::Tensor& tensor, const std::string& comm, bool average) {
  return ipc_comm(comm)->all_reduce(tensor, average, "ipc_all_reduce_");
}

class DoneTransfer final : public Transfer {
 public:
  void wait() override {}  // the exchange was complete when it returned
};

// The Transport seam over a CUDA IPC communicator (Note [CUDA IPC transport]).
class IpcTransport final : public Transport {
 public:
  explicit IpcTransport(std::shared_ptr<IpcComm> comm) : comm_(std::move(comm)) {}
  int rank() const override { return comm_->rank(); }
  int size() const override { return comm_->size(); }
  bool independent_transfers() const override { return false; }
  std::pair<TransferPtr, TransferPtr> exchange(const at::Tensor& send, int to, const at::Tensor& recv, int from,
                                               int tag) override {
    if (send.numel() == 0 && recv.numel() == 0) return {nullptr, nullptr};
    comm_->exchange(send, to, recv, from);
    return {nullptr, std::make_shared<DoneTransfer>()};
  }
  TransferPtr send(const at::Tensor&, int, int) override {
    TORCH_CHECK(false, "the CUDA IPC transport has only exchange()");
    return nullptr;
  }
  TransferPtr recv(const at::Tensor&, int, int) override {
    TORCH_CHECK(false, "the CUDA IPC transport has only exchange()");
    return nullptr;
  }
  c10::weak_intrusive_ptr<c10::intrusive_ptr_target> incarnation() const override { return comm_->incarnation(); }

 private:
  std::shared_ptr<IpcComm> comm_;
};

}  // namespace

std::shared_ptr<Transport> ipc_transport_for(const std::string& name) {
  std::shared_ptr<IpcComm> c;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto it = registry().find(name);
    if (it == registry().end()) return nullptr;
    c = it->second;
  }
  return std::make_shared<IpcTransport>(std::move(c));
}

std::shared_ptr<IpcComm> ipc_comm(const std::string& name) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry().find(name);
  TORCH_CHECK(it != registry().end(), "no CUDA IPC communicator '", name, "' is attached in this process");
  return it->second;
}

}  // namespace pyparallel

TORCH_LIBRARY_IMPL(pyparallel, CatchAll, m) {
  m.impl("ipc_create", &pyparallel::ipc_create);
  m.impl("ipc_open", &pyparallel::ipc_open);
  m.impl("ipc_detach", &pyparallel::ipc_detach);
}

TORCH_LIBRARY_IMPL(pyparallel, CUDA, m) {
  m.impl("ipc_all_reduce_", &pyparallel::ipc_all_reduce);
}

#endif  // PYPARALLEL_WITH_CUDA
