// Ring transport over c10d point-to-point; see ring.h.
#include "comm/ring.h"

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include <mutex>
#include <sstream>

#include "common.h"

namespace pyparallel {
namespace {

// Steps of collectives that threw: kept alive forever (see Ring::finish).
std::mutex graveyard_mutex;
std::vector<RingStep>& graveyard() {
  static auto* steps = new std::vector<RingStep>();  // never destroyed: the transport may outlive statics
  return *steps;
}


int tag_of(int64_t seq) { return kTagBase + static_cast<int>(seq % kTagSpan); }

const char* kind_name(int64_t kind) {
  switch (kind) {
    case 0: return "dense";
    case 1: return "int8";
    case 2: return "topk";
    default: return "unknown";
  }
}

std::string field_value(int field, int64_t v) {
  switch (field) {
    case 0: return kind_name(v);
    case 1: return c10::toString(static_cast<at::ScalarType>(v));
    case 3: return v ? "average" : "sum";
    case 5: return c10::DeviceTypeName(static_cast<c10::DeviceType>(v), /*lower_case=*/true);
    default: return std::to_string(v);
  }
}

}  // namespace

Ring::Ring(const std::string& group_name, const at::Tensor& like) {
  pg_ = c10d::resolve_process_group(group_name);
  rank_ = pg_->getRank();
  size_ = pg_->getSize();
  next_ = (rank_ + 1) % size_;
  prev_ = (rank_ + size_ - 1) % size_;
  coalesce_ = like.is_cuda();
  device_ = like.device();
}

Ring::~Ring() {
  std::vector<RingStep> unfinished;
  for (auto& s : steps_) {
    if (!s.send_done || !s.recv_done) unfinished.push_back(std::move(s));
  }
  if (!unfinished.empty()) {
    std::lock_guard<std::mutex> lock(graveyard_mutex);
    for (auto& s : unfinished) graveyard().push_back(std::move(s));
  }
}

void Ring::verify(const CollectiveHeader& h, const char* op) {
  if (size_ == 1) return;
  constexpr int kFields = 6;
  static const char* names[kFields] = {"collective", "dtype", "numel", "reduction", "block size or k", "device"};
  const int64_t mine_values[kFields] = {h.kind, h.dtype, h.numel, h.average, h.param, h.device};
  at::Tensor mine = at::empty({kFields}, at::kLong);
  std::copy(mine_values, mine_values + kFields, mine.data_ptr<int64_t>());
  mine = mine.to(device_);
  std::vector<at::Tensor> in{mine};
  std::vector<std::vector<at::Tensor>> out(1);
  for (int r = 0; r < size_; ++r) out[0].push_back(at::empty_like(mine));
  pg_->allgather(out, in)->wait();
  const at::Tensor all = at::stack(out[0]).cpu();  // [size, kFields], identical on every rank
  const int64_t* a = all.const_data_ptr<int64_t>();
  for (int f = 0; f < kFields; ++f) {
    bool same = true;
    for (int r = 1; r < size_; ++r) same = same && a[r * kFields + f] == a[f];
    if (same) continue;
    std::ostringstream msg;
    msg << op << ": ranks disagree on the " << names[f] << " (";
    for (int r = 0; r < size_; ++r) msg << (r ? ", " : "") << "rank " << r << ": " << field_value(f, a[r * kFields + f]);
    msg << "); every rank must call the same collective on a tensor of the same numel, dtype and device";
    TORCH_CHECK(false, msg.str());
  }
}

size_t Ring::record(RingStep step, int64_t sent_bytes) {
  step.send_done = !step.send;
  step.recv_done = !step.recv;
  bytes_sent_ += sent_bytes;
  steps_.push_back(std::move(step));
  return steps_.size() - 1;
}

size_t Ring::post(const at::Tensor& send, const at::Tensor& recv, int64_t seq) {
  RingStep step;
  const int tag = tag_of(seq);
  const bool do_send = send.numel() > 0, do_recv = recv.numel() > 0;
  if (coalesce_ && (do_send || do_recv)) {
    pg_->startCoalescing(c10::DeviceType::CUDA);
    if (do_send) {
      std::vector<at::Tensor> v{send};
      pg_->send(v, next_, tag);
    }
    if (do_recv) {
      std::vector<at::Tensor> v{recv};
      pg_->recv(v, prev_, tag);
    }
    step.recv = pg_->endCoalescing(c10::DeviceType::CUDA);
  } else {
    if (do_send) {
      std::vector<at::Tensor> v{send};
      step.send = pg_->send(v, next_, tag);
    }
    if (do_recv) {
      std::vector<at::Tensor> v{recv};
      step.recv = pg_->recv(v, prev_, tag);
    }
  }
  step.keep = {send, recv};
  return record(std::move(step), send.numel() * send.element_size());
}

size_t Ring::post_send(const at::Tensor& send, int peer, int64_t seq) {
  TORCH_CHECK(!coalesce_, "Ring::post_send: CPU (Gloo) only");
  RingStep step;
  std::vector<at::Tensor> v{send};
  step.send = pg_->send(v, peer, tag_of(seq));
  step.keep = {send};
  return record(std::move(step), send.numel() * send.element_size());
}

size_t Ring::post_recv(const at::Tensor& recv, int peer, int64_t seq) {
  TORCH_CHECK(!coalesce_, "Ring::post_recv: CPU (Gloo) only");
  RingStep step;
  std::vector<at::Tensor> v{recv};
  step.recv = pg_->recv(v, peer, tag_of(seq));
  step.keep = {recv};
  return record(std::move(step), 0);
}

void Ring::wait_recv(size_t id) {
  RingStep& s = steps_.at(id);
  if (!s.recv_done) {
    s.recv->wait();
    s.recv_done = true;
  }
}

void Ring::wait(size_t id) {
  wait_recv(id);
  RingStep& s = steps_.at(id);
  if (!s.send_done) {
    s.send->wait();
    s.send_done = true;
  }
}

void Ring::finish() {
  for (size_t i = 0; i < steps_.size(); ++i) wait(i);
  steps_.clear();
}

Partition::Partition(int64_t numel, int n, int64_t align, int64_t segment_elems)
    : numel_(numel) {
  per_chunk_ = ceil_div(ceil_div(numel, n), align) * align;
  const int64_t target = std::max(align, segment_elems / align * align);
  segments_ = std::max<int64_t>(1, ceil_div(per_chunk_, target));
  // A chunk up to one segment long stays whole: splitting 1 MiB chunks in two, so that a transfer
  // overlaps each reduction, measured 10-15% slower at 4 ranks on 2 cores (more messages, no idle core).
  per_segment_ = ceil_div(ceil_div(per_chunk_, segments_), align) * align;
}

int64_t Partition::begin(int c, int64_t j) const {
  return std::min(chunk_begin(c) + j * per_segment_, chunk_end(c));
}

int64_t Partition::end(int c, int64_t j) const {
  return std::min(chunk_begin(c) + (j + 1) * per_segment_, chunk_end(c));
}

}  // namespace pyparallel
