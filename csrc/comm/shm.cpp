// Shared-memory collectives; see Note [Shared-memory collectives] in shm.h.
#include "comm/shm.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <torch/library.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <sstream>
#include <unordered_map>

#include "comm/process.h"
#include "common.h"
#include "cpu/reduce.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define PYPARALLEL_CPU_RELAX() _mm_pause()
#else
#define PYPARALLEL_CPU_RELAX() ((void)0)
#endif

namespace pyparallel {
namespace {

constexpr uint64_t kMagic = 0x70797061724d454dull;  // "pyparMEM"
constexpr int64_t kAlign = 16;                      // elements: pieces start on 64-byte lines for fp32
constexpr int64_t kOneShotBytes = 64 << 10;
// Waiting: poll, then yield, then sleep on the futex. With a core per rank, polling for ~10 us catches
// most arrivals at once. With more local ranks than cores the rank being waited for needs the core we
// would poll on: yield at once, a few times, then sleep. Measured, 4 ranks on 2 cores, 1 MiB slots:
// (4000 polls, 64 yields) 2.1-3.5x Gloo at 4-64 MiB; (0, 0) 3.2-4.3x; (0, 8) 5.4-7.7x; (200, 2) 4.9-5.7x.
constexpr int kSpins = 4000, kYields = 64;
constexpr int kOversubscribedSpins = 0, kOversubscribedYields = 8;
constexpr double kPeerCheckSeconds = 0.02;
constexpr int kFutexSleepMicros = 2000;

struct alignas(64) SegmentHeader {
  std::atomic<uint64_t> magic;
  int64_t local_size;
  int64_t slot_bytes;
  alignas(64) std::atomic<uint32_t> futex;     // bumped by an arriving rank when someone sleeps
  std::atomic<uint32_t> sleepers;
};

constexpr int kWhyBytes = 512;

struct alignas(64) RankBlock {
  std::atomic<uint64_t> arrived;  // barriers this rank has reached
  std::atomic<int32_t> pid;
  int64_t header[2][CollectiveHeader::kFields];  // by collective parity
  int64_t location[2][2];  // by collective parity: (buffer id, offset) of the tensor, or (-1, -1)
  // Set (once, for good) when this rank gave up on a collective part-way; `why` is written first
  // (Note [Published failures]).
  std::atomic<uint32_t> failed;
  char why[kWhyBytes];
};

static_assert(std::atomic<uint64_t>::is_always_lock_free && std::atomic<uint32_t>::is_always_lock_free,
              "the control blocks need lock-free atomics (they live in memory shared between processes)");

int64_t round_up(int64_t x, int64_t m) { return ceil_div(x, m) * m; }

int64_t data_offset(int64_t local_size) {
  return round_up(sizeof(SegmentHeader) + local_size * sizeof(RankBlock), 4096);
}

int64_t segment_bytes(int64_t local_size, int64_t slot_bytes) {
  return data_offset(local_size) + 2 * local_size * slot_bytes;
}

std::string errno_text() { return std::strerror(errno); }

long futex(std::atomic<uint32_t>* addr, int op, uint32_t val, const timespec* timeout) {
  // Not FUTEX_PRIVATE_FLAG: the word is shared between processes.
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), op, val, timeout, nullptr, 0);
}

