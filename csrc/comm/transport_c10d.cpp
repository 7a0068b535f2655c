// The c10d point-to-point transport (transport.h): the process group's own send/recv, found by name with
// c10d::resolve_process_group exactly as torch's functional collectives do. No sockets of our own. The
// factory transport_for() also hands out the CUDA IPC transport (ipc.h) for a CUDA IPC communicator's name.
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "comm/ipc.h"
#include "comm/transport.h"

namespace pyparallel {
namespace {

class C10dTransfer final : public Transfer {
 public:
  explicit C10dTransfer(c10::intrusive_ptr<c10d::Work> work) : work_(std::move(work)) {}
  void wait() override { work_->wait(); }

 private:
  c10::intrusive_ptr<c10d::Work> work_;
};

TransferPtr wrap(c10::intrusive_ptr<c10d::Work> work) { return std::make_shared<C10dTransfer>(std::move(work)); }

class C10dTransport final : public Transport {
 public:
  C10dTransport(c10::intrusive_ptr<c10d::ProcessGroup> pg, c10::intrusive_ptr<c10d::ProcessGroup> twin, bool cuda)
      : pg_(std::move(pg)), twin_(std::move(twin)), cuda_(cuda) {}

  int rank() const override { return pg_->getRank(); }
  int size() const override { return pg_->getSize(); }
  bool independent_transfers() const override { return !cuda_; }

  std::pair<TransferPtr, TransferPtr> exchange(const at::Tensor& send, int to, const at::Tensor& recv, int from,
                                               int tag) override {
    const bool do_send = send.numel() > 0, do_recv = recv.numel() > 0;
    if (!cuda_) return {do_send ? this->send(send, to, tag) : nullptr, do_recv ? this->recv(recv, from, tag) : nullptr};
    if (!do_send && !do_recv) return {nullptr, nullptr};
    pg_->startCoalescing(c10::DeviceType::CUDA);
    if (do_send) {
      std::vector<at::Tensor> v{send};
      pg_->send(v, to, tag);
    }
    if (do_recv) {
      std::vector<at::Tensor> v{recv};
      pg_->recv(v, from, tag);
    }
    return {nullptr, wrap(pg_->endCoalescing(c10::DeviceType::CUDA))};
  }

  TransferPtr send(const at::Tensor& t, int peer, int tag) override {
    TORCH_CHECK(!cuda_, "C10dTransport::send: independent transfers are CPU (Gloo) only");
    std::vector<at::Tensor> v{t};
    return wrap(pg_->send(v, peer, tag));
  }

  c10::weak_intrusive_ptr<c10::intrusive_ptr_target> incarnation() const override {
    c10::intrusive_ptr<c10::intrusive_ptr_target> target = pg_;
    return c10::weak_intrusive_ptr<c10::intrusive_ptr_target>(target);
  }

  bool has_all_gather() const override { return static_cast<bool>(twin_); }

  TransferPtr all_gather(const at::Tensor& in, const at::Tensor& out) override {
    TORCH_CHECK(twin_, "C10dTransport::all_gather: the group has no twin");
    at::Tensor i = in, o = out;
    return wrap(twin_->_allgather_base(o, i));
  }

  TransferPtr recv(const at::Tensor& t, int peer, int tag) override {
    TORCH_CHECK(!cuda_, "C10dTransport::recv: independent transfers are CPU (Gloo) only");
    std::vector<at::Tensor> v{t};
    return wrap(pg_->recv(v, peer, tag));
  }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  c10::intrusive_ptr<c10d::ProcessGroup> twin_;  // Note [Carried header]; null where there is none
  bool cuda_;
};

}  // namespace

std::shared_ptr<Transport> transport_for(const std::string& group, const at::Tensor& like) {
#ifdef PYPARALLEL_WITH_CUDA
  if (like.is_cuda()) {  // a CUDA IPC communicator's name (pyparallel/transport.py picks it: ipc.h)
    if (auto ipc = ipc_transport_for(group)) return ipc;
  }
#endif
  c10::intrusive_ptr<c10d::ProcessGroup> twin;
  if (!like.is_cuda()) {
    try {
      twin = c10d::resolve_process_group(group + kTwinSuffix);
    } catch (const c10::Error&) {  // none registered (the inter-host groups, ops called directly)
    }
  }
  return std::make_shared<C10dTransport>(c10d::resolve_process_group(group), std::move(twin), like.is_cuda());
}

}  // namespace pyparallel
