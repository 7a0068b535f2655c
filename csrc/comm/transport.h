// How bytes move between the ranks of one process group.
//
// Note [Transport seam]
// Collectives (the dense and int8 rings, the sparse all-gather, the hierarchical composition) are written
// against two small pieces, never against c10d directly:
//  - Transport: rank, size, and point-to-point transfers (send, receive, or both as one exchange) that
//    return a Transfer handle to wait on. transport_for(group, tensor) is the factory: the c10d
//    implementation (the group's own send/recv: Gloo for CPU tensors, NCCL for CUDA tensors), or, for
//    CUDA tensors and the name of a CUDA IPC communicator, the CUDA IPC one (ipc.h: processes of one node,
//    also several on one GPU, where NCCL refuses).
//  - Session (session.h): one collective's use of a transport: its message tags, the header check
//    (over the transport itself, never a collective on the caller's group, which the caller's own thread
//    may be using at the same moment), the transfers it posted, and keeping their buffers alive if it
//    fails.
// Transports that reduce without point-to-point messages (shared memory between the ranks of one host,
// shm.h) expose whole-collective entry points instead; the hierarchical all-reduce composes the two
// kinds. Adding a transport touches no algorithm.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>

namespace pyparallel {

// A posted send or receive. wait() returns once the transfer is complete (for a receive: its data may
// be read; on CUDA, stream-ordered), or raises if it failed (a dead peer, the group's timeout).
class Transfer {
 public:
  virtual ~Transfer() = default;
  virtual void wait() = 0;
};
using TransferPtr = std::shared_ptr<Transfer>;

class Transport {
 public:
  virtual ~Transport() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Posts a send of `send` to rank `to` and a receive into `recv` from rank `from`, either possibly
  // empty (numel 0: not posted, nullptr returned). Returns {send, receive}. A transport that must post
  // both as one operation (NCCL: two ranks sending to each other would otherwise deadlock) returns one
  // handle, as the receive, and nullptr as the send.
  virtual std::pair<TransferPtr, TransferPtr> exchange(const at::Tensor& send, int to, const at::Tensor& recv,
                                                       int from, int tag) = 0;
  // Independent transfers to and from any peer (the sparse all-gather, the header check on CPU).
  // False where they are not available (NCCL: only exchange()).
  virtual bool independent_transfers() const = 0;
  virtual TransferPtr send(const at::Tensor& t, int peer, int tag) = 0;
  virtual TransferPtr recv(const at::Tensor& t, int peer, int tag) = 0;
  // The object whose lifetime is the group's. torch reuses group names (destroy_process_group() and a
  // new init_process_group() give "0" again; torchft re-creates its groups on every quorum change), so
  // per-group state is tied to this, not to the name: a new incarnation starts afresh.
  virtual c10::weak_intrusive_ptr<c10::intrusive_ptr_target> incarnation() const = 0;
  // An all-gather of one equal-sized row per rank (in: [row], out: [size * row]) as ONE collective over a
  // channel only our collectives use (Note [Carried header]), where the transport has one.
  virtual bool has_all_gather() const { return false; }
  virtual TransferPtr all_gather(const at::Tensor& in, const at::Tensor& out) {
    TORCH_CHECK(false, "this transport has no all_gather");
  }
};

// Note [Carried header]
// Gloo's point-to-point send/recv costs a few thread hand-offs per message (measured on the 2-core VM
// under load: a 16-float ping-pong 4 ms, Gloo's own all-gather of 16 KiB 0.35 ms), so a header check by
// transfers dominated small all-reduces. pyparallel/transport.py therefore gives every CPU group a
// private twin: a Gloo group over the same store, registered as `<group>` + kTwinSuffix, used by our
// worker thread only (never a collective on the caller's group). Every collective's header check is then
// one all-gather of the 7 header fields. A dense all-reduce of at most kCarryBytes is carried with it and
// summed in rank order in fp32, as shared memory does. Every rank's first row is kFirstRowBytes: the
// header and as much of the tensor as fits, so a tiny all-reduce is one all-gather of 1 KiB rows in all,
// and ranks that disagree on anything (numel, dtype, compression) still exchange rows of one size and all
// raise the header check's error. (Rows sized by each rank's own tensor made Gloo abort the process when
// they differed.) What did not fit follows in a second all-gather, once the headers agree and so every
// rank knows its size.
constexpr const char* kTwinSuffix = "/pyparallel-twin";
constexpr int64_t kCarryBytes = 64 << 10;
constexpr int64_t kFirstRowBytes = 1 << 10;

// The transport for collectives of `like`'s device on the process group named `group`.
std::shared_ptr<Transport> transport_for(const std::string& group, const at::Tensor& like);

}  // namespace pyparallel