// Creates (exclusively, pages reserved) or opens the POSIX shared-memory object `name` of `bytes` bytes and
// maps it; no descriptor stays open. `kind` names it in errors ("segment", "buffer"); `open_hint` follows a
// failed open, `size_hint` a size that differs from `bytes`.
void* map_shared(const std::string& name, int64_t bytes, bool create, const char* op, const char* kind,
                 const char* open_hint, const char* size_hint) {
  const int fd = create ? shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600) : shm_open(name.c_str(), O_RDWR, 0);
  TORCH_CHECK(fd >= 0, op, ": cannot ", create ? "create" : "open", " shared-memory ", kind, " ", name, ": ",
              errno_text(), create ? "" : open_hint);
  if (create) {
    // Reserve the pages now: a sparse object maps fine, and the first rank that touches a missing page
    // once /dev/shm has filled up (shm_empty buffers, other processes) dies of SIGBUS.
    int err = ftruncate(fd, bytes) == 0 ? 0 : errno;
    if (err == 0) err = posix_fallocate(fd, 0, bytes);
    if (err != 0) {
      close(fd);
      shm_unlink(name.c_str());
      TORCH_CHECK(false, op, ": cannot reserve ", bytes, " bytes of shared memory for ", kind, " ", name, ": ",
                  std::strerror(err), " (is /dev/shm large enough? `df -h /dev/shm`)");
    }
  }
  struct stat st {};
  const bool sized = fstat(fd, &st) == 0 && st.st_size == bytes;
  void* base = sized ? mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
  const std::string why = errno_text();
  close(fd);  // the mapping keeps the memory
  TORCH_CHECK(sized, op, ": ", kind, " ", name, " has ", st.st_size, " bytes, this rank expected ", bytes, size_hint);
  TORCH_CHECK(base != MAP_FAILED, op, ": cannot map ", kind, " ", name, ": ", why);
  return base;
}

}  // namespace

struct ShmSegment {
  void* base = MAP_FAILED;
  int64_t bytes = 0;
  SegmentHeader* header() const { return static_cast<SegmentHeader*>(base); }
  RankBlock* block(int q) const {
    return reinterpret_cast<RankBlock*>(static_cast<char*>(base) + sizeof(SegmentHeader)) + q;
  }
  ~ShmSegment() {
    if (base != MAP_FAILED) munmap(base, bytes);
  }
};

// A mapped buffer segment: local_size parts of `stride` bytes (Note [Registered buffers]).
struct ShmBuffer {
  char* base = nullptr;
  int64_t bytes = 0, stride = 0, id = 0;
  ~ShmBuffer() {
    if (base != nullptr) munmap(base, bytes);
  }
};

ShmComm::ShmComm(const std::string& name, int local_rank, int local_size, std::vector<int64_t> group_ranks,
                 int64_t slot_bytes, bool create, double timeout_s)
    : seg_(std::make_unique<ShmSegment>()),
      rank_(local_rank),
      size_(local_size),
      group_ranks_(std::move(group_ranks)),
      slot_bytes_(slot_bytes),
      timeout_s_(timeout_s) {
  const char* op = "shm_attach";
  TORCH_CHECK(local_size >= 1 && local_rank >= 0 && local_rank < local_size, op, ": local rank ", local_rank,
              " is not in [0, ", local_size, ")");
  TORCH_CHECK(static_cast<int>(group_ranks_.size()) == local_size, op, ": ", group_ranks_.size(),
              " group ranks given for ", local_size, " local ranks");
  TORCH_CHECK(slot_bytes >= 4096 && slot_bytes % 4096 == 0 && slot_bytes >= 64 * local_size * kAlign, op,
              ": slot_bytes must be a multiple of 4096 and at least ", std::max<int64_t>(4096, 64 * local_size * kAlign),
              ", got ", slot_bytes);
  TORCH_CHECK(timeout_s > 0, op, ": timeout_s must be positive, got ", timeout_s);
  TORCH_CHECK(!name.empty() && name[0] == '/' && name.find('/', 1) == std::string::npos, op,
              ": segment name must look like '/name', got '", name, "'");
  const int64_t bytes = segment_bytes(local_size, slot_bytes);
  void* base = map_shared(name, bytes, create, op, "segment", " (is every rank of this host really on one machine?)",
                          " (local size or slot size differ between ranks)");
  seg_->base = base;
  seg_->bytes = bytes;
  SegmentHeader* h = seg_->header();
  if (create) {
    h->local_size = local_size;
    h->slot_bytes = slot_bytes;
    h->magic.store(kMagic, std::memory_order_release);
  } else {
    TORCH_CHECK(h->magic.load(std::memory_order_acquire) == kMagic && h->local_size == local_size &&
                    h->slot_bytes == slot_bytes,
                op, ": segment ", name, " is not a pyparallel segment for ", local_size, " ranks");
  }
  seg_->block(rank_)->pid.store(static_cast<int32_t>(getpid()));
  cpu_set_t cpus;
  const bool oversubscribed = sched_getaffinity(0, sizeof(cpus), &cpus) == 0 && local_size > CPU_COUNT(&cpus);
  spins_ = oversubscribed ? kOversubscribedSpins : kSpins;
  yields_ = oversubscribed ? kOversubscribedYields : kYields;
}

