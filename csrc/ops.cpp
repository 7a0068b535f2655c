// Every pyparallel op schema, in one place. Device kernels are registered next to their code:
// TORCH_LIBRARY_IMPL(pyparallel, CPU, m) in csrc/cpu/*.cpp and (pyparallel, CUDA, m) in csrc/cuda/*.cu,
// so the dispatcher picks the implementation by the tensors' device.
//
// The module object pyparallel._C exists only so that `import pyparallel._C` loads this library and runs
// the registrations below; everything is reached through torch.ops.pyparallel.*.
#include <Python.h>
#include <torch/library.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "pyparallel's compiled ops", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(pyparallel, m) {
  // Blockwise symmetric int8 (absmax per block of `block_size` consecutive elements of the flattened x).
  m.def("quantize_int8(Tensor x, int block_size, bool stochastic=False, Generator? generator=None)"
        " -> (Tensor q, Tensor scales)");
  m.def("dequantize_int8(Tensor q, Tensor scales, int block_size, ScalarType? dtype=None) -> Tensor");
  m.def("dequantize_add_(Tensor(a!) acc, Tensor q, Tensor scales, int block_size) -> ()");
  // Preallocated-output forms for the int8 ring: q, scales = quantize((x + dequantize(add_q, add_scales))
  // / divisor), and out = dequantize(q, scales) written into out.
  m.def("quantize_int8_into_(Tensor(a!) q, Tensor(b!) scales, Tensor x, int block_size, Tensor? add_q=None,"
        " Tensor? add_scales=None, float divisor=1.0) -> ()");
  m.def("dequantize_int8_into_(Tensor(a!) out, Tensor q, Tensor scales, int block_size) -> ()");

  // Exact top-k by magnitude with optional error feedback (residual is updated in place).
  m.def("topk_compress(Tensor x, int k, Tensor(a!)? residual=None, ScalarType? index_dtype=None)"
        " -> (Tensor values, Tensor indices)");
  m.def("scatter_add_(Tensor(a!) out, Tensor indices, Tensor values) -> ()");

  // Bucketing: metadata-only assignment, then flat copies in and out.
  m.def("bucket_assignment(int[] numels, int[] element_sizes, int[] group_keys, int[] size_limits) -> int[]");
  m.def("bucket_flatten(Tensor[] tensors, Tensor(a!) out) -> ()");
  m.def("bucket_unflatten(Tensor flat, Tensor(a!)[] tensors) -> ()");

  // Collectives over the torch.distributed process group named group_name (csrc/comm). In place; each
  // returns the payload bytes this rank sent. Every rank's header (collective, dtype, numel, options) is
  // checked against every other's first, through the group's point-to-point transport.
  m.def("ring_all_reduce_(Tensor(a!) tensor, str group_name, bool average=False, int segment_bytes=1048576)"
        " -> int");
  m.def("ring_all_reduce_int8_(Tensor(a!) tensor, str group_name, bool average=False, int block_size=256,"
        " int segment_bytes=1048576) -> int");
  m.def("topk_all_reduce_(Tensor(a!) tensor, str group_name, int k, Tensor(b!)? residual=None,"
        " bool average=False) -> int");

  // Shared memory between the ranks of one host (csrc/comm/shm.h). shm_attach maps the segment `segment`
  // (creating it exclusively when create=True) as local rank `local_rank` of `local_size`, under the
  // name `comm`; the collectives name it. Returns nothing: a failure raises.
  m.def("shm_attach(str comm, str segment, int local_rank, int local_size, int[] group_ranks, int slot_bytes,"
        " bool create, float timeout_s) -> ()");
  m.def("shm_unlink(str segment) -> ()");
  m.def("shm_detach(str comm) -> ()");
  // Maps buffer segment `segment` (local_size parts of `stride` bytes; created when create=True) for
  // `comm` under `id` (the same on every local rank for this segment) and returns this rank's part, a
  // uint8 tensor (Note [Registered buffers], csrc/comm/shm.h).
  m.def("shm_map_buffer(str comm, str segment, int stride, bool create, int id) -> Tensor");
  // All-reduces through `comm` so far by path: [small, staged, registered, mixed] (tests, benchmarks).
  m.def("shm_paths(str comm) -> int[]");
  m.def("shm_all_reduce_(Tensor(a!) tensor, str comm, bool average=False) -> int");
  // Reduce inside the host through `comm`, across hosts over the group `cross_group_name` with the given
  // compression (0 none, 1 int8 with param = block size, 2 top-k with param = k of the whole tensor and
  // the residual), then gather inside the host. Divides by world_size when averaging. piece_bytes > 0
  // pipelines the two hops in pieces of that size (Note [Pipelined hierarchical all-reduce]).
  m.def("hierarchical_all_reduce_(Tensor(a!) tensor, str comm, str cross_group_name, int world_size,"
        " bool average=False, int compression=0, int param=0, Tensor(b!)? residual=None, int piece_bytes=0) -> int");
  m.def("release_group(str group_name) -> ()");

  // CUDA IPC between the processes of one node (csrc/comm/ipc.h; CUDA builds only). ipc_create allocates
  // this rank's buffer on `device` under the name `comm` and returns its handle for the peers; ipc_open
  // opens every rank's buffer (handles: every rank's, space-separated, in rank order) with the agreed
  // staging capacity and grid; ipc_all_reduce_ reduces in place, bitwise identically on every rank.
  m.def("ipc_create(str comm, int device, int rank, int size, int[] group_ranks, int capacity, float timeout_s)"
        " -> str");
  m.def("ipc_open(str comm, str handles, int[] pids, int capacity, int blocks) -> ()");
  m.def("ipc_detach(str comm) -> ()");
  m.def("ipc_all_reduce_(Tensor(a!) tensor, str comm, bool average=False) -> int");
}
