// Collectives through POSIX shared memory between the ranks of one host (CPU tensors).
//
// Note [Shared-memory collectives]
// One segment per (process group, host), created exclusively under a job-unique name by the host's
// first rank with every page reserved (a sparse one would die of SIGBUS on a page first touched once
// /dev/shm has filled up, e.g. with shm_empty buffers), opened by the others, and unlinked by the creator
// as soon as every local rank has mapped it (pyparallel/transport.py runs that handshake through the
// group's store), so nothing is left in /dev/shm even if a rank is killed later. The segment has a fixed
// size: a control block per local rank and two sets of L slots of slot_bytes (L = local ranks); tensors of
// any size stream through it in rounds, and consecutive rounds alternate between the two sets.
//
// A tensor of numel elements is cut into L regions (region q: [q R, (q + 1) R), R = ceil(numel / L)
// rounded up to 16 elements); local rank q owns region q. A round moves one piece of P elements of
// every region, P = slot_bytes / (L * element size). All-reduce, per round:
//   A. each rank copies its pieces of the other ranks' regions into its own slot, then arrives;
//   B. each rank reduces its own region's piece over all ranks, in rank order, accumulating in fp32
//      (its own contribution read from its tensor), writes the result to its tensor and to its slot,
//      then arrives;
//   C. each rank copies the other regions' results from their owners' slots.
// Every element is reduced once, by its owner, so every rank ends with the same bits. Small tensors
// (up to kOneShotBytes) take one round with one barrier: every rank copies its whole tensor into its
// slot and reduces all slots itself, in rank order (same bits everywhere again). reduce_scatter and
// all_gather are phases A+B and C on their own, for the hierarchical all-reduce.
//
// Synchronisation: each rank's control block has a counter of the barriers it reached. A barrier is
// "store my counter, wait until every counter reaches it": spin briefly, then yield, then sleep on a
// futex in the segment (woken by arriving ranks when someone sleeps), so that 4 ranks on 2 cores do not
// starve each other. Alternating slot sets make one barrier per phase enough: a rank writes a set again
// only after a barrier that every rank reached after its last read of that set. Every wait is bounded
// by the group's timeout and checks that the ranks it waits for are alive; a failure names the rank
// and leaves the communicator failed, so later collectives raise at once instead of hanging, and it is
// published in the segment, so the host's other ranks raise at their next wait instead of waiting for
// this rank or passing a barrier with its stale arrival (Note [Published failures], shm.cpp). The
// header (collective, dtype, numel, reduction) travels in the control blocks with the first barrier of
// every collective and is checked there: no extra round trip.
//
// Note [Registered buffers]
// Staging costs bytes: above, each rank moves N (5 - 2/L) bytes through memory where the all-reduce needs
// only its N-byte read and N-byte write, and on a machine with fewer cores than ranks that (not the barriers)
// is what the time goes to. A tensor allocated by pyparallel.shm_empty lives in a buffer segment that every
// local rank has mapped (L parts of `stride` bytes, one per rank, allocated collectively in the same order on
// every rank, as torch's symmetric memory): peers read it where it is. Each rank publishes where its tensor
// lies (buffer id, offset in its part) with the header; the id is the buffer's number among the group's
// shm_empty calls, which every rank counts alike even when a call failed on some ranks only (a count of the
// buffers mapped here would then differ, and two different buffers could pass for one); when every rank's
// tensor is at the same place of the same buffer, the all-reduce runs in rounds of one piece per region, as
// the staged path (so an owner's fresh result is still in cache when the others copy it): rank q reduces its
// piece of region q straight from every rank's part into its own tensor (peers read region q of the others,
// which only its owner writes), barrier; each rank copies the other regions' pieces from their owners'
// tensors (nobody reads those pieces of its tensor again). A final barrier keeps every rank from returning,
// and its caller from changing its tensor, while a peer still reads it. One barrier per round instead of two,
// N (2 - 1/L) bytes read and N written per rank, no slot. Otherwise (some tensors elsewhere, or at other
// offsets) every rank takes the staged path, the registered ranks staging one barrier later: the decision is
// taken by every rank from the same published locations, so all take the same path, and the bits are the
// staged path's either way (each region reduced by its owner, in rank order).
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "comm/header.h"

