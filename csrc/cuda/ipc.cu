// The CUDA IPC all-reduce kernel; Note [CUDA IPC all-reduce] in csrc/comm/ipc.h says what it does and
// why its synchronisation is enough. The host side (buffers, handles, waiting, errors) is
// csrc/comm/ipc.cpp.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "comm/ipc.h"

namespace pyparallel {
namespace {

constexpr int kFields = CollectiveHeader::kFields;
constexpr uint32_t kPollsPerCheck = 1024;  // polls of a flag between checks of the abort word and the clock

template <typename T>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// System scope: the reader may be another process on this GPU or a process on another GPU.
__device__ __forceinline__ void store_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// Staging sets are read and written at L2 (.cg), never through an SM's L1, which is not coherent with
// the writes of other ranks' kernels.
template <typename T>
__device__ __forceinline__ Vec<T> load_staged(const char* p) {
  const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(p));
  return *reinterpret_cast<const Vec<T>*>(&raw);
}

template <typename T>
__device__ __forceinline__ void store_staged(char* p, const Vec<T>& v) {
  __stcg(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&v));
}

// Elements [e, e + V) of the tensor, zero beyond numel (a 16-byte load when the whole vector is inside).
template <typename T>
__device__ __forceinline__ Vec<T> load_input(const T* data, int64_t e, int64_t numel) {
  constexpr int V = Vec<T>::kSize;
  if (e + V <= numel) return *reinterpret_cast<const Vec<T>*>(data + e);
  Vec<T> out;
#pragma unroll
  for (int k = 0; k < V; ++k) out.v[k] = e + k < numel ? data[e + k] : T(0.0f);
  return out;
}

template <typename T>
__device__ __forceinline__ void store_output(T* data, int64_t e, int64_t numel, const Vec<T>& v) {
  constexpr int V = Vec<T>::kSize;
  if (e + V <= numel) {
    *reinterpret_cast<Vec<T>*>(data + e) = v;
    return;
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (e + k < numel) data[e + k] = v.v[k];
  }
}

// Sum over ranks in rank order, in fp32, of the vector at byte `offset` of every rank's staging set
// `set`; divided by the rank count when averaging; rounded once to T.
template <typename T>
__device__ __forceinline__ Vec<T> reduce_staged(const IpcKernelArgs& a, int64_t set, int64_t offset) {
  constexpr int V = Vec<T>::kSize;
  Vec<T> x[kIpcMaxRanks];
#pragma unroll
  for (int p = 0; p < kIpcMaxRanks; ++p) {  // every load in flight before the first add
    if (p < a.size) x[p] = load_staged<T>(a.staging[p] + set * a.capacity + offset);
  }
  float acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = static_cast<float>(x[0].v[k]);
#pragma unroll
  for (int p = 1; p < kIpcMaxRanks; ++p) {
    if (p < a.size) {
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] += static_cast<float>(x[p].v[k]);
    }
  }
  Vec<T> out;
  const float n = static_cast<float>(a.size);
#pragma unroll
  for (int k = 0; k < V; ++k) out.v[k] = static_cast<T>(a.average ? acc[k] / n : acc[k]);
  return out;
}

__device__ __forceinline__ int64_t header_of(const IpcKernelArgs& a, int p, int f) {
  return __ldcg(reinterpret_cast<const long long*>(&a.signals[p]->header[a.header_parity][blockIdx.x][f]));
}

__device__ void record_failure(IpcHostStatus* host, int32_t status, int waited_rank) {
  volatile IpcHostStatus* h = host;
  if (h->status == kIpcOk) {
    h->waited_rank = waited_rank;
    h->block = blockIdx.x;
    __threadfence_system();
    h->status = status;
  }
  __threadfence_system();
}

// Polls *flag (in this rank's signal area) until it reaches `target`; one thread calls it. Gives up,
// after recording why for the host, when the host sets its abort word, when `peer` (the rank that
// writes the flag) marked its communicator failed, or at the deadline; returns false then.
__device__ bool wait_for(const uint64_t* flag, uint64_t target, int peer, const IpcSignals* own, IpcHostStatus* host,
                         uint64_t deadline_ns) {
  uint32_t polls = 0;
  while (load_acquire_sys(flag) < target) {
    if (++polls % kPollsPerCheck != 0) continue;
    int32_t why = kIpcOk;
    if (*reinterpret_cast<volatile int32_t*>(&host->abort) != 0) {
      why = kIpcAborted;
    } else if (__ldcg(reinterpret_cast<const unsigned long long*>(&own->poisoned[peer])) != 0) {
      why = kIpcPeerFailed;
    } else if (global_timer_ns() > deadline_ns) {
      why = kIpcTimedOut;
    }
    if (why != kIpcOk) {
      record_failure(host, why, peer);
      return false;
    }
  }
  return true;
}

