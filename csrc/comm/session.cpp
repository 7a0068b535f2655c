// Session: tags, header check, transfers and their keep-alive for one collective; see session.h.
#include "comm/session.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <optional>
#include <unordered_map>

namespace pyparallel {
namespace {

struct GroupState {
  int64_t collectives = 0;  // collectives started on the group (Note [Message tags])
  std::string failure;      // set once a collective failed in flight
  // The group these belong to (Transport::incarnation). Held weakly: a weak pointer keeps the dead
  // object's memory, so a new group can never reuse its address and pass for it.
  std::optional<c10::weak_intrusive_ptr<c10::intrusive_ptr_target>> incarnation;
};

std::mutex& state_mutex() {
  static auto* m = new std::mutex();
  return *m;
}
std::unordered_map<std::string, GroupState>& states() {
  static auto* s = new std::unordered_map<std::string, GroupState>();  // never destroyed: see graveyard
  return *s;
}

// Steps of collectives that threw: kept alive forever (see Session::finish).
std::vector<std::shared_ptr<void>>& graveyard() {
  static auto* steps = new std::vector<std::shared_ptr<void>>();
  return *steps;
}

void mark_failed(const std::string& group, const std::string& why) {
  std::lock_guard<std::mutex> lock(state_mutex());
  std::string& failure = states()[group].failure;
  if (failure.empty()) failure = why;
}

}  // namespace

std::string group_failure(const std::string& group) {
  std::lock_guard<std::mutex> lock(state_mutex());
  auto it = states().find(group);
  return it == states().end() ? std::string() : it->second.failure;
}

void release_group_state(const std::string& group) {
  std::lock_guard<std::mutex> lock(state_mutex());
  states().erase(group);
}

Session::Session(const std::string& group, const at::Tensor& like, const CollectiveHeader& header, const char* op,
                 const at::Tensor* carry)
    : group_(group) {
  transport_ = transport_for(group, like);
  {
    auto incarnation = transport_->incarnation();
    std::lock_guard<std::mutex> lock(state_mutex());
    GroupState& s = states()[group];
    if (!s.incarnation || s.incarnation->expired() ||
        s.incarnation->_unsafe_get_target() != incarnation._unsafe_get_target()) {
      s = GroupState{};  // a new group under this name: its numbers start at 0 on every rank
      s.incarnation = std::move(incarnation);
    }
    TORCH_CHECK(s.failure.empty(), op, ": an earlier collective on process group '", group,
                "' failed while messages were in flight, so the ranks no longer agree on what comes next: ",
                s.failure, " (create a new process group to go on)");
    window_ = s.collectives++ % kTagWindows;
  }
  device_ = like.device();
  rank_ = transport_->rank();
  size_ = transport_->size();
  if (size_ > 1) exchange_headers(header, op, carry);
}

Session::~Session() {
  bool unfinished = false;
  for (const Step& s : steps_) unfinished = unfinished || s.send || s.recv;
  if (!unfinished) return;
  mark_failed(group_, "a collective raised before its transfers completed");
  auto kept = std::make_shared<std::deque<Step>>(std::move(steps_));
  std::lock_guard<std::mutex> lock(state_mutex());
  graveyard().push_back(kept);
}

template <class F>
auto Session::guarded(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::exception& e) {
    mark_failed(group_, e.what());
    throw;
  }
}

int Session::tag(int64_t seq) const {
  return kTagBase + static_cast<int>(window_ * kTagSpan + seq % kTagSpan);
}

// A header exchange that fails (Gloo's own timeout or a closed connection) says which collective and
// group it was and the likely cause, not only Gloo's message: a rank that called another collective, or
// the same one with another transport, is the usual reason. The group is marked failed (guarded).
template <class F>
void Session::with_context(const char* op, F&& f) {
  try {
    guarded(f);
  } catch (const std::exception& e) {
    std::string why = e.what();
    TORCH_CHECK(false, op, ": the header check with the other ranks of process group '", group_, "' failed (did every ",
                "rank call the same collective, with the same transport?): ", why.substr(0, why.find('\n')));
  }
}

