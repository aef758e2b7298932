"""TrainingArgs.deterministic: what the worker sets before any CUDA work (train/worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from instructpack import TrainingArgs

PROBE = """
import json, os, torch
from instructpack.train.worker import make_deterministic
before = torch.are_deterministic_algorithms_enabled()
make_deterministic()
print(json.dumps({"before": before, "after": torch.are_deterministic_algorithms_enabled(),
                  "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
                  "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                  "flash": os.environ.get("FLASH_ATTENTION_DETERMINISTIC"),
                  "cudnn": [torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic]}))
"""


def test_deterministic_sets_torch_cublas_cudnn_and_flash_attention():
    env = {k: v for k, v in os.environ.items() if k not in ("CUBLAS_WORKSPACE_CONFIG", "FLASH_ATTENTION_DETERMINISTIC")}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"before": False, "after": True, "warn_only": True, "cublas": ":4096:8", "flash": "1",
                   "cudnn": [False, True]}


def test_deterministic_is_off_by_default_and_reaches_the_workers_job_file():
    import msgspec

    args = dict(model_path="m", data_path="d", ckpt_output_dir="c", data_output_dir="o", max_seq_len=8,
                max_batch_len=8, effective_batch_size=1, learning_rate=1e-5)
    assert TrainingArgs(**args).deterministic is False
    on = msgspec.json.decode(msgspec.json.encode(TrainingArgs(**args, deterministic=True)), type=TrainingArgs)
    assert on.deterministic is True
