// One collective's use of a transport (Note [Transport seam] in transport.h).
#pragma once

#include <ATen/ATen.h>

#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "comm/header.h"
#include "comm/transport.h"

namespace pyparallel {

// Note [Message tags]
// Our point-to-point messages use tags far above the small ones users pass to dist.send/recv. Every
// collective on a group takes the group's next number and owns a window of kTagSpan tags derived from
// it, so messages of two collectives never match each other, whatever thread issues them: every rank
// issues the same collectives on a group in the same order, so the numbers agree across ranks.
constexpr int kTagBase = 0x3A000000;
constexpr int kTagSpan = 1 << 20;    // messages per collective before tags repeat within it
constexpr int kTagWindows = 1 << 10; // collectives before windows repeat (kTagBase + 2^30 < 2^31)

class Session {
 public:
  // Takes the group's next collective number, raises if an earlier collective on the group failed in
  // flight (its peers' state is unknown: the group cannot be used any more), and then checks `header`
  // against every rank's through the transport itself (always: a mismatch raises the same error on
  // every rank instead of a crash or a hang).
  // `carry`, where given and at most kCarryBytes, travels with the header where the transport can
  // (Note [Carried header]); carried() says whether it did, carried_row(q) is rank q's copy.
  Session(const std::string& group, const at::Tensor& like, const CollectiveHeader& header, const char* op,
          const at::Tensor* carry = nullptr);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int next() const { return (rank_ + 1) % size_; }
  int prev() const { return (rank_ + size_ - 1) % size_; }

  // Ring step: send -> next and prev -> recv (either may be empty). `seq` numbers the message within the
  // collective. Returns the step's id.
  size_t post(const at::Tensor& send, const at::Tensor& recv, int64_t seq);
  // Point-to-point outside the ring pattern (the sparse all-gather talks to every peer directly).
  size_t post_send(const at::Tensor& send, int peer, int64_t seq);
  size_t post_recv(const at::Tensor& recv, int peer, int64_t seq);
  bool independent_transfers() const { return transport_->independent_transfers(); }
  void wait_recv(size_t step);  // the received data may be used after this (stream-ordered on CUDA)
  void wait(size_t step);       // both directions done

  // Waits for every step; call before returning normally. If the collective throws instead, the
  // destructor keeps the unfinished steps' transfers and buffers alive for good (the transport may still
  // write into them: a leak is better than a use-after-free) and marks the group failed.
  void finish();
  int64_t bytes_sent() const { return bytes_sent_; }
  bool carried() const { return carried_; }
  const void* carried_row(int q) const;

 private:
  struct Step {
    TransferPtr send, recv;
    std::vector<at::Tensor> keep;  // tensors the transport may touch until the step completes
  };
  size_t record(Step step, int64_t sent_bytes);
  int tag(int64_t seq) const;
  void exchange_headers(const CollectiveHeader& header, const char* op, const at::Tensor* carry);
  template <class F>
  auto guarded(F&& f) -> decltype(f());  // a transfer that throws marks the group failed
  template <class F>
  void with_context(const char* op, F&& f);  // guarded, and an error that says it was the header check

  std::string group_;
  std::shared_ptr<Transport> transport_;
  c10::Device device_{c10::kCPU};
  int rank_ = 0, size_ = 1;
  int64_t window_ = 0;  // this collective's tag window
  int64_t bytes_sent_ = 0;
  std::deque<Step> steps_;
  bool carried_ = false;
  at::Tensor rows_;  // the carried all-gather: [size, header + carry tier] bytes
};

// Why a collective on the group failed in flight ("" if none has): the group's later collectives raise.
std::string group_failure(const std::string& group);

// Forgets a group's collective numbers and failure (after the group is destroyed: a new group may reuse
// the name).
void release_group_state(const std::string& group);

}  // namespace pyparallel
