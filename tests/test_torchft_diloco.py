"""benchmarks/torchft_diloco.py: torchft's own DiLoCo on the charlm task, the row benchmarks/train.py sets
next to ours. Its self-check (2 ranks on loopback, a tiny model, H = 5, two runs in the same processes)
fails unless every rank ends with the same global parameters, every sync commits in one quorum, the
counted bytes are 2 (n - 1) / n of the fp32 parameters per sync, the default group still works after
torchft's teardown, and the parameters equal those of pyparallel's DiLoCo after the same training."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("torchft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchft_diloco_matches_ours_and_tears_down():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "torchft_diloco.py"), "--repeat", "2"],
                         capture_output=True, text=True, timeout=240, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "max |torchft DiLoCo - pyparallel DiLoCo| over the parameters: 0.00e+00" in out.stdout, out.stdout[-3000:]
    assert "ok: 2 ranks, 2 run(s)" in out.stdout, out.stdout[-3000:]
