"""The training loop: epochs of planned steps, metrics after each step, checkpoints when due,
resuming from the newest full-state checkpoint and stopping cleanly when asked."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import torch

from ..callbacks import CallbackRunner, TrainerCallback, TrainingContext
from ..config import TrainingArgs
from ..data.loader import Step, StepLoader
from ..data.sampler import MultipackSampler
from ..data.shards import TokenDataset
from ..data.validation import Split, make_split
from .backends import Backend, build_backend
from .checkpoints.full_state import LauncherChoice, resume, save_full_state
from .checkpoints.hf import save_hf_checkpoint
from .checkpoints.identity import DatasetSummary, Progress, run_fingerprint
from .checkpoints.native import save_native_checkpoint
from .checkpoints.schedule import DEEPSPEED_FORMAT, CheckpointSchedule, checkpoint_dir
from .distributed import World, all_reduce
from .metrics import (
    MetricsLogger,
    ProgressBar,
    StepRecord,
    ValidationRecord,
    fragmentation_advice,
    peak_memory_mib,
    peak_reserved_mib,
    reset_peak_memory,
)
from .model import moe
from .optim import build_scheduler
from .precision import Precision
from .preemption import StopRequest
from .step import StepResult, run_step
from .validation import Validation

log = logging.getLogger(__name__)


def step_record(step: Step, result: StepResult, world: World, global_step: int, samples_before: int,
                start: float) -> StepRecord:
    """The metrics of one step over all ranks, with a check that the plan's loss
    denominator is what the micro-batches really held."""
    loss_sum, targets, tokens, samples = all_reduce(
        [result.loss_sum, result.targets, result.tokens, result.samples], world)
    reserved = peak_reserved_mib(world.device)
    peak_mib, reserved = all_reduce([peak_memory_mib(world.device), reserved or 0.0], world, op="max")
    if int(targets) != step.targets:
        raise RuntimeError(f"step {step.step} of epoch {step.epoch}: the plan counted {step.targets} targets but "
                           f"the micro-batches held {int(targets)}; the dataset's trained-token counts do not "
                           "match its masks (re-run preprocessing)")
    seconds = result.seconds
    router = {}
    if result.router_aux_loss is not None:
        (aux,) = all_reduce([result.router_aux_loss], world)
        counts = result.expert_counts
        if counts is not None and world.distributed:
            counts = counts.clone()
            torch.distributed.all_reduce(counts)
        router = {"router_aux_loss": aux,
                  "max_expert_load": moe.max_expert_load(counts) if counts is not None else None}
    return StepRecord(
        epoch=step.epoch, step=global_step, loss=loss_sum / max(targets, 1), lr=result.lr,
        grad_norm=result.grad_norm, samples=int(samples), total_samples=samples_before + int(samples),
        tokens=int(tokens), trained_tokens=int(targets), tokens_per_s=tokens / seconds,
        trained_tokens_per_s=targets / seconds, samples_per_s=samples / seconds, step_time_s=seconds,
        micro_batches=result.micro_batches, peak_memory_mib=peak_mib,
        peak_reserved_mib=reserved if world.device.type == "cuda" else None, elapsed_s=time.perf_counter() - start,
        **router)


def validation_split(args: TrainingArgs, dataset: TokenDataset) -> Split | None:
    """The held-out samples (the launcher made and stored the split; this reads it)."""
    if args.validation_split <= 0:
        return None
    return make_split(dataset.path, dataset.manifest, len(dataset), args.validation_split, args.random_seed)


def training_sampler(args: TrainingArgs, world: World, dataset: TokenDataset,
                     split: Split | None = None) -> MultipackSampler:
    """This rank's view of the run's multipack plan (of the samples not held out; `split`:
    the run's validation split, read here when not given)."""
    split = split if split is not None else validation_split(args, dataset)
    return MultipackSampler(dataset.lengths, effective_batch_size=args.effective_batch_size,
                            max_batch_len=args.max_batch_len, world_size=world.world_size, rank=world.rank,
                            seed=args.random_seed, target_counts=dataset.target_counts,
                            subset=split.train if split is not None else None)


@dataclass
class TrainResult:
    backend: Backend  # holds the trained model
    progress: Progress
    stopped_by: str | None = None  # a stop request ended the run early (the full state is saved)
    checkpoint: Path | None = None  # the full-state checkpoint written when it stopped


def callback_context(args: TrainingArgs, world: World, progress: Progress, epoch: int) -> TrainingContext:
    return TrainingContext(step=progress.step, epoch=epoch, total_samples=progress.samples,
                           total_tokens=progress.tokens, elapsed_time=progress.elapsed_s,
                           output_dir=args.ckpt_output_dir, model_name_or_path=args.model_path,
                           max_epochs=args.num_epochs, world_size=world.world_size,
                           is_local_process_zero=world.local_rank == 0, is_world_process_zero=world.is_main)


def _after_step(context: TrainingContext, record: StepRecord) -> None:
    """The context after a step, with InstructLab's names for the numbers."""
    context.step, context.epoch = record.step, record.epoch
    context.total_samples, context.total_tokens = record.total_samples, context.total_tokens + record.tokens
    context.loss, context.learning_rate, context.grad_norm = record.loss, record.lr, record.grad_norm
    context.elapsed_time = record.elapsed_s
    context.overall_throughput = record.samples_per_s
    context.cuda_mem_allocated = record.peak_memory_mib / 1024 if torch.cuda.is_available() else None
    context.batch_metrics = {"total_samples": record.samples, "total_length": record.tokens,
                             "num_loss_counted_tokens": record.trained_tokens,
                             "num_minibatches": record.micro_batches, **msgspec.structs.asdict(record)}


def train(args: TrainingArgs, world: World, model: torch.nn.Module, tokenizer, dataset: TokenDataset,
          *, progress_bar: bool = False, stop: StopRequest | None = None,
          precision: Precision | None = None, resume_choice: LauncherChoice | None = None,
          callbacks: list[TrainerCallback] | None = None) -> TrainResult:
    """Runs every epoch, or what is left of them after the newest full-state checkpoint (the
    launcher's `resume_choice` when it made one), calling `callbacks`' hooks on the way."""
    stop = stop or StopRequest()
    split = validation_split(args, dataset)
    sampler = training_sampler(args, world, dataset, split)
    loader = StepLoader(dataset, sampler, pin_memory=world.device.type == "cuda")
    total_steps = sampler.steps_per_epoch * args.num_epochs
    most_micro_batches = int(sampler.plan(sampler.epoch).micro_batches_per_step.max())
    backend = build_backend(model, args, world, micro_batches=most_micro_batches, precision=precision)
    scheduler = build_scheduler(backend.optimizer, args, total_steps)
    fingerprint = run_fingerprint(args, dataset.manifest, world.world_size)
    summary = DatasetSummary.of(dataset.path, dataset.manifest)
    progress, resumed_from = resume(args.ckpt_output_dir, backend, scheduler, sampler, fingerprint, world,
                                    dataset=summary, choice=resume_choice)
    validation = Validation(args, world, dataset, split.validation) if split is not None else None
    checkpoints = CheckpointSchedule.from_args(args)
    native_checkpoints = CheckpointSchedule.deepspeed_native(args)
    full_states = CheckpointSchedule.full_state(args)
    metrics = MetricsLogger(args.ckpt_output_dir, args, run_config=msgspec.to_builtins(args),
                            resume_after_step=progress.step if resumed_from else None) if world.is_main else None
    bar = ProgressBar(total_steps, enabled=world.is_main and progress_bar, initial=progress.step)
    if resumed_from is not None and sampler.epoch >= args.num_epochs and world.is_main:
        log.warning("%s is the state at the end of training: nothing is left to do. To train again from the "
                    "start, delete %s or use another ckpt_output_dir", resumed_from, resumed_from.parent)
    log.info("training: %d samples, %d epochs of %d steps, %d processes (%s)", len(dataset), args.num_epochs,
             sampler.steps_per_epoch, world.world_size, backend.name)
    hooks = CallbackRunner(callbacks or [], callback_context(args, world, progress, sampler.epoch))
    hooks.fire("on_train_begin")

    start = time.perf_counter() - progress.elapsed_s  # a resumed run's clock goes on
    stopped_by, saved = None, None
    advised = False  # the allocator hint is given once per run
    try:
        while sampler.epoch < args.num_epochs and stopped_by is None:
            hooks.context.epoch = sampler.epoch
            hooks.fire("on_epoch_begin")
            for step in loader:
                reset_peak_memory(world.device)
                hooks.fire("on_step_begin", step=progress.step + 1)
                step_result = run_step(backend, step, scheduler, device=world.device, hooks=hooks, world=world)
                record = step_record(step, step_result, world, progress.step + 1, progress.samples, start)
                _after_step(hooks.context, record)
                if world.is_main and not advised:
                    advice = fragmentation_advice(record.peak_memory_mib, record.peak_reserved_mib,
                                                  os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
                    if advice is not None:
                        log.warning("%s", advice)
                        advised = True
                hooks.fire("on_log")
                progress = Progress(step=record.step, samples=record.total_samples,
                                    tokens=progress.tokens + record.tokens, elapsed_s=record.elapsed_s)
                if metrics is not None:
                    metrics.log(record)
                if validation is not None and record.step % args.validation_frequency == 0:
                    measured = validation.run(backend)
                    if metrics is not None:
                        metrics.log(ValidationRecord(step=record.step, epoch=record.epoch, val_loss=measured.loss,
                                                     val_tokens=measured.targets, val_samples=measured.samples))
                    if world.is_main:
                        log.info("step %d: validation loss %.4f (%d tokens)", record.step, measured.loss,
                                 measured.targets)
                    hooks.context.val_metrics = {"val_loss": measured.loss, "val_num_tokens": measured.targets}
                    hooks.fire("on_evaluate")
                bar.update(record)
                if world.is_main and not progress_bar:  # a log file gets one line per step instead
                    log.info("step %d/%d epoch %d: loss %.4f, lr %.3g, grad norm %.3g, %.0f tokens/s",
                             progress.step, total_steps, step.epoch, record.loss, record.lr, record.grad_norm,
                             record.tokens_per_s)
                epoch_end, last_step = step.step == sampler.steps_per_epoch - 1, progress.step == total_steps
                if checkpoints.due(progress.step, epoch_end, last_step):
                    directory = checkpoint_dir(args.ckpt_output_dir, progress.samples, args.keep_last_checkpoint_only)
                    save_hf_checkpoint(backend, tokenizer, directory, world, args.lora)
                    hooks.fire("on_save", checkpoint_path=str(directory))
                if native_checkpoints is not None and native_checkpoints.due(progress.step, epoch_end, last_step):
                    save_native_checkpoint(backend, checkpoint_dir(
                        args.ckpt_output_dir, progress.samples, args.keep_last_checkpoint_only, DEEPSPEED_FORMAT),
                        world)
                stopping = stop.agreed(world) and not last_step  # at the last step, the run is done anyway
                if stopping or full_states.due(progress.step, epoch_end, last_step):
                    saved = save_full_state(args.ckpt_output_dir, backend, scheduler, sampler, progress,
                                            fingerprint, world, dataset=summary, keep_last=args.full_state_keep_last)
                hooks.fire("on_step_end")
                if epoch_end:
                    hooks.fire("on_epoch_end")
                if stopping:
                    stopped_by = stop.reason()
                    if world.local_rank == 0:
                        stop.consume_trigger()
                    if world.is_main:
                        log.warning("stopped by %s after step %d/%d; the full training state is in %s: run the "
                                    "same job again to resume", stopped_by, progress.step, total_steps, saved)
                    break
        hooks.fire("on_train_end")
    finally:
        bar.close()
        hooks.close()
        if metrics is not None:
            metrics.close()
    if stopped_by is None:
        log.info("training done: %d steps, %d samples in %.1f s", progress.step, progress.samples,
                 time.perf_counter() - start)
        return TrainResult(backend, progress)
    return TrainResult(backend, progress, stopped_by=stopped_by, checkpoint=saved)