// Every rank learns every rank's header: straight from each peer where the transport allows independent
// transfers (one round), else by a ring all-gather (n - 1 exchanges). Either way only this collective's
// own tags are used, so nothing can cross a collective the caller runs on the same group meanwhile.
void Session::exchange_headers(const CollectiveHeader& header, const char* op, const at::Tensor* carry) {
  constexpr int kFields = CollectiveHeader::kFields;
  constexpr int64_t kHeaderBytes = kFields * sizeof(int64_t);
  const auto mine = header.fields();
  if (transport_->has_all_gather()) {  // Note [Carried header]
    const int64_t nbytes = carry == nullptr ? -1 : carry->numel() * carry->element_size();
    carried_ = nbytes >= 0 && nbytes <= kCarryBytes;
    if (nbytes > 0 && carried_) {
      TORCH_CHECK(carry->is_contiguous() && carry->device().is_cpu(), op, ": a carried tensor must be contiguous on the CPU");
    }
    const auto* payload = carried_ && nbytes > 0 ? static_cast<const uint8_t*>(carry->const_data_ptr()) : nullptr;
    // Round 1: rows of kFirstRowBytes on every rank, whatever it carries, so that ranks that disagree
    // exchange rows of one size and all of them raise the header check's error below.
    const int64_t head = std::min<int64_t>(std::max<int64_t>(nbytes, 0), kFirstRowBytes - kHeaderBytes);
    at::Tensor in = at::zeros({kFirstRowBytes}, at::kByte);  // zeros: the unused bytes are the same on every rank
    std::memcpy(in.data_ptr(), mine.data(), kHeaderBytes);
    if (payload != nullptr) std::memcpy(in.data_ptr<uint8_t>() + kHeaderBytes, payload, head);
    at::Tensor out = at::empty({size_ * kFirstRowBytes}, at::kByte);  // flat: Gloo checks its chunks' shape against `in`
    with_context(op, [&] { transport_->all_gather(in, out)->wait(); });
    at::Tensor first = out.view({size_, kFirstRowBytes});
    at::Tensor all = at::empty({size_, kFields}, at::kLong);
    for (int q = 0; q < size_; ++q) {
      std::memcpy(all[q].data_ptr<int64_t>(), first[q].const_data_ptr<uint8_t>(), kHeaderBytes);
    }
    bytes_sent_ = 0;
    check_headers_agree(all.const_data_ptr<int64_t>(), size_, op);
    if (!carried_) return;
    bytes_sent_ = kFirstRowBytes * (size_ - 1);  // the carried payload's traffic from this rank
    // Every rank now has the same numel and dtype, hence the same nbytes: round 2 (only for what did not
    // fit in round 1) has rows of one size everywhere.
    rows_ = at::empty({size_, std::max<int64_t>(nbytes, 1)}, at::kByte);
    const int64_t rest = nbytes - head;
    at::Tensor tail;
    if (rest > 0) {
      at::Tensor tail_in = at::from_blob(const_cast<uint8_t*>(payload) + head, {rest}, at::kByte);
      tail = at::empty({size_ * rest}, at::kByte);
      with_context(op, [&] { transport_->all_gather(tail_in, tail)->wait(); });
      bytes_sent_ += rest * (size_ - 1);
    }
    for (int q = 0; q < size_; ++q) {
      uint8_t* row = rows_[q].data_ptr<uint8_t>();
      std::memcpy(row, first[q].const_data_ptr<uint8_t>() + kHeaderBytes, head);
      if (rest > 0) std::memcpy(row + head, tail.const_data_ptr<uint8_t>() + q * rest, rest);
    }
    return;
  }
  at::Tensor all = at::empty({size_, kFields}, at::kLong);
  std::copy(mine.begin(), mine.end(), all[rank_].data_ptr<int64_t>());
  const int64_t seq = kTagSpan - 1;  // the window's last tag: data messages never get that far
  if (transport_->independent_transfers()) {
    std::vector<size_t> ids;
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      ids.push_back(post_recv(all[q], q, seq));
      ids.push_back(post_send(all[rank_], q, seq));
    }
    with_context(op, [&] {
      for (size_t id : ids) wait(id);
    });
  } else {  // NCCL: a ring all-gather of the rows, on the collective's device
    at::Tensor rows = all.to(device_);
    for (int s = 0; s < size_ - 1; ++s) {
      const int send_row = (rank_ - s + size_) % size_, recv_row = (rank_ - s - 1 + size_) % size_;
      wait(post(rows[send_row], rows[recv_row], seq - s));
    }
    all = rows.cpu();
  }
  finish();
  bytes_sent_ = 0;  // bytes_sent() counts the collective's payload
  check_headers_agree(all.const_data_ptr<int64_t>(), size_, op);
}

const void* Session::carried_row(int q) const {
  TORCH_CHECK(carried_, "Session::carried_row: nothing was carried");
  return rows_[q].const_data_ptr<uint8_t>();
}

size_t Session::record(Step step, int64_t sent_bytes) {
  bytes_sent_ += sent_bytes;
  steps_.push_back(std::move(step));
  return steps_.size() - 1;
}

size_t Session::post(const at::Tensor& send, const at::Tensor& recv, int64_t seq) {
  Step step;
  std::tie(step.send, step.recv) = guarded([&] { return transport_->exchange(send, next(), recv, prev(), tag(seq)); });
  step.keep = {send, recv};
  return record(std::move(step), send.numel() * send.element_size());
}

size_t Session::post_send(const at::Tensor& send, int peer, int64_t seq) {
  Step step;
  step.send = guarded([&] { return transport_->send(send, peer, tag(seq)); });
  step.keep = {send};
  return record(std::move(step), send.numel() * send.element_size());
}

size_t Session::post_recv(const at::Tensor& recv, int peer, int64_t seq) {
  Step step;
  step.recv = guarded([&] { return transport_->recv(recv, peer, tag(seq)); });
  step.keep = {recv};
  return record(std::move(step), 0);
}

void Session::wait_recv(size_t id) {
  Step& s = steps_.at(id);
  if (s.recv) {
    guarded([&] { s.recv->wait(); });
    s.recv.reset();
  }
}

void Session::wait(size_t id) {
  wait_recv(id);
  Step& s = steps_.at(id);
  if (s.send) {
    guarded([&] { s.send->wait(); });
    s.send.reset();
  }
}

void Session::finish() {
  for (size_t i = 0; i < steps_.size(); ++i) wait(i);
  steps_.clear();
}

}  // namespace pyparallel