namespace pyparallel {

struct ShmSegment;  // the mapping (shm.cpp)
struct ShmBuffer;   // a mapped buffer segment (Note [Registered buffers])

class ShmComm {
 public:
  // Maps segment `name` (creating it exclusively when `create`) as local rank `local_rank` of
  // `local_size`; `group_ranks[q]` is local rank q's rank in the process group, for error messages.
  ShmComm(const std::string& name, int local_rank, int local_size, std::vector<int64_t> group_ranks,
          int64_t slot_bytes, bool create, double timeout_s);
  ~ShmComm();
  ShmComm(const ShmComm&) = delete;
  ShmComm& operator=(const ShmComm&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool failed() const { return !failure_.empty(); }  // a rank died or timed out: no collective may run
  // Marks the communicator failed here and for every rank of this host (Note [Published failures] in
  // shm.cpp): this rank left a collective part-way, so the others must not wait for it.
  void abort(const std::string& why);

  // In place on a contiguous tensor; average divides the sum by size().
  void all_reduce(at::Tensor& flat, bool average, const char* op);
  // Region rank() of flat receives the sum over ranks (no division); the rest of flat is left as it was.
  void reduce_scatter(at::Tensor& flat, const CollectiveHeader& header, const char* op);
  // Region q of every rank's flat receives rank q's region q.
  void all_gather(at::Tensor& flat, const CollectiveHeader& header, const char* op);
  // [begin, end) of region q for a tensor of numel elements.
  std::pair<int64_t, int64_t> region(int64_t numel, int q) const;
  // Maps buffer segment `name` (size() parts of `stride` bytes; created exclusively and reserved when
  // `create`) under `id` and returns this rank's part as a uint8 tensor, which keeps the mapping alive.
  // Collective over the local ranks. `id` names the segment in the published locations, so every rank
  // must give the same id for the same segment and different ids for different ones: the caller's count
  // of buffers (pyparallel/transport.py), not the buffers mapped here, which differ once a rank failed
  // to map one that the others mapped.
  at::Tensor map_buffer(const std::string& name, int64_t stride, bool create, int64_t id);
  // All-reduces so far by path: small (one round), staged, registered, mixed (Note [Registered buffers]).
  std::vector<int64_t> paths() const { return {paths_[0], paths_[1], paths_[2], paths_[3]}; }

 private:
  char* slot(int64_t round, int q) const;
  void arrive_and_wait(const char* op);
  void wait_all(uint64_t target, const char* op);
  void check_peers(uint64_t target, double waited_s, const char* op);
  [[noreturn]] void fail(const std::string& why);  // publish_failure, then raise
  void publish_failure(const std::string& why);
  void check_published_failures(const char* op);  // raises if another local rank published one
  void publish_header(const CollectiveHeader& header);
  void check_header(const char* op);  // after the collective's first barrier
  void begin(const char* op);         // raises if an earlier collective failed
  int64_t piece_elems(int64_t element_size) const;  // P: elements of one region per round
  // [begin, end) of region q's piece in round c, and the number of rounds (>= 1) for numel elements.
  std::pair<int64_t, int64_t> piece(int64_t numel, int q, int64_t c, int64_t P) const;
  int64_t rounds(int64_t numel, int64_t P) const;
  void stage_others(const at::Tensor& flat, int64_t u, int64_t c, int64_t P);  // phase A of round c
  // The registered buffer holding all of flat in this rank's part (null if none) and flat's offset there.
  std::pair<std::shared_ptr<ShmBuffer>, int64_t> locate(const at::Tensor& flat);
  void publish_location(const ShmBuffer* buffer, int64_t offset);
  enum class Placement { kStaged, kRegistered, kMixed };  // no rank / every rank / some ranks registered
  Placement placement(const ShmBuffer* buffer, int64_t offset) const;  // after the first barrier
  void reduce_registered(at::Tensor& flat, const ShmBuffer& buffer, int64_t offset, float divisor, const char* op);
  // Phase B: this rank's piece reduced in rank order into flat (and into its slot when publish).
  void reduce_own(at::Tensor& flat, int64_t u, int64_t c, int64_t P, float divisor, bool publish);

  std::unique_ptr<ShmSegment> seg_;
  std::mutex buffers_mutex_;  // tensors of registered buffers may die on any thread
  std::unordered_map<int64_t, std::weak_ptr<ShmBuffer>> buffers_;  // by id; dead ones pruned by locate
  int rank_, size_;
  std::vector<int64_t> group_ranks_;
  int64_t slot_bytes_;
  double timeout_s_;
  int spins_, yields_;  // how a wait polls and yields before it sleeps (shm.cpp: by cores per rank)
  uint64_t barriers_ = 0;     // barriers passed (same on every rank)
  int64_t rounds_ = 0;        // rounds started: the parity picks the slot set
  int64_t collectives_ = 0;   // collectives started: the parity picks the header slot
  std::string failure_;
  int64_t paths_[4] = {0, 0, 0, 0};
};

// The communicator attached under `name` (shm_attach); raises if there is none.
std::shared_ptr<ShmComm> shm_comm(const std::string& name);

}  // namespace pyparallel
