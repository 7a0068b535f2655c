"""Build pyparallel._C with torch.utils.cpp_extension.

The CUDA sources are compiled whenever torch is a CUDA build and a CUDA toolkit whose major version
matches torch's is found, also on a machine without a GPU. ``PYPARALLEL_CUDA=0|1`` forces the choice.
``TORCH_CUDA_ARCH_LIST`` is honoured; without it we compile for Ampere (sm_80) and Hopper (sm_90, plus
PTX so newer GPUs can JIT it).

Install with ``pip install --no-build-isolation -e .`` so that the build uses the torch that is already
installed instead of pulling another one into an isolated environment.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


def _log(msg):
    print(f"[pyparallel setup] {msg}", file=sys.stderr)


def _nvcc_home(nvcc):
    """Ask nvcc where it really lives.

    The ``nvcc`` on PATH may be a wrapper script (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``), so
    resolving symlinks is not enough, and torch's own guess (the parent of PATH's nvcc) is then wrong.
    ``nvcc --dryrun`` prints the real binary's folder as ``_HERE_``.
    """
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
    if not match:
        return None
    return os.path.dirname(os.path.realpath(match.group(1).strip()))


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path:
            if not _is_toolkit(path):
                raise RuntimeError(f"{var}={path} is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h)")
            return path
    nvcc = shutil.which("nvcc")
    candidates = [_nvcc_home(nvcc)] if nvcc else []
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if _is_toolkit(path):
            return path
    return None


def nvcc_version(cuda_home):
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    match = re.search(r"release (\d+)\.(\d+)", out.stdout)
    if not match:
        raise RuntimeError(f"cannot read the CUDA version from nvcc --version:\n{out.stdout}{out.stderr}")
    return int(match.group(1)), int(match.group(2))


def wheel_header_shim(cuda_home):
    """A folder of links to the CUDA library headers that torch's nvidia-* wheels carry and the toolkit lacks.

    ATen's CUDA headers include cuBLAS/cuSPARSE/cuSOLVER headers. A minimal toolkit (nvcc + runtime
    only) does not have them, but torch's ``nvidia/cu13`` (or ``nvidia/*``) wheels do. We link only the
    missing headers so that the toolkit's own runtime headers, which match nvcc, always win.
    """
    import site

    roots = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    roots.append(os.path.dirname(os.path.dirname(torch.__file__)))
    wheel_includes = []
    for root in dict.fromkeys(roots):
        wheel_includes += sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
    toolkit_include = os.path.join(cuda_home, "include")
    shim = os.path.join(ROOT, "build", "cuda_wheel_headers")
    shutil.rmtree(shim, ignore_errors=True)
    os.makedirs(shim)
    linked = 0
    for inc in wheel_includes:
        for name in os.listdir(inc):
            if os.path.exists(os.path.join(toolkit_include, name)) or os.path.lexists(os.path.join(shim, name)):
                continue
            os.symlink(os.path.join(inc, name), os.path.join(shim, name))
            linked += 1
    _log(f"linked {linked} CUDA library headers from torch's nvidia wheels into {shim}")
    return shim


def want_cuda():
    """Decide whether to compile the .cu files. Returns (use_cuda, cuda_home)."""
    forced = os.environ.get("PYPARALLEL_CUDA")
    if forced not in (None, "", "0", "1"):
        raise RuntimeError(f"PYPARALLEL_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False, None
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME)")
    if reasons:
        if forced == "1":
            raise RuntimeError("PYPARALLEL_CUDA=1 but " + "; ".join(reasons))
        _log("building without CUDA: " + "; ".join(reasons))
        return False, None
    major, minor = nvcc_version(cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if major != torch_major:
        raise RuntimeError(
            f"nvcc in {cuda_home} is CUDA {major}.{minor} but torch {torch.__version__} was built with CUDA "
            f"{torch.version.cuda}; the major versions must match. Point CUDA_HOME at a CUDA {torch_major}.x "
            "toolkit or build without CUDA (PYPARALLEL_CUDA=0).")
    return True, cuda_home


def extensions():
    use_cuda, cuda_home = want_cuda()
    if use_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/comm/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-Wall", "-Wno-unused-parameter"]
    # ffp-contract=off: a*b+c must round twice, as the pure-PyTorch references do, so results are bitwise equal.
    kwargs = dict(extra_link_args=["-fopenmp"], include_dirs=[os.path.join(ROOT, "csrc")])
    if use_cuda:
        cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "--fmad=false", "-lineinfo", "--expt-relaxed-constexpr"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc += DEFAULT_ARCH_FLAGS
        kwargs["include_dirs"].append(wheel_header_shim(cuda_home))
        _log(f"CUDA toolkit {cuda_home}; compiling {len(cu_sources)} .cu files: {' '.join(cu_sources)}")
        ext = CUDAExtension(
            "pyparallel._C", sources + cu_sources,
            extra_compile_args={"cxx": cxx + ["-DPYPARALLEL_WITH_CUDA"], "nvcc": nvcc + ["-DPYPARALLEL_WITH_CUDA"]},
            **kwargs)
    else:
        ext = CppExtension("pyparallel._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": build_ext_class().with_options(use_ninja=True)}


def parallel_compile(compiler, jobs):
    """Makes ``compiler.compile`` compile its sources in up to ``jobs`` processes at once.

    Without ninja, torch's BuildExtension falls back to distutils, which compiles one file after the
    other: 20 files, about 5 minutes even on a fast machine, more than the GPU check's build budget (the
    GPU machine may have torch alone, and torch does not install ninja). Each file is compiled in a
    forked child: torch's per-file wrapper (``_compile``) swaps the compiler's executable between nvcc and
    c++ around each call, so threads sharing the compiler object would race; forked children each have
    their own copy.
    """
    try:
        from setuptools.errors import CompileError
    except ImportError:  # older setuptools
        from distutils.errors import CompileError

    def compile(sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                extra_postargs=None, depends=None):
        macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)
        cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
        pending = [obj for obj in objects if obj in build]
        running, failed = {}, []
        while pending or running:
            while pending and len(running) < jobs:
                obj = pending.pop(0)
                src, ext = build[obj]
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:  # the child: compile one file, report by exit status, never return
                    code = 1
                    try:
                        compiler._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)
                        code = 0
                    except BaseException as exc:  # noqa: BLE001 (reported through the exit status)
                        print(f"[pyparallel setup] compiling {src} failed: {exc}", file=sys.stderr)
                    finally:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(code)
                running[pid] = src
            pid, status = os.wait()
            src = running.pop(pid, None)
            if src is not None and not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                failed.append(src)
        if failed:
            raise CompileError("compiling failed: " + ", ".join(failed))
        return objects

    compiler.compile = compile


def build_ext_class():
    """torch's BuildExtension, compiling in parallel also when ninja is missing (parallel_compile)."""
    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension):
        def build_extensions(self):
            if not self.use_ninja and self.compiler.compiler_type != "msvc" and hasattr(os, "fork"):
                jobs = max(1, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))
                _log(f"ninja not found: compiling in {jobs} processes without it (MAX_JOBS)")
                parallel_compile(self.compiler, jobs)
            super().build_extensions()

    return BuildExt


if __name__ == "__main__":  # also under pip (setuptools.build_meta runs this file as __main__)
    ext_modules, cmdclass = extensions()

    # Name, version and packages are in pyproject.toml.
    setup(
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