ShmComm::~ShmComm() = default;

std::pair<int64_t, int64_t> ShmComm::region(int64_t numel, int q) const {
  const int64_t per = round_up(ceil_div(numel, size_), kAlign);
  return {std::min(q * per, numel), std::min((q + 1) * per, numel)};
}

int64_t ShmComm::piece_elems(int64_t element_size) const {
  return std::max(kAlign, slot_bytes_ / element_size / size_ / kAlign * kAlign);
}

std::pair<int64_t, int64_t> ShmComm::piece(int64_t numel, int q, int64_t c, int64_t P) const {
  const auto [b, e] = region(numel, q);
  return {std::min(b + c * P, e), std::min(b + (c + 1) * P, e)};
}

int64_t ShmComm::rounds(int64_t numel, int64_t P) const {
  return std::max<int64_t>(1, ceil_div(region(numel, 0).second, P));  // >= 1: the header travels with it
}

void ShmComm::stage_others(const at::Tensor& flat, int64_t u, int64_t c, int64_t P) {
  const int64_t numel = flat.numel(), esize = flat.element_size();
  const char* x = static_cast<const char*>(flat.const_data_ptr());
  for (int q = 0; q < size_; ++q) {
    if (q == rank_) continue;
    const auto [b, e] = piece(numel, q, c, P);
    std::memcpy(slot(u, rank_) + q * P * esize, x + b * esize, (e - b) * esize);
  }
}

void ShmComm::reduce_own(at::Tensor& flat, int64_t u, int64_t c, int64_t P, float divisor, bool publish) {
  const int64_t esize = flat.element_size();
  char* x = static_cast<char*>(flat.data_ptr());
  const auto [b, e] = piece(flat.numel(), rank_, c, P);
  std::vector<const void*> srcs(size_);
  for (int q = 0; q < size_; ++q) srcs[q] = q == rank_ ? x + b * esize : slot(u, q) + rank_ * P * esize;
  cpu::reduce_sources(flat.scalar_type(), srcs.data(), size_, x + b * esize,
                      publish ? slot(u, rank_) + rank_ * P * esize : nullptr, e - b, divisor);
}

char* ShmComm::slot(int64_t round, int q) const {
  return static_cast<char*>(seg_->base) + data_offset(size_) + ((round % 2) * size_ + q) * slot_bytes_;
}

// Note [Published failures]
// A rank that gives up on a collective part-way (a peer died or timed out, or, in the hierarchical
// all-reduce, its inter-host step failed) leaves the others' barriers behind: its arrival counter may
// already satisfy the barrier a late rank waits at (so the late rank would go on with data the others
// staged for an abandoned collective), and it no longer arrives where its peers wait (so they would wait
// out the whole timeout, or pair their barriers with its next collective). So the failure is published
// in the segment, in this rank's block, and every wait checks every rank's flag, also once its barrier is
// complete: from then on no rank of this host passes a barrier of this communicator.
void ShmComm::publish_failure(const std::string& why) {
  if (failure_.empty()) failure_ = why;
  RankBlock* b = seg_->block(rank_);
  if (b->failed.load(std::memory_order_acquire)) return;
  const size_t len = std::min<size_t>(why.size(), kWhyBytes - 1);
  std::memcpy(b->why, why.data(), len);
  b->why[len] = '\0';
  b->failed.store(1, std::memory_order_release);
  SegmentHeader* h = seg_->header();
  h->futex.fetch_add(1);  // wake sleepers so they see it now, not at their next poll
  futex(&h->futex, FUTEX_WAKE, INT32_MAX, nullptr);
}

