"""`python -m benchmarks gpu --dry`: the GPU proof script, run on the CPU with tiny shapes
so that it cannot rot between the rare sessions that have a GPU (benchmarks/gpu.py). Every
check must pass or be skipped with its reason; a failing one prints FAIL and exits 1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKS = {"packed-logits", "packed-grads", "backends", "two-processes", "lora", "qlora", "checkpoint", "resume",
          "throughput"}


@pytest.mark.slow
def test_the_gpu_script_passes_every_check_in_its_dry_run():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "gpu", "--dry"], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=900)
    verdicts = {name: verdict for verdict, name in re.findall(r"^(PASS|FAIL|SKIP) (\S+) \(", proc.stdout, re.M)}
    assert set(verdicts) == CHECKS, proc.stdout + proc.stderr[-3000:]
    assert all(v == "PASS" for v in verdicts.values()), proc.stdout + proc.stderr[-3000:]  # the CPU skips none
    assert proc.returncode == 0, proc.stdout
    assert "dry run" in proc.stdout and "throughput:" in proc.stdout