// Block-level barrier with the blocks of the same index on every rank (Note [CUDA IPC all-reduce]).
// Returns false, in every thread of the block, if a wait was given up (host abort or timeout).
__device__ bool barrier(const IpcKernelArgs& a, uint64_t target, uint64_t deadline_ns) {
  __shared__ int gave_up;
  if (threadIdx.x == 0) gave_up = 0;
  __syncthreads();  // the block's writes (staging, header) happen before the flag below
  const int p = threadIdx.x;
  if (p < a.size) {
    __threadfence_system();
    store_release_sys(&a.signals[p]->arrived[blockIdx.x][a.rank], target);
    if (!wait_for(&a.signals[a.rank]->arrived[blockIdx.x][p], target, p, a.signals[a.rank], a.host, deadline_ns)) {
      gave_up = 1;
    }
  }
  __syncthreads();
  return gave_up == 0;
}

// After the first barrier, in every block: false if a peer marked its communicator failed (then the
// first barrier may have passed on that peer's arrival before it failed), or if any rank's header
// differs from this rank's (then every rank finds a difference, since all compare the same n headers;
// block 0 hands every header to the host).
__device__ bool first_barrier_checks(const IpcKernelArgs& a) {
  __shared__ int stop;
  if (threadIdx.x == 0) {
    int failed_peer = -1, differ = 0;
    for (int p = 0; p < a.size; ++p) {
      if (__ldcg(reinterpret_cast<const unsigned long long*>(&a.signals[a.rank]->poisoned[p])) != 0) failed_peer = p;
      for (int f = 0; f < kFields; ++f) differ |= header_of(a, p, f) != a.header[f];
    }
    if (failed_peer >= 0) {
      record_failure(a.host, kIpcPeerFailed, failed_peer);
    } else if (differ && blockIdx.x == 0) {
      for (int p = 0; p < a.size; ++p) {
        for (int f = 0; f < kFields; ++f) a.host->headers[p][f] = header_of(a, p, f);
      }
      record_failure(a.host, kIpcHeaderMismatch, -1);
    }
    stop = failed_peer >= 0 || differ;
  }
  __syncthreads();
  return stop == 0;
}

template <typename T>
__global__ void __launch_bounds__(kIpcThreads, 1) ipc_all_reduce_kernel(const IpcKernelArgs a) {
  constexpr int V = Vec<T>::kSize;
  const uint64_t deadline = global_timer_ns() + a.timeout_ns;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  T* data = static_cast<T*>(a.data);
  char* mine = a.staging[a.rank];
  if (threadIdx.x < kFields) {
    a.signals[a.rank]->header[a.header_parity][blockIdx.x][threadIdx.x] = a.header[threadIdx.x];
  }

  if (a.one_shot) {
    const int64_t set = a.chunk_base % 2, nvec = (a.numel + V - 1) / V;
    for (int64_t j = tid; j < nvec; j += stride) {
      store_staged(mine + set * a.capacity + j * 16, load_input(data, j * V, a.numel));
    }
    if (!barrier(a, a.barrier_base + 1, deadline) || !first_barrier_checks(a)) return;
    for (int64_t j = tid; j < nvec; j += stride) {
      store_output(data, j * V, a.numel, reduce_staged<T>(a, set, j * 16));
    }
    return;
  }

  const int64_t R = a.region, rvec = R / V, region_bytes = R * static_cast<int64_t>(sizeof(T));
  for (int64_t c = 0; c < a.chunks; ++c) {
    const int64_t set = (a.chunk_base + c) % 2, base = c * a.size * R;
    char* staged = mine + set * a.capacity;
    for (int q = 0; q < a.size; ++q) {  // copy-in: element j of region q by thread j / V mod stride
      for (int64_t j = tid; j < rvec; j += stride) {
        store_staged(staged + q * region_bytes + j * 16, load_input(data, base + q * R + j * V, a.numel));
      }
    }
    if (!barrier(a, a.barrier_base + 2 * c + 1, deadline)) return;
    if (c == 0 && !first_barrier_checks(a)) return;
    const int64_t own = a.rank * region_bytes;  // reduce-scatter: my region, over every rank's set
    for (int64_t j = tid; j < rvec; j += stride) {
      store_staged(staged + own + j * 16, reduce_staged<T>(a, set, own + j * 16));
    }
    if (!barrier(a, a.barrier_base + 2 * c + 2, deadline)) return;
    for (int q = 0; q < a.size; ++q) {  // all-gather: region q from rank q's set
      const char* from = a.staging[q] + set * a.capacity + q * region_bytes;
      for (int64_t j = tid; j < rvec; j += stride) {
        const int64_t e = base + q * R + j * V;
        if (e < a.numel) store_output(data, e, a.numel, load_staged<T>(from + j * 16));
      }
    }
  }
}

