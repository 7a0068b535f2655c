"""benchmarks/gpu_check.py (make gpu-check) where it can be checked without a GPU: a machine without one gets
a clear "no CUDA device" and exit status 2, with the JSON and the table still written; the report turns
benchmark results into the issue's targets."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the whole check")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OUT=""))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "no CUDA device" in out.stderr
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    assert result["steps"]["probe"]["status"] == "failed"
    assert "no CUDA device" in result["steps"]["probe"]["detail"]
    assert all(s["status"] == "not run" for name, s in result["steps"].items() if name != "probe")
    assert "no CUDA device" in (tmp_path / "gpu-check.txt").read_text()


# A machine with only torch: the modules the check reports as possibly missing raise ModuleNotFoundError.
_BARE_MACHINE = """
import importlib.abc, sys
class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"numpy", "psutil", "torchft", "hypothesis", "ninja", "pytest_timeout"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Missing())
"""


def test_what_the_check_runs_imports_without_numpy():
    # The GPU machine may have torch alone (torch does not require numpy): the build step's `import
    # pyparallel`, the drivers it runs and the CUDA tests' helpers must import there. (pyparallel.powersgd
    # imported numpy at module level, so `import pyparallel` failed and with it every later step.)
    code = _BARE_MACHINE + (
        "import torch, pyparallel, pyparallel.reference\n"
        "import gpu_sanitize, gpu_allreduce, kernels\n"
        "import test_cuda_ipc\n"
        "print('digest', test_cuda_ipc._digest(torch.arange(5.0)), test_cuda_ipc._digest(torch.empty(0)))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "benchmarks"),
                                                       os.path.join(ROOT, "tests")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "digest" in out.stdout


def test_targets_from_benchmark_results(tmp_path):
    gc = _load()
    c = gc.Check(60, str(tmp_path))
    c.steps["kernels"].data = {"machine": "GPU", "copy_gbps": 3000, "rows": [
        dict(op="quantize_int8", dtype="fp32", ours_ms=0.12, ref_ms=1, speedup=8, gbps=2800, pct_copy=93, ok=True),
        dict(op="dequantize_add_", dtype="bf16", ours_ms=0.3, ref_ms=1, speedup=3, gbps=2000, pct_copy=67, ok=True),
        dict(op="topk 1%", dtype="fp32", ours_ms=1, ref_ms=9, speedup=9, gbps=300, pct_copy=10, ok=True,
             torch_topk_ms=5, vs_torch_topk=5.0),
        dict(op="bucket_flatten x200", dtype="fp32", ours_ms=0.2, ref_ms=1, speedup=5, gbps=2500, pct_copy=83, ok=True)]}
    c.steps["ipc-bench"].data = {"ranks": 2, "machine": "GPU", "copy_gbps": 3000,
                                 "latency": [dict(bytes=8, ipc_us=900.0, gloo_us=50.0),
                                             dict(bytes=32768, ipc_us=1200.0, gloo_us=80.0)],
                                 "bandwidth": [dict(bytes=64 << 20, dtype="fp32", ipc_ms=0.5, algbw_gbps=134,
                                                    busbw_gbps=134, pct_copy=49, pct_floor=18, gloo_ms=80.0)]}
    rows = {r["target"]: r for r in gc.targets(c)}
    assert rows["quantize_int8 fp32 64M"]["met"] and not rows["dequantize_add_ bf16 64M"]["met"]
    assert not rows["top-k 1% of 64M fp32"]["met"] and rows["bucket flatten x200 fp32"]["met"]
    assert not rows["IPC all-reduce 64 MiB, 2 procs"]["met"]
    assert rows["IPC all-reduce <= 32 KiB, 2 procs"]["got"].startswith("max 1200.0 us")
    text = gc.table(c, None, list(rows.values()))
    assert "MISS IPC all-reduce <= 32 KiB" in text and "MET  quantize_int8 fp32 64M" in text
    c.log.close()
    shutil.rmtree(c.work)


def test_step_budgets_keep_reserves_for_later_steps(tmp_path):
    gc = _load()
    c = gc.Check(400, str(tmp_path))  # less than the steps' own budgets add up to
    later = sum(reserve for _, _, reserve in gc.STEPS[2:])
    assert 400 - later - 1 <= c.budget("build") <= 400 - later < 240  # cut to leave the later steps theirs
    assert c.budget("ipc-bench-mps") == 60
    assert sum(own for _, own, _ in gc.STEPS) > 570 >= sum(reserve for _, _, reserve in gc.STEPS)
    c.log.close()
    shutil.rmtree(c.work)


def test_sanitizer_driver_checks_pass_on_the_cpu_kernels():
    # benchmarks/gpu_sanitize.py is what compute-sanitizer runs on the GPU; its own checks (references,
    # inputs, which side mutates what) are exercised here on the CPU kernels.
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_sanitize.py"), "--kernels",
                          "--device", "cpu"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0 and "SANITIZE OK" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def test_a_hung_step_is_killed_with_its_children(tmp_path):
    gc = _load()
    c = gc.Check(60, str(tmp_path))
    pidfile = tmp_path / "child.pid"
    hang = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(100)']);"
            f" open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(100)")
    step = c.steps["kernels"]
    assert c.run(step, [sys.executable, "-c", hang], budget=5) is None
    assert step.status == "timeout" and "5 s" in step.detail
    child = int(pidfile.read_text())

    def gone():  # SIGKILL is delivered at once, but the child takes a moment to die (or be reaped)
        try:
            with open(f"/proc/{child}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except OSError:
            return True

    deadline = time.monotonic() + 10
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(), f"the step's child {child} survived it"
    c.log.close()
    shutil.rmtree(c.work)


def test_a_step_at_its_budget_is_interrupted_first(tmp_path, monkeypatch):
    # SIGINT before SIGTERM/SIGKILL: pytest then still writes its JUnit report (the counts of the tests that
    # ran) and a Python step prints where it hung. (Killed straight away, a timed-out tests step reported
    # nothing at all.)
    gc = _load()
    monkeypatch.setattr(gc, "INTERRUPT_GRACE_S", 5)
    c = gc.Check(60, str(tmp_path))
    hang = "import time\ntry:\n    time.sleep(100)\nexcept KeyboardInterrupt:\n    print('interrupted in sleep')\n    raise"
    step = c.steps["kernels"]
    assert c.run(step, [sys.executable, "-c", hang], budget=6) is None
    assert step.status == "timeout"
    assert "interrupted in sleep" in step.tail and "KeyboardInterrupt" in step.tail, step.tail
    c.log.close()
    shutil.rmtree(c.work)


def test_a_step_that_raises_still_gets_its_report(tmp_path):
    # A bug in gpu_check.py or a truncated result file must fail that step, not lose the JSON and table.
    gc = _load()
    c = gc.Check(60, str(tmp_path))
    gc.guarded(c, "kernels", lambda: json.loads("{truncated"))
    assert c.steps["kernels"].status == "failed" and "JSONDecodeError" in c.steps["kernels"].detail
    c.steps["ipc-bench"].data = {"latency": [dict(bytes=8)], "bandwidth": [dict(bytes=64 << 20, dtype="fp32")],
                                 "odd": {1, 2}}  # rows without their numbers; a set JSON cannot hold
    report = gc.write_report(c, None, str(tmp_path))
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    assert result["steps"]["kernels"]["status"] == "failed"
    assert "JSONDecodeError" in result["steps"]["kernels"]["tail"]
    assert "kernels" in (tmp_path / "gpu-check.txt").read_text() and "kernels" in report
    c.log.close()
    shutil.rmtree(c.work)