void ShmComm::fail(const std::string& why) {
  publish_failure(why);
  TORCH_CHECK(false, why);
}

void ShmComm::abort(const std::string& why) {
  publish_failure(why);
}

void ShmComm::check_published_failures(const char* op) {
  for (int q = 0; q < size_; ++q) {
    RankBlock* b = seg_->block(q);
    if (q == rank_ || !b->failed.load(std::memory_order_acquire)) continue;
    std::ostringstream msg;
    msg << op << ": rank " << group_ranks_[q] << " (on this host) gave up on a shared-memory collective of this "
        << "group: " << std::string(b->why, strnlen(b->why, kWhyBytes));
    fail(msg.str());
  }
}

void ShmComm::begin(const char* op) {
  TORCH_CHECK(failure_.empty(), op, ": an earlier shared-memory collective on this group failed (", failure_,
              "); the group cannot be used any more");
  check_published_failures(op);
}

void ShmComm::check_peers(uint64_t target, double waited_s, const char* op) {
  std::ostringstream missing;
  int count = 0;
  for (int q = 0; q < size_; ++q) {
    RankBlock* b = seg_->block(q);
    if (b->arrived.load(std::memory_order_acquire) >= target) continue;
    const int pid = b->pid.load();
    if (!process_alive(pid)) {
      std::ostringstream msg;
      msg << op << ": rank " << group_ranks_[q] << " (pid " << pid << ", on this host) died during a shared-memory"
          << " collective";
      fail(msg.str());
    }
    missing << (count++ ? ", " : "") << group_ranks_[q];
  }
  if (waited_s > timeout_s_) {
    std::ostringstream msg;
    msg << op << ": timed out after " << timeout_s_ << " s waiting for rank(s) " << missing.str()
        << " in a shared-memory collective (they are alive but did not arrive: did every rank call it?)";
    fail(msg.str());
  }
}

void ShmComm::wait_all(uint64_t target, const char* op) {
  auto ready = [&] {
    for (int q = 0; q < size_; ++q) {
      if (seg_->block(q)->arrived.load(std::memory_order_acquire) < target) return false;
    }
    return true;
  };
  for (int i = 0; i < spins_; ++i) {
    if (ready()) return check_published_failures(op);  // Note [Published failures]
    PYPARALLEL_CPU_RELAX();
  }
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  auto checked = start;
  SegmentHeader* h = seg_->header();
  for (int yields = 0; !ready();) {
    if (yields < yields_) {
      ++yields;
      sched_yield();
    } else {
      h->sleepers.fetch_add(1);
      const uint32_t seen = h->futex.load();
      if (!ready()) {
        timespec ts{0, kFutexSleepMicros * 1000L};
        futex(&h->futex, FUTEX_WAIT, seen, &ts);
      }
      h->sleepers.fetch_sub(1);
    }
    check_published_failures(op);
    const auto now = clock::now();
    if (std::chrono::duration<double>(now - checked).count() > kPeerCheckSeconds) {
      checked = now;
      check_peers(target, std::chrono::duration<double>(now - start).count(), op);
    }
  }
  check_published_failures(op);
}

void ShmComm::arrive_and_wait(const char* op) {
  const uint64_t target = ++barriers_;
  seg_->block(rank_)->arrived.store(target);  // seq_cst: ordered before the sleepers check below
  SegmentHeader* h = seg_->header();
  if (h->sleepers.load() > 0) {
    h->futex.fetch_add(1);
    futex(&h->futex, FUTEX_WAKE, INT32_MAX, nullptr);
  }
  wait_all(target, op);
}

