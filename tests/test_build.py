"""The build registered what it should: every op, on the CPU always and on CUDA when expected."""

import os

import pytest
import torch

OPS = ["quantize_int8", "quantize_int8_into_", "dequantize_int8", "dequantize_int8_into_", "dequantize_add_",
       "topk_compress", "scatter_add_", "bucket_flatten", "bucket_unflatten"]
COLLECTIVES = ["ring_all_reduce_", "ring_all_reduce_int8_", "topk_all_reduce_"]


def _expect_cuda():
    # `make test` builds with a CUDA torch, so every .cu file must have been compiled and registered even
    # without a GPU. PYPARALLEL_EXPECT_CUDA=0 is for deliberate CPU-only builds (PYPARALLEL_CUDA=0 or a CPU torch).
    explicit = os.environ.get("PYPARALLEL_EXPECT_CUDA")
    if explicit is not None:
        return explicit == "1"
    return torch.version.cuda is not None and os.environ.get("PYPARALLEL_CUDA") != "0"


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyparallel::{op}", "CPU")


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered_when_expected(op):
    if not _expect_cuda():
        pytest.skip("CPU-only build (CPU torch, PYPARALLEL_CUDA=0 or PYPARALLEL_EXPECT_CUDA=0)")
    has = torch._C._dispatch_has_kernel_for_dispatch_key(f"pyparallel::{op}", "CUDA")
    assert has, (f"pyparallel::{op} has no CUDA kernel although torch {torch.__version__} is a CUDA build: "
                 "the .cu files were not compiled (see build/build.log; PYPARALLEL_EXPECT_CUDA=0 if deliberate)")


def test_bucket_assignment_is_device_independent():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pyparallel::bucket_assignment", "CompositeImplicitAutograd")


@pytest.mark.parametrize("op", COLLECTIVES)
def test_collectives_serve_every_device(op):
    # One device-generic implementation: the arithmetic dispatches to the CPU or CUDA kernels of our ops.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyparallel::{op}", "CompositeExplicitAutograd")
