"""Several training jobs in one torchrun launch, one after another in the same process
group: `python -m torch.distributed.run --standalone --nproc-per-node 2
tests/backend_runs.py JOB.json...`. Starting torchrun and importing torch costs seconds per
launch on a small machine; the backend tests run a dozen short jobs.

After each job, rank 0 saves to the job's ckpt_output_dir:
- `probe_logits.pt`: the trained model's logits on a fixed probe row, computed through the
  backend's own (sharded, wrapped) module: what the HF checkpoint must reproduce;
- `state_check.pt`: the training state round trip. The backend saves its sharded state
  (`save_weights_and_optimizer`), a fresh model and backend load it
  (`load_weights_and_optimizer`), and both take the same extra step: equal losses and
  probe logits after it mean that weights and optimizer state came back whole."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

from instructpack.data.loader import StepLoader
from instructpack.data.shards import load_dataset
from instructpack.train.backends import build_backend
from instructpack.train.distributed import init_distributed, shutdown
from instructpack.train.job import read_job
from instructpack.train.loop import training_sampler
from instructpack.train.model.load import load_model
from instructpack.train.step import run_step
from instructpack.train.worker import run, setup_logging

PROBE = torch.arange(3, 43).reshape(1, -1)  # 40 ids inside every test vocabulary


def probe_logits(backend, device) -> torch.Tensor:
    backend.module.eval()  # LoRA dropout off
    with torch.no_grad():
        logits = backend.module(input_ids=PROBE.to(device), use_cache=False).logits.float().cpu()
    backend.module.train()
    return logits


def state_round_trip(job, world, backend) -> dict:
    args = job.training_args
    directory = Path(args.ckpt_output_dir) / "state"
    backend.save_weights_and_optimizer(directory)
    restored = build_backend(load_model(args, world.device), args, world)
    restored.load_weights_and_optimizer(directory)
    dataset = load_dataset(job.dataset_path)
    step = next(iter(StepLoader(dataset, training_sampler(args, world, dataset))))
    out = {}
    for name, b in (("original", backend), ("restored", restored)):
        for group in b.optimizer.param_groups:  # the schedule ended at 0: an update needs a rate
            group["lr"] = args.learning_rate
        result = run_step(b, step, None, device=world.device)
        out[name] = {"loss": result.loss_sum / max(result.targets, 1), "logits": probe_logits(b, world.device)}
    return out


def run_job(path: str, world) -> None:
    job = read_job(path)
    setup_logging(job.training_args.log_level, world.rank)
    backend = run(job, world).backend
    logits = probe_logits(backend, world.device)
    check = state_round_trip(job, world, backend)
    if world.is_main:
        out = Path(job.training_args.ckpt_output_dir)
        torch.save(logits, out / "probe_logits.pt")
        torch.save(check, out / "state_check.pt")


def main(paths: list[str]) -> None:
    world = init_distributed()
    try:
        for path in paths:
            run_job(path, world)
            gc.collect()  # each job's models and reducers go before the process group (see worker.main)
    finally:
        shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