void ShmComm::publish_header(const CollectiveHeader& header) {
  const auto f = header.fields();
  std::copy(f.begin(), f.end(), seg_->block(rank_)->header[collectives_ % 2]);
}

void ShmComm::check_header(const char* op) {
  constexpr int kFields = CollectiveHeader::kFields;
  std::vector<int64_t> all(size_ * kFields);
  for (int q = 0; q < size_; ++q) {
    std::copy_n(seg_->block(q)->header[collectives_ % 2], kFields, all.data() + q * kFields);
  }
  ++collectives_;
  check_headers_agree(all.data(), size_, op);
}

void ShmComm::all_reduce(at::Tensor& flat, bool average, const char* op) {
  begin(op);
  if (size_ == 1) return;
  const int64_t numel = flat.numel(), esize = flat.element_size();
  const float divisor = average ? static_cast<float>(size_) : 1.0f;
  char* x = static_cast<char*>(flat.data_ptr());
  publish_header(CollectiveHeader::of(flat, Collective::kShmAllReduce, average, 0));

  if (numel * esize <= std::min(kOneShotBytes, slot_bytes_)) {
    const int64_t u = rounds_++;
    std::vector<const void*> srcs(size_);
    std::memcpy(slot(u, rank_), x, numel * esize);
    arrive_and_wait(op);
    check_header(op);
    for (int q = 0; q < size_; ++q) srcs[q] = q == rank_ ? x : slot(u, q);
    cpu::reduce_sources(flat.scalar_type(), srcs.data(), size_, x, nullptr, numel, divisor);
    ++paths_[0];
    return;
  }

  const int64_t P = piece_elems(esize);
  const auto [buffer, offset] = locate(flat);  // Note [Registered buffers]
  publish_location(buffer.get(), offset);
  const int64_t first = rounds_++;
  if (!buffer) stage_others(flat, first, 0, P);  // A of round 0, before the first barrier as always
  arrive_and_wait(op);
  const Placement where = placement(buffer.get(), offset);
  check_header(op);
  ++paths_[1 + static_cast<int>(where)];
  if (where == Placement::kRegistered) return reduce_registered(flat, *buffer, offset, divisor, op);
  if (where == Placement::kMixed) {  // the registered ranks stage now; every rank waits for them
    if (buffer) stage_others(flat, first, 0, P);
    arrive_and_wait(op);
  }
  for (int64_t c = 0, n = rounds(numel, P); c < n; ++c) {
    const int64_t u = c == 0 ? first : rounds_++;
    if (c > 0) {
      stage_others(flat, u, c, P);  // A
      arrive_and_wait(op);
    }
    reduce_own(flat, u, c, P, divisor, /*publish=*/true);  // B
    arrive_and_wait(op);
    for (int q = 0; q < size_; ++q) {  // C
      if (q == rank_) continue;
      const auto [b, e] = piece(numel, q, c, P);
      std::memcpy(x + b * esize, slot(u, q) + q * P * esize, (e - b) * esize);
    }
  }
}

at::Tensor ShmComm::map_buffer(const std::string& name, int64_t stride, bool create, int64_t id) {
  const char* op = "shm_empty";
  TORCH_CHECK(stride > 0 && stride % 4096 == 0, op, ": stride must be a positive multiple of 4096, got ", stride);
  TORCH_CHECK(id >= 0, op, ": buffer id must be non-negative, got ", id);
  {
    std::lock_guard<std::mutex> lock(buffers_mutex_);
    auto it = buffers_.find(id);
    TORCH_CHECK(it == buffers_.end() || it->second.expired(), op, ": buffer id ", id, " is already mapped");
  }
  TORCH_CHECK(!name.empty() && name[0] == '/' && name.find('/', 1) == std::string::npos, op,
              ": segment name must look like '/name', got '", name, "'");
  const int64_t bytes = stride * size_;
  void* base = map_shared(name, bytes, create, op, "buffer", "",
                          " (did every rank of this host call shm_empty with the same size, in the same order?)");
  auto buffer = std::make_shared<ShmBuffer>();
  buffer->base = static_cast<char*>(base);
  buffer->bytes = bytes;
  buffer->stride = stride;
  buffer->id = id;
  {
    std::lock_guard<std::mutex> lock(buffers_mutex_);
    buffers_[id] = buffer;
  }
  // The tensor owns the mapping; the communicator only remembers it (weakly) to recognise its tensors.
  return at::from_blob(buffer->base + rank_ * stride, {stride}, [buffer](void*) {}, at::TensorOptions().dtype(at::kByte));
}

