"""Callbacks: user code called at named points of the training loop, as in InstructLab
Training 0.16 (`TrainingArgs.callbacks=[MyCallback()]`). Subclass TrainerCallback and
override the hooks you need; each receives a TrainingContext, a snapshot of the state of
training at that point. No torch here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

HOOK_NAMES = (
    "on_train_begin",
    "on_epoch_begin",
    "on_step_begin",
    "on_before_forward",
    "on_after_backward",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_log",
    "on_evaluate",
    "on_save",
    "on_step_end",
    "on_epoch_end",
    "on_train_end",
)


@dataclass
class TrainingContext:
    """The state of training when a hook is called (its fields are InstructLab's)."""
    hook_name: str = ""

    step: int = 0
    epoch: int = 0
    total_samples: int = 0
    total_tokens: int = 0

    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    elapsed_time: float | None = None
    overall_throughput: float | None = None
    cuda_mem_allocated: float | None = None

    batch_metrics: dict[str, Any] = field(default_factory=dict)
    val_metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint_path: str | None = None

    output_dir: str = ""
    model_name_or_path: str = ""
    max_epochs: int = 0
    world_size: int = 1
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True


CONTEXT_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainingContext))


class TrainerCallback:
    """Base class of callbacks: every hook does nothing until overridden.

    on_before_forward and on_after_backward are called for every micro-batch of a step, the
    others once per step, epoch or run. Where each hook runs (which ranks) and what a hook
    that raises does to the run are in the README's Callbacks section."""

    def on_train_begin(self, context: TrainingContext) -> None:
        pass

    def on_epoch_begin(self, context: TrainingContext) -> None:
        pass

    def on_step_begin(self, context: TrainingContext) -> None:
        pass

    def on_before_forward(self, context: TrainingContext) -> None:
        pass

    def on_after_backward(self, context: TrainingContext) -> None:
        pass

    def on_pre_optimizer_step(self, context: TrainingContext) -> None:
        pass

    def on_optimizer_step(self, context: TrainingContext) -> None:
        pass

    def on_log(self, context: TrainingContext) -> None:
        pass

    def on_evaluate(self, context: TrainingContext) -> None:
        pass

    def on_save(self, context: TrainingContext) -> None:
        pass

    def on_step_end(self, context: TrainingContext) -> None:
        pass

    def on_epoch_end(self, context: TrainingContext) -> None:
        pass

    def on_train_end(self, context: TrainingContext) -> None:
        pass
