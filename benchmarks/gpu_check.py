"""The GPU check (issue 12): one command on a machine with a CUDA GPU, from a bare copy of the repository.

    make gpu-check                     # or: python3 benchmarks/gpu_check.py

Steps, each in its own process group with its own time budget (a hung step is killed and reported, and
the rest still run), all within ``--deadline`` seconds (default 570, so that the whole check fits in 10
minutes):

 1. probe      the Python, torch, CUDA device, nvcc, compute-sanitizer and test modules there are; no CUDA
               device: says so and exits 2 at once.
 2. build      ``python3 setup.py build_ext --inplace`` against the torch already installed (nothing is
               installed; TORCH_CUDA_ARCH_LIST is the device's own, PYPARALLEL_CUDA=1), then checks that
               every CUDA op is registered.
 3. tests      ``pytest -m cuda`` (every test that runs CUDA code, tests/conftest.py marks them), with a
               JUnit report that gives the pass / fail / skip counts and the failures.
 4. memcheck   ``compute-sanitizer --tool memcheck`` on benchmarks/gpu_sanitize.py --kernels (each of our
               kernels once on moderate sizes, checked against the reference),
 5. racecheck  the same under ``--tool racecheck``,
 6. memcheck-ipc  memcheck on the CUDA IPC all-reduce, 2 processes (--ipc 2, every process followed).
 7. kernels    benchmarks/kernels.py --device cuda --numel 64M --json,
 8. ipc-bench  benchmarks/gpu_allreduce.py -n 2 --json (IPC all-reduce latency and bandwidth vs the
               device's copy bandwidth, Gloo on CUDA tensors as the baseline).
 9. ipc-bench-mps  the same under MPS, only with GPU_CHECK_MPS=1 and nvidia-cuda-mps-control present
               (without MPS, processes sharing one GPU are time-sliced and never run at the same time).

Output: ``gpu-check.json`` (everything), ``gpu-check.txt`` (the table) and ``gpu-check.log`` (every
step's output) in $OUT when set (the device tool copies it back), else in benchmarks/results/. Exit
status 0 only when every step passed; the targets of issue 12 are reported, not enforced.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

# A step still running at the end of its budget gets SIGINT, then this long before SIGTERM and SIGKILL.
INTERRUPT_GRACE_S = 15
# (name, budget seconds, seconds kept back for it while earlier steps run)
STEPS = [
    ("probe", 45, 10),
    ("build", 240, 60),
    ("tests", 200, 60),
    ("memcheck", 75, 30),
    ("racecheck", 75, 30),
    ("memcheck-ipc", 60, 20),
    ("kernels", 75, 30),
    ("ipc-bench", 75, 30),
    ("ipc-bench-mps", 60, 0),
]
TEST_MODULES = ["pytest", "numpy", "pytest_timeout", "hypothesis", "psutil", "setuptools"]
TARGETS = {
    "int8 quantize / dequantize-add, 64M fp32 and bf16": ">= 80% of copy bandwidth",
    "exact top-k 1% of 64M fp32": ">= 8x faster than torch.topk",
    "bucket flatten of 200 mixed-size tensors": ">= 80% of copy bandwidth",
    "IPC all-reduce, 2 processes on one GPU, 64 MiB": ">= 60% of copy bandwidth",
    "IPC all-reduce, 2 processes on one GPU, <= 32 KiB": "< 20 us",
}

PROBE = r"""
import json, os, platform, sys
out = {"python": sys.version.split()[0], "executable": sys.executable, "machine": platform.machine()}
try:
    import torch
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
               device_count=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if out["device_count"]:
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, capability="%d.%d" % (p.major, p.minor), sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1))
except Exception as e:  # reported, not hidden: the check stops on it
    out["torch_error"] = repr(e)
mods = {}
for m in sys.argv[1:]:
    try:
        mod = __import__(m)
        mods[m] = getattr(mod, "__version__", "present")
    except Exception as e:
        mods[m] = None
