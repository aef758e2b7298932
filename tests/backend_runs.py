"""Several training jobs in one torchrun launch, one after another in the same process
group: `python -m torch.distributed.run --standalone --nproc-per-node 2
tests/backend_runs.py JOB.json...`. Starting torchrun and importing torch costs seconds per
launch on a small machine; the backend tests run a dozen short jobs.

After each job, the trained model's logits on a fixed probe row, computed through the
backend's own (sharded, wrapped) module, are saved by rank 0 to
`ckpt_output_dir/probe_logits.pt`: what a checkpoint must reproduce."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from instructpack.train.distributed import init_distributed, shutdown
from instructpack.train.job import read_job
from instructpack.train.worker import run, setup_logging

PROBE = torch.arange(3, 43).reshape(1, -1)  # 40 ids inside every test vocabulary


def main(paths: list[str]) -> None:
    world = init_distributed()
    try:
        for path in paths:
            job = read_job(path)
            setup_logging(job.training_args.log_level, world.rank)
            backend = run(job, world)
            backend.module.eval()  # LoRA dropout off
            with torch.no_grad():
                logits = backend.module(input_ids=PROBE.to(world.device), use_cache=False).logits
            if world.is_main:
                torch.save(logits.float().cpu(), Path(job.training_args.ckpt_output_dir) / "probe_logits.pt")
    finally:
        shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
