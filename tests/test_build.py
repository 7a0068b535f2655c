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


_TINY_SETUP = """
import runpy, sys
from setuptools import setup
ns = runpy.run_path({setup_py!r}, run_name="pyparallel_setup")  # setup.py's helpers, without its setup()
from torch.utils.cpp_extension import CppExtension, CUDAExtension
sources = {sources!r}
make = CUDAExtension if any(s.endswith(".cu") for s in sources) else CppExtension
setup(name="tiny", ext_modules=[make("tiny", sources)],
      cmdclass={{"build_ext": ns["build_ext_class"]().with_options(use_ninja=True)}})
"""

_TINY_SOURCES = {
    "a.cpp": "#include <Python.h>\n"
             "#ifdef __CUDACC__\n#error a .cpp file went to nvcc\n#endif\n"
             "int b(); int c();\n"
             "static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, \"tiny\", nullptr, -1, nullptr};\n"
             "extern \"C\" PyMODINIT_FUNC PyInit_tiny(void) { return b() + c() == 5 ? PyModule_Create(&def) : nullptr; }\n",
    "b.cpp": "#ifdef __CUDACC__\n#error a .cpp file went to nvcc\n#endif\nint b() { return 2; }\n",
    "c.cpp": "int c() { return 3; }\n",
    "k.cu": "__global__ void k(float* x) { x[threadIdx.x] = 0; }\nvoid launch(float* x) { k<<<1, 32>>>(x); }\n",
}


def test_build_without_ninja_compiles_in_parallel(tmp_path):
    # The GPU machine may have torch without ninja: torch then compiles one file after the other (about 5
    # minutes for ours, over the GPU check's build budget). setup.py compiles in MAX_JOBS forked processes
    # instead, each file with its own compiler (nvcc for .cu, c++ for .cpp). Here: a fake ninja that fails.
    import runpy
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cuda_home = None
    if torch.version.cuda is not None:
        cuda_home = runpy.run_path(os.path.join(root, "setup.py"), run_name="pyparallel_setup")["find_cuda_home"]()
    names = [n for n in _TINY_SOURCES if cuda_home is not None or not n.endswith(".cu")]  # .cu: when nvcc is here
    for name in names:
        (tmp_path / name).write_text(_TINY_SOURCES[name])
    (tmp_path / "setup.py").write_text(_TINY_SETUP.format(setup_py=os.path.join(root, "setup.py"), sources=names))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ninja").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "ninja").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", MAX_JOBS="2",
               TORCH_CUDA_ARCH_LIST="8.0")
    if cuda_home is not None:
        env["CUDA_HOME"] = cuda_home
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "ninja not found: compiling in 2 processes" in log, log[-4000:]
    check = subprocess.run([sys.executable, "-c", "import tiny"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]