out["modules"] = mods
print("PROBE " + json.dumps(out))
"""


class Step:
    def __init__(self, name: str):
        self.name = name
        self.status = "not run"  # passed, failed, timeout, skipped, not run
        self.seconds = 0.0
        self.detail = ""
        self.data: dict = {}
        self.tail = ""


class Check:
    def __init__(self, deadline_s: float, out_dir: str):
        self.start = time.monotonic()
        self.deadline = self.start + deadline_s
        self.out_dir = out_dir
        self.work = tempfile.mkdtemp(prefix="gpu-check-")
        self.log_path = os.path.join(out_dir, "gpu-check.log")
        self.log = open(self.log_path, "w")
        self.steps: dict[str, Step] = {name: Step(name) for name, _, _ in STEPS}
        # PYTHONFAULTHANDLER: a crash in the extension (SIGSEGV, SIGABRT) prints every thread's Python stack.
        self.env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")

    def budget(self, name: str) -> float:
        """This step's budget: its own, cut so that the later steps keep their reserves."""
        names = [n for n, _, _ in STEPS]
        i = names.index(name)
        later = sum(reserve for _, _, reserve in STEPS[i + 1:])
        own = STEPS[i][1]
        return max(0.0, min(own, self.deadline - time.monotonic() - later))

    def run(self, step: Step, cmd: list[str], env: dict | None = None, budget: float | None = None) -> int | None:
        """Runs cmd in its own process group; returns its exit code, or None if it was killed at its budget."""
        budget = self.budget(step.name) if budget is None else budget
        self.log.write(f"\n===== {step.name}: {' '.join(cmd)} (budget {budget:.0f} s)\n")
        self.log.flush()
        if budget < 5:
            step.status, step.detail = "skipped", "no time left within the deadline"
            return None
        out_path = os.path.join(self.work, f"{step.name}.out")
        t0 = time.monotonic()
        with open(out_path, "w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=budget)
            except subprocess.TimeoutExpired:
                rc = None
                # SIGINT to the step's own process first: pytest then stops and still writes its JUnit
                # report (the pass / fail counts so far) and its failures, and a Python script prints
                # where it hung; whatever is left is terminated, then killed, below.
                _signal_pid(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=INTERRUPT_GRACE_S)
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
            # Whatever the step left behind (a spawned rank that outlived its parent, say) must not hold the
            # GPU during the next step.
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        step.seconds += time.monotonic() - t0
        with open(out_path, errors="replace") as f:
            text = f.read()
        self.log.write(text)
        self.log.flush()
        step.tail = text[-3000:]
        if rc is None:
            step.status, step.detail = "timeout", f"killed after its budget of {budget:.0f} s"
        return rc

def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # nothing left in it
        pass


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in filter(None, homes):
        for sub in ("bin", "compute-sanitizer"):
            path = os.path.join(home, sub, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    return None


# ---- steps ----

def probe(c: Check) -> dict | None:
    s = c.steps["probe"]
    rc = c.run(s, [PY, "-c", PROBE, *TEST_MODULES])
    line = next((ln for ln in s.tail.splitlines() if ln.startswith("PROBE ")), None)
    info = json.loads(line[len("PROBE "):]) if line else {}
    info["nvcc"] = find_tool("nvcc")
    info["ninja"] = shutil.which("ninja")  # torch's build runs the binary (the pip package puts one on PATH)
    info["compute_sanitizer"] = find_tool("compute-sanitizer")
    info["mps_control"] = find_tool("nvidia-cuda-mps-control")
    info["nproc"] = os.cpu_count()
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_mode",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"not available ({e})"
    s.data = info
    if rc != 0 or "torch" not in info:
        s.status, s.detail = "failed", f"the probe failed (exit {rc}); torch: {info.get('torch_error', 'missing')}"
        return None
    if not info.get("device_count"):
        s.status = "failed"
        s.detail = (f"no CUDA device: torch {info.get('torch')} (CUDA {info.get('torch_cuda')}) sees none "
                    f"(nvidia-smi: {info['nvidia_smi']})")
        return None
    missing = [m for m, v in info["modules"].items() if v is None]
    s.status = "passed"
    s.detail = (f"{info['device']} (sm_{info['capability'].replace('.', '')}, {info['sms']} SMs, "
                f"{info['memory_gib']} GiB), torch {info['torch']} CUDA {info['torch_cuda']}, Python {info['python']}"
                + (f"; missing modules: {', '.join(missing)}" if missing else "")
                + ("" if info["nvcc"] else "; no nvcc (PATH, $CUDA_HOME/bin, /usr/local/cuda): the build will fail")
                + ("" if info["ninja"] else "; no ninja: setup.py compiles in parallel without it"))
    return info


def build(c: Check, info: dict) -> bool:
    s = c.steps["build"]
    if info["modules"].get("setuptools") is None:
        s.status, s.detail = "failed", "setuptools is missing: cannot build (nothing can be installed here)"
        return False
    # setup.py finds the toolkit itself (CUDA_HOME, else where nvcc really lives) and refuses a CUDA major
    # version other than torch's.
    env = dict(c.env, PYPARALLEL_CUDA="1", MAX_JOBS=str(max(1, os.cpu_count() or 1)),
               TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", info["capability"]))
    rc = c.run(s, [PY, "setup.py", "build_ext", "--inplace"], env=env)
    if rc is None:
        return False
    if rc != 0:
        errors = [ln.strip() for ln in s.tail.splitlines() if re.search(r"error|Error|RuntimeError", ln)]
        s.status, s.detail = "failed", (f"setup.py build_ext failed (exit {rc}); see gpu-check.log"
                                        + (f"; last error: {errors[-1][:300]}" if errors else ""))
        return False
    ops = ["quantize_int8", "dequantize_add_", "topk_compress", "bucket_flatten", "ipc_all_reduce_"]
    verify = ("import torch, pyparallel\n"
              f"missing = [op for op in {ops!r} if not torch._C._dispatch_has_kernel_for_dispatch_key("
              "'pyparallel::' + op, 'CUDA')]\n"
              "print('CUDA kernels missing:', missing)\nraise SystemExit(1 if missing else 0)\n")
    out = subprocess.run([PY, "-c", verify], cwd=ROOT, env=c.env, capture_output=True, text=True, timeout=120)
    c.log.write(out.stdout + out.stderr)
    if out.returncode != 0:
        s.status, s.detail = "failed", "built, but " + (out.stdout.strip() or out.stderr.strip()[-500:])
        return False
    s.status = "passed"
    s.detail = f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}, {s.seconds:.0f} s"
    if info["ninja"] is None:
        s.detail += " (no ninja on PATH: torch compiled one file at a time)"
    return True


def tests(c: Check, info: dict) -> None:
    s = c.steps["tests"]
    if info["modules"].get("pytest") is None:
        s.status, s.detail = "skipped", "pytest is missing (the memcheck step still checks every kernel's results)"
        return
    junit = os.path.join(c.work, "junit.xml")
    cmd = [PY, "-m", "pytest", "tests", "-m", "cuda", "-q", "-rfE", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={junit}"]
    # Property-based test files need hypothesis; without it they are left out (and listed), not failed.
    ignored = []
    if info["modules"].get("hypothesis") is None:
        tests_dir = os.path.join(ROOT, "tests")
        for name in sorted(os.listdir(tests_dir)):
            if name.endswith(".py"):
                with open(os.path.join(tests_dir, name), errors="replace") as f:
                    if re.search(r"^\s*(import|from)\s+hypothesis\b", f.read(), re.M):
                        ignored.append(f"tests/{name}")
        cmd += [f"--ignore={path}" for path in ignored]
    if info["modules"].get("pytest_timeout") is not None:
        cmd += ["-o", "timeout=150"]  # a hung test fails alone (without the plugin the step's budget still holds)
    rc = c.run(s, cmd)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    if os.path.exists(junit):
        root = ET.parse(junit).getroot()
        for case in root.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                counts["failed" if case.find("failure") is not None else "errors"] += 1
                failures.append({"test": name, "message": (bad.get("message") or "")[:400]})
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    s.data = {"counts": counts, "failures": failures[:40], "ignored_files": ignored,
              "missing_modules": [m for m in ("hypothesis", "pytest_timeout", "psutil") if info["modules"].get(m) is None]}
    if rc is None:  # interrupted at its budget: the counts are those of the tests that ran
        s.detail += "; " + ", ".join(f"{v} {k}" for k, v in counts.items()) if os.path.exists(junit) else ""
        return
    s.status = "passed" if rc == 0 else "failed"
    s.detail = ", ".join(f"{v} {k}" for k, v in counts.items()) + (f" (pytest exit {rc})" if rc not in (0, 1) else "")
    if ignored:
        s.detail += f"; left out without hypothesis: {', '.join(ignored)}"


def sanitizer(c: Check, info: dict, name: str, tool: str, args: list[str]) -> None:
    s = c.steps[name]
    if not info["compute_sanitizer"]:
        s.status, s.detail = "skipped", "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda)"
        return
    cmd = [info["compute_sanitizer"], "--tool", tool, "--error-exitcode", "99", "--print-limit", "20",
           "--target-processes", "all", PY, "benchmarks/gpu_sanitize.py", *args]
    # Without PyTorch's caching allocator every tensor is its own cudaMalloc, so memcheck sees the end of each.
    env = dict(c.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    rc = c.run(s, cmd, env=env)
    out_path = os.path.join(c.work, f"{name}.out")
    if not os.path.exists(out_path):  # not started: no time left
        return
    with open(out_path, errors="replace") as f:
        text = f.read()
    errors = [int(x) for x in re.findall(r"ERROR SUMMARY: (\d+) error", text)]
    hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    s.data = {"error_summaries": errors, "racecheck": [list(map(int, h)) for h in hazards],
              "driver_ok": "SANITIZE OK" in text}
    if rc is None:
        return
    clean = rc == 0 and not any(errors) and all(int(h[1]) == 0 for h in hazards) and s.data["driver_ok"]
    s.status = "passed" if clean else "failed"
    s.detail = (f"exit {rc}; error summaries {errors or 'none'}"
                + (f"; racecheck (hazards, errors, warnings) {s.data['racecheck']}" if hazards else "")
                + ("" if s.data["driver_ok"] else "; the driver did not finish its checks"))


def kernels(c: Check) -> None:
    s = c.steps["kernels"]
    path = os.path.join(c.work, "kernels.json")
    rc = c.run(s, [PY, "benchmarks/kernels.py", "--device", "cuda", "--numel", "64M", "--dtypes", "fp32,bf16",
                   "--reps", "10", "--json", path])
    if os.path.exists(path):
        with open(path) as f:
            s.data = json.load(f)
    if rc is None:
        return
    s.status = "passed" if rc == 0 else "failed"
    s.detail = (f"copy {s.data.get('copy_gbps', 0):.0f} GB/s; {s.data.get('wrong', '?')} wrong"
                if s.data else f"exit {rc}, no JSON")


def ipc_bench(c: Check, name: str, env: dict | None = None) -> None:
    s = c.steps[name]
    path = os.path.join(c.work, f"{name}.json")
    # --timeout 30: as for memcheck-ipc, a hang (ranks whose blocks cannot all run at once, say) raises
    # "timed out waiting for rank r" inside the step's budget; one call takes well under a second.
    rc = c.run(s, [PY, "benchmarks/gpu_allreduce.py", "-n", "2", "--timeout", "30", "--json", path], env=env)
    if os.path.exists(path):
        with open(path) as f:
            s.data = json.load(f)
    if rc is None:
        return
    s.status = "passed" if rc == 0 else "failed"
    s.detail = (f"copy {s.data.get('copy_gbps', 0):.0f} GB/s; {s.data.get('wrong', '?')} wrong" if s.data
                else f"exit {rc}, no JSON")


def ipc_bench_mps(c: Check, info: dict) -> None:
    s = c.steps["ipc-bench-mps"]
    if os.environ.get("GPU_CHECK_MPS") != "1":
        s.status, s.detail = "skipped", "set GPU_CHECK_MPS=1 to also run the IPC benchmark under MPS"
        return
    control = info.get("mps_control")
    if not control:
        s.status, s.detail = "skipped", "nvidia-cuda-mps-control not found"
        return
    pipe, logs = tempfile.mkdtemp(prefix="mps-pipe-"), tempfile.mkdtemp(prefix="mps-log-")
    env = dict(c.env, CUDA_MPS_PIPE_DIRECTORY=pipe, CUDA_MPS_LOG_DIRECTORY=logs)
    started = subprocess.run([control, "-d"], env=env, capture_output=True, text=True, timeout=30)
    if started.returncode != 0:
        s.status, s.detail = "failed", f"could not start MPS: {started.stderr.strip()[:300]}"
        return
    try:
        ipc_bench(c, "ipc-bench-mps", env=env)
    finally:
        subprocess.run([control], input="quit\n", env=env, capture_output=True, text=True, timeout=30)


# ---- targets and report ----

def targets(c: Check) -> list[dict]:
    rows = []
    k = c.steps["kernels"].data
    if k.get("rows"):
        by = {(r["op"], r["dtype"]): r for r in k["rows"]}
        for op in ("quantize_int8", "dequantize_add_"):
            for dt in ("fp32", "bf16"):
                r = by.get((op, dt))
                if r:
                    rows.append(dict(target=f"{op} {dt} 64M", want=">= 80% copy", got=f"{r['pct_copy']:.0f}% copy",
                                     met=r["pct_copy"] >= 80))
        r = by.get(("topk 1%", "fp32"))
        if r and r.get("vs_torch_topk") is not None:
            rows.append(dict(target="top-k 1% of 64M fp32", want=">= 8x torch.topk",
                             got=f"{r['vs_torch_topk']:.1f}x", met=r["vs_torch_topk"] >= 8))
        for dt in ("fp32", "bf16"):
            r = by.get(("bucket_flatten x200", dt))
            if r:
                rows.append(dict(target=f"bucket flatten x200 {dt}", want=">= 80% copy", got=f"{r['pct_copy']:.0f}% copy",
                                 met=r["pct_copy"] >= 80))
    for name in ("ipc-bench", "ipc-bench-mps"):
        d = c.steps[name].data
        tag = " (MPS)" if name.endswith("mps") else ""
        big = [r for r in d.get("bandwidth", []) if r["bytes"] == 64 << 20 and r["dtype"] == "fp32"]
        if big:
            r = big[0]
            rows.append(dict(target=f"IPC all-reduce 64 MiB, 2 procs{tag}", want=">= 60% copy",
                             got=f"{r['pct_copy']:.0f}% copy ({r['ipc_ms']:.2f} ms)", met=r["pct_copy"] >= 60))
        small = [r for r in d.get("latency", []) if r["bytes"] <= 32 << 10]
        if small:
            worst = max(small, key=lambda r: r["ipc_us"])
            rows.append(dict(target=f"IPC all-reduce <= 32 KiB, 2 procs{tag}", want="< 20 us",
                             got=f"max {worst['ipc_us']:.1f} us (at {worst['bytes']} B)", met=worst["ipc_us"] < 20))
    return rows


def table(c: Check, info: dict | None, target_rows: list[dict]) -> str:
    lines = [f"# pyparallel gpu-check, {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"# machine: {c.steps['probe'].detail}", f"# {len(STEPS)} steps, {time.monotonic() - c.start:.0f} s",
             "", f"{'step':<14} {'status':<8} {'s':>5}  detail"]
    for name, _, _ in STEPS:
        st = c.steps[name]
        lines.append(f"{name:<14} {st.status:<8} {st.seconds:>5.0f}  {st.detail}")
    failures = c.steps["tests"].data.get("failures") or []
    if failures:
        lines += ["", "failing tests:"] + [f"  {f['test']}: {f['message'][:200]}" for f in failures]
    k = c.steps["kernels"].data
    if k.get("rows"):
        lines += ["", f"kernels on {k.get('machine')} (copy {k.get('copy_gbps', 0):.0f} GB/s):",
                  f"  {'op':<20} {'dtype':<5} {'ours ms':>8} {'ref ms':>8} {'speedup':>8} {'GB/s':>7} {'%copy':>6} ok"]
        for r in k["rows"]:
            lines.append(f"  {r['op']:<20} {r['dtype']:<5} {r['ours_ms']:>8.3f} {r['ref_ms']:>8.3f} "
                         f"{r['speedup']:>7.1f}x {r['gbps']:>7.0f} {r['pct_copy']:>5.0f}% {'ok' if r['ok'] else 'NO'}")
    for name in ("ipc-bench", "ipc-bench-mps"):
        d = c.steps[name].data
        if d.get("latency"):
            lines += ["", f"{name}: {d.get('ranks')} processes on {d.get('machine')} (copy {d.get('copy_gbps', 0):.0f} GB/s)",
                      f"  {'bytes':>9} {'ipc us':>9} {'gloo us':>9}"]
            lines += [f"  {r['bytes']:>9} {r['ipc_us']:>9.1f} {r.get('gloo_us') or float('nan'):>9.1f}" for r in d["latency"]]
            lines.append(f"  {'bytes':>9} {'dtype':>5} {'ipc ms':>8} {'algbw':>7} {'%copy':>6} {'%floor':>7} {'gloo ms':>8}")
            lines += [f"  {r['bytes']:>9} {r['dtype']:>5} {r['ipc_ms']:>8.3f} {r['algbw_gbps']:>7.1f} "
                      f"{r['pct_copy']:>5.0f}% {r['pct_floor']:>6.0f}% {r.get('gloo_ms') or float('nan'):>8.2f}"
                      for r in d.get("bandwidth", [])]
    if target_rows:
        lines += ["", "targets (issue 12):"]
        lines += [f"  {'MET ' if t['met'] else 'MISS'} {t['target']:<40} want {t['want']:<16} got {t['got']}"
                  for t in target_rows]
    return "\n".join(lines) + "\n"


def guarded(c: Check, name: str, fn) -> None:
    """Runs step ``name``'s function; if it raises (a bug here, a truncated JSON or XML file), the step is
    failed with the traceback and the check goes on, so that the report is still written."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 (reported, never hidden)
        s = c.steps[name]
        s.status, s.detail = "failed", f"gpu_check.py raised in this step: {exc!r}"
        s.tail = (s.tail + "\n" + traceback.format_exc())[-3000:]
        c.log.write(f"\n===== {name}: gpu_check.py raised\n{traceback.format_exc()}")
        c.log.flush()


def write_report(c: Check, info: dict | None, out_dir: str) -> str:
    """Writes gpu-check.txt and gpu-check.json (also when the table cannot be made); returns the table."""
    try:
        target_rows = targets(c)
    except Exception:  # noqa: BLE001
        target_rows = [dict(target="(could not compute the targets)", want="", got=traceback.format_exc()[-500:],
                            met=False)]
    try:
        report = table(c, info, target_rows)
    except Exception:  # noqa: BLE001
        report = ("# pyparallel gpu-check: the table could not be made (see gpu-check.json)\n"
                  + "\n".join(f"{n:<14} {st.status:<8} {st.detail}" for n, st in c.steps.items())
                  + "\n" + traceback.format_exc())
    with open(os.path.join(out_dir, "gpu-check.txt"), "w") as f:
        f.write(report)
    result = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "seconds": round(time.monotonic() - c.start, 1),
        "probe": info or c.steps["probe"].data,
        "steps": {n: dict(status=s.status, seconds=round(s.seconds, 1), detail=s.detail, data=s.data,
                          tail=s.tail if s.status not in ("passed", "skipped") else "")
                  for n, s in c.steps.items()},
        "targets": target_rows,
        "target_definitions": TARGETS,
    }
    with open(os.path.join(out_dir, "gpu-check.json"), "w") as f:
        json.dump(result, f, indent=1, default=repr)  # default: whatever a step's data holds, still written
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deadline", type=float, default=570, help="seconds for everything (default 570)")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"),
                   help="where the JSON, table and log go (default: $OUT, else benchmarks/results/)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    c = Check(args.deadline, args.out)
    print(f"gpu-check: output in {args.out}", flush=True)

    info = None

    def do_probe():
        nonlocal info
        info = probe(c)

    guarded(c, "probe", do_probe)
    print(f"probe: {c.steps['probe'].status}: {c.steps['probe'].detail}", flush=True)
    built = False

    def do_build():
        nonlocal built
        built = build(c, info)

    if info is not None:
        guarded(c, "build", do_build)
    if built:
        for name, fn in (("tests", lambda: tests(c, info)),
                         ("memcheck", lambda: sanitizer(c, info, "memcheck", "memcheck", ["--kernels"])),
                         ("racecheck", lambda: sanitizer(c, info, "racecheck", "racecheck", ["--kernels"])),
                         # --timeout: a wait that cannot end (ranks that never meet) fails with "timed out
                         # waiting for rank r" inside the step's budget instead of being killed silently.
                         ("memcheck-ipc", lambda: sanitizer(c, info, "memcheck-ipc", "memcheck",
                                                            ["--ipc", "2", "--timeout", "40"])),
                         ("kernels", lambda: kernels(c)),
                         ("ipc-bench", lambda: ipc_bench(c, "ipc-bench")),
                         ("ipc-bench-mps", lambda: ipc_bench_mps(c, info))):
            print(f"{name}: running (budget {c.budget(name):.0f} s)", flush=True)
            guarded(c, name, fn)
            print(f"{name}: {c.steps[name].status}: {c.steps[name].detail}", flush=True)
    elif info is not None:
        print(f"build: {c.steps['build'].status}: {c.steps['build'].detail}", flush=True)

    report = write_report(c, info, args.out)
    c.log.close()
    shutil.rmtree(c.work, ignore_errors=True)
    print(report)
    if info is None:
        print(f"gpu-check: {c.steps['probe'].detail}", file=sys.stderr)
        return 2
    required = [n for n, _, _ in STEPS if n != "ipc-bench-mps"]
    ok = all(c.steps[n].status == "passed" for n in required)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