std::pair<std::shared_ptr<ShmBuffer>, int64_t> ShmComm::locate(const at::Tensor& flat) {
  const char* p = static_cast<const char*>(flat.const_data_ptr());
  const int64_t nbytes = flat.numel() * flat.element_size();
  std::lock_guard<std::mutex> lock(buffers_mutex_);
  for (auto it = buffers_.begin(); it != buffers_.end();) {
    std::shared_ptr<ShmBuffer> b = it->second.lock();
    if (!b) {  // its tensor is gone
      it = buffers_.erase(it);
      continue;
    }
    const char* part = b->base + rank_ * b->stride;
    if (p >= part && p + nbytes <= part + b->stride) return {b, p - part};
    ++it;
  }
  return {nullptr, -1};
}

void ShmComm::publish_location(const ShmBuffer* buffer, int64_t offset) {
  int64_t* loc = seg_->block(rank_)->location[collectives_ % 2];
  loc[0] = buffer ? buffer->id : -1;
  loc[1] = buffer ? offset : -1;
}

ShmComm::Placement ShmComm::placement(const ShmBuffer* buffer, int64_t offset) const {
  int registered = 0;
  bool same = true;
  for (int q = 0; q < size_; ++q) {
    const int64_t* loc = seg_->block(q)->location[collectives_ % 2];
    registered += loc[0] >= 0;
    same = same && buffer != nullptr && loc[0] == buffer->id && loc[1] == offset;
  }
  if (registered == 0) return Placement::kStaged;
  return same ? Placement::kRegistered : Placement::kMixed;
}

void ShmComm::reduce_registered(at::Tensor& flat, const ShmBuffer& buffer, int64_t offset, float divisor,
                                const char* op) {
  const int64_t numel = flat.numel(), esize = flat.element_size(), P = piece_elems(esize);
  auto at = [&](int q, int64_t element) { return buffer.base + q * buffer.stride + offset + element * esize; };
  std::vector<const void*> srcs(size_);
  // In rounds of one piece per region, as the staged path: what an owner has just reduced is still in
  // cache when the others copy it.
  for (int64_t c = 0, n = rounds(numel, P); c < n; ++c) {
    const auto [b, e] = piece(numel, rank_, c, P);
    for (int q = 0; q < size_; ++q) srcs[q] = at(q, b);  // srcs[rank_] is flat itself: reduced in place
    cpu::reduce_sources(flat.scalar_type(), srcs.data(), size_, at(rank_, b), nullptr, e - b, divisor);
    arrive_and_wait(op);
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      const auto [qb, qe] = piece(numel, q, c, P);
      std::memcpy(at(rank_, qb), at(q, qb), (qe - qb) * esize);
    }
  }
  arrive_and_wait(op);
}

void ShmComm::reduce_scatter(at::Tensor& flat, const CollectiveHeader& header, const char* op) {
  begin(op);
  if (size_ == 1) return;
  const int64_t P = piece_elems(flat.element_size());
  publish_header(header);
  for (int64_t c = 0, n = rounds(flat.numel(), P); c < n; ++c) {
    const int64_t u = rounds_++;
    stage_others(flat, u, c, P);
    arrive_and_wait(op);
    if (c == 0) check_header(op);
    reduce_own(flat, u, c, P, 1.0f, /*publish=*/false);
  }
}