// Bytes [16 u, 16 u + 16) of a message of `bytes` bytes at p (any alignment), zero beyond its end.
__device__ __forceinline__ uint4 load_unit(const char* p, int64_t u, int64_t bytes) {
  const int64_t b = 16 * u;
  if (b + 16 <= bytes && reinterpret_cast<uintptr_t>(p) % 16 == 0) return *reinterpret_cast<const uint4*>(p + b);
  uint4 out = make_uint4(0, 0, 0, 0);
  auto* o = reinterpret_cast<char*>(&out);
  for (int k = 0; k < 16 && b + k < bytes; ++k) o[k] = p[b + k];
  return out;
}

__device__ __forceinline__ void store_unit(char* p, int64_t u, int64_t bytes, const uint4& v) {
  const int64_t b = 16 * u;
  if (b + 16 <= bytes && reinterpret_cast<uintptr_t>(p) % 16 == 0) {
    *reinterpret_cast<uint4*>(p + b) = v;
    return;
  }
  const auto* in = reinterpret_cast<const char*>(&v);
  for (int k = 0; k < 16 && b + k < bytes; ++k) p[b + k] = in[k];
}

// One point-to-point exchange (Note [CUDA IPC transport] in csrc/comm/ipc.h).
__global__ void __launch_bounds__(kIpcThreads, 1) ipc_exchange_kernel(const IpcExchangeArgs a) {
  __shared__ int gave_up;
  const uint64_t deadline = global_timer_ns() + a.timeout_ns;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int b = blockIdx.x;
  IpcSignals* own = a.signals[a.rank];
  const int64_t ns = (a.send_bytes + a.capacity - 1) / a.capacity, nr = (a.recv_bytes + a.capacity - 1) / a.capacity;
  if (threadIdx.x == 0) gave_up = 0;
  __syncthreads();
  for (int64_t i = 0; i < ns || i < nr; ++i) {
    if (i < ns) {
      // Everything this rank put in its outbox before must have been consumed, by every receiver.
      const int q = threadIdx.x;
      if (q < a.size && q != a.rank) {
        const uint64_t target = a.sent_before[q] + (q == a.to ? i : 0);
        if (target > 0 && !wait_for(&own->done[b][q], target, q, own, a.host, deadline)) gave_up = 1;
      }
      __syncthreads();
      if (gave_up) return;
      const int64_t begin = i * a.capacity, len = a.send_bytes - begin < a.capacity ? a.send_bytes - begin : a.capacity;
      char* box = a.outbox[a.rank];
      for (int64_t u = tid; u < (len + 15) / 16; u += stride) {
        __stcg(reinterpret_cast<uint4*>(box + 16 * u), load_unit(a.send + begin, u, len));
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        __threadfence_system();
        store_release_sys(&a.signals[a.to]->ready[b][a.rank], a.sent_before[a.to] + i + 1);
      }
    }
    if (i < nr) {
      if (threadIdx.x == 0 &&
          !wait_for(&own->ready[b][a.from], a.received_before + i + 1, a.from, own, a.host, deadline)) {
        gave_up = 1;
      }
      __syncthreads();
      if (gave_up) return;
      const int64_t begin = i * a.capacity, len = a.recv_bytes - begin < a.capacity ? a.recv_bytes - begin : a.capacity;
      const char* box = a.outbox[a.from];
      for (int64_t u = tid; u < (len + 15) / 16; u += stride) {
        store_unit(a.recv + begin, u, len, __ldcg(reinterpret_cast<const uint4*>(box + 16 * u)));
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        __threadfence_system();
        store_release_sys(&a.signals[a.from]->done[b][a.rank], a.received_before + i + 1);
      }
    }
  }
}

}  // namespace

void launch_ipc_exchange(const IpcExchangeArgs& args, int blocks, void* stream) {
  TORCH_INTERNAL_ASSERT(blocks >= 1 && blocks <= kIpcMaxBlocks && args.to != args.rank && args.from != args.rank);
  ipc_exchange_kernel<<<blocks, kIpcThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_ipc_all_reduce(const IpcKernelArgs& args, at::ScalarType dtype, int blocks, void* stream) {
  TORCH_INTERNAL_ASSERT(blocks >= 1 && blocks <= kIpcMaxBlocks && args.size >= 1 && args.size <= kIpcMaxRanks);
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case at::kFloat:
      ipc_all_reduce_kernel<float><<<blocks, kIpcThreads, 0, s>>>(args);
      break;
    case at::kHalf:
      ipc_all_reduce_kernel<c10::Half><<<blocks, kIpcThreads, 0, s>>>(args);
      break;
    case at::kBFloat16:
      ipc_all_reduce_kernel<c10::BFloat16><<<blocks, kIpcThreads, 0, s>>>(args);
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "launch_ipc_all_reduce: unexpected dtype ", dtype);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace pyparallel
