// A ring over a torch.distributed process group: each rank sends to rank + 1 and receives from rank - 1,
// using the group's own point-to-point send/recv (Gloo for CPU tensors, NCCL for CUDA tensors).
// No sockets, launcher or rendezvous of our own: the group is found by name with
// c10d::resolve_process_group, exactly as torch's functional collectives do.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <deque>
#include <string>
#include <vector>

namespace pyparallel {

// Tags of our point-to-point messages: far above the small tags users pass to dist.send/recv.
constexpr int kTagBase = 0x3A000000;
constexpr int kTagSpan = 1 << 20;

// Header fields every rank must agree on before a collective moves data (see Ring::verify).
struct CollectiveHeader {
  int64_t kind;      // which collective (dense / int8 / top-k)
  int64_t dtype;     // at::ScalarType
  int64_t numel;
  int64_t average;   // 0 = sum, 1 = average
  int64_t param;     // block size (int8), k (top-k), 0 otherwise
  int64_t device;    // at::DeviceType
};

// One step of the ring: a send to the next rank and a receive from the previous one, either possibly
// empty. On NCCL both are posted as one coalesced group (with two ranks, next == prev and two separate
// NCCL calls on one stream would deadlock); on Gloo they are independent and progress in Gloo's IO thread.
struct RingStep {
  c10::intrusive_ptr<c10d::Work> send;
  c10::intrusive_ptr<c10d::Work> recv;  // on NCCL: the coalesced work for both
  std::vector<at::Tensor> keep;         // tensors the transport may touch until the step completes
  bool send_done = false, recv_done = false;
};

class Ring {
 public:
  Ring(const std::string& group_name, const at::Tensor& like);
  ~Ring();
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }

  // Raises the same error on every rank if any rank's header differs (one small all-gather).
  void verify(const CollectiveHeader& header, const char* op);

  // Posts send -> next and prev -> recv and returns the step's id; `seq` numbers the message within the
  // collective (it becomes the tag, so Gloo matches messages exactly even with many in flight).
  size_t post(const at::Tensor& send, const at::Tensor& recv, int64_t seq);
  // Point-to-point outside the ring pattern (the sparse all-gather talks to every peer directly).
  size_t post_send(const at::Tensor& send, int peer, int64_t seq);
  size_t post_recv(const at::Tensor& recv, int peer, int64_t seq);
  void wait_recv(size_t step);  // the received data may be used after this (stream-ordered on CUDA)
  void wait(size_t step);       // both directions done

  // Waits for every step; call before returning normally. If a collective throws instead, the
  // destructor keeps the unfinished steps' works and buffers alive for good: the transport may still
  // write into them, and a leak is better than a use-after-free.
  void finish();
  int64_t bytes_sent() const { return bytes_sent_; }

 private:
  size_t record(RingStep step, int64_t sent_bytes);  // derives the done flags; returns the step's id

  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  int rank_ = 0, size_ = 1, next_ = 0, prev_ = 0;
  bool coalesce_ = false;  // CUDA tensors: NCCL
  c10::Device device_{c10::kCPU};
  int64_t bytes_sent_ = 0;
  std::deque<RingStep> steps_;
};

// Splits numel elements into n chunks whose sizes are multiples of `align` (the last chunks may be
// shorter or empty), and each chunk into `segments` pipeline segments of equal aligned size.
class Partition {
 public:
  Partition(int64_t numel, int n, int64_t align, int64_t segment_elems);
  int64_t segments() const { return segments_; }
  // [begin, end) of segment j of chunk c, in elements (empty when begin == end).
  int64_t begin(int c, int64_t j) const;
  int64_t end(int c, int64_t j) const;
  int64_t chunk_begin(int c) const { return std::min(c * per_chunk_, numel_); }
  int64_t chunk_end(int c) const { return std::min((c + 1) * per_chunk_, numel_); }
  int64_t max_segment() const { return per_segment_; }

 private:
  int64_t numel_, per_chunk_, per_segment_, segments_;
};

inline int mod(int64_t a, int n) { return static_cast<int>(((a % n) + n) % n); }

// Note [Ring schedule]
// A ring phase (reduce-scatter or all-gather) is (n - 1) steps of J segments: op i = (step i / J,
// segment i % J). The data op i sends is what op i - J received (for i >= J), so op i may be posted
// once op i - J is consumed; `max_ahead` bounds how far posting runs ahead of consuming (1 when receives
// go through a double buffer). Posting the next op before consuming the current one is what overlaps a
// segment's transfer with the previous segment's reduction.
template <class Post, class Consume>
void ring_schedule(int64_t ops, int64_t segments, int64_t max_ahead, Post&& post, Consume&& consume) {
  int64_t posted = 0;
  for (int64_t i = 0; i < ops; ++i) {
    while (posted < ops && posted <= i + max_ahead && (posted < segments || posted - segments < i)) post(posted++);
    consume(i);
  }
}

}  // namespace pyparallel