void ShmComm::all_gather(at::Tensor& flat, const CollectiveHeader& header, const char* op) {
  begin(op);
  if (size_ == 1) return;
  const int64_t numel = flat.numel(), esize = flat.element_size(), P = piece_elems(esize) * size_;  // whole slot
  char* x = static_cast<char*>(flat.data_ptr());
  publish_header(header);
  for (int64_t c = 0, n = rounds(numel, P); c < n; ++c) {
    const int64_t u = rounds_++;
    const auto [b, e] = piece(numel, rank_, c, P);
    std::memcpy(slot(u, rank_), x + b * esize, (e - b) * esize);
    arrive_and_wait(op);
    if (c == 0) check_header(op);
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      const auto [qb, qe] = piece(numel, q, c, P);
      std::memcpy(x + qb * esize, slot(u, q), (qe - qb) * esize);
    }
  }
}

namespace {

std::mutex registry_mutex;
std::unordered_map<std::string, std::shared_ptr<ShmComm>>& registry() {
  static auto* r = new std::unordered_map<std::string, std::shared_ptr<ShmComm>>();
  return *r;
}

void shm_attach(const std::string& comm, const std::string& segment, int64_t local_rank, int64_t local_size,
                at::IntArrayRef group_ranks, int64_t slot_bytes, bool create, double timeout_s) {
  auto c = std::make_shared<ShmComm>(segment, static_cast<int>(local_rank), static_cast<int>(local_size),
                                     group_ranks.vec(), slot_bytes, create, timeout_s);
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry()[comm] = std::move(c);
}

void shm_unlink_segment(const std::string& segment) {
  TORCH_CHECK(shm_unlink(segment.c_str()) == 0 || errno == ENOENT, "shm_unlink: cannot unlink ", segment, ": ",
              errno_text());
}

at::Tensor shm_map_buffer(const std::string& comm, const std::string& segment, int64_t stride, bool create,
                          int64_t id) {
  return shm_comm(comm)->map_buffer(segment, stride, create, id);
}

std::vector<int64_t> shm_paths(const std::string& comm) { return shm_comm(comm)->paths(); }

void shm_detach(const std::string& comm) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry().erase(comm);
}

int64_t shm_all_reduce(at::Tensor& tensor, const std::string& comm, bool average) {
  const char* op = "shm_all_reduce_";
  check_float_tensor(tensor, op, "tensor");
  TORCH_CHECK(tensor.device().is_cpu(), op, ": tensor must be on the CPU, got ", tensor.device());
  std::shared_ptr<ShmComm> c = shm_comm(comm);
  at::Tensor flat = tensor.is_contiguous() ? tensor.view(-1) : tensor.contiguous().view(-1);
  c->all_reduce(flat, average, op);
  if (!tensor.is_contiguous()) tensor.copy_(flat.view(tensor.sizes()));
  return 0;  // nothing crossed a network
}

}  // namespace

std::shared_ptr<ShmComm> shm_comm(const std::string& name) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry().find(name);
  TORCH_CHECK(it != registry().end(), "no shared-memory communicator '", name, "' is attached in this process");
  return it->second;
}

}  // namespace pyparallel

TORCH_LIBRARY_IMPL(pyparallel, CompositeExplicitAutograd, m) {
  m.impl("shm_all_reduce_", &pyparallel::shm_all_reduce);
}

TORCH_LIBRARY_IMPL(pyparallel, CatchAll, m) {
  m.impl("shm_attach", &pyparallel::shm_attach);
  m.impl("shm_unlink", &pyparallel::shm_unlink_segment);
  m.impl("shm_detach", &pyparallel::shm_detach);
  m.impl("shm_map_buffer", &pyparallel::shm_map_buffer);
  m.impl("shm_paths", &pyparallel::shm_paths);
}
