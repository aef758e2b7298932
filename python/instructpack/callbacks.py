"""Callbacks: user code called at named points of the training loop, as in InstructLab
Training 0.16 (`TrainingArgs.callbacks=[MyCallback()]`). Subclass TrainerCallback and
override the hooks you need; each receives a TrainingContext, a snapshot of the state of
training at that point. No torch here.

How they reach the workers: the launcher pickles the instances with cloudpickle, which
carries a class defined in the user's own script (`__main__`, not importable by the
workers) by value, and an importable one by reference; each worker unpickles its own copy,
with the state the instance had (InstructLab re-runs the class source with no constructor
arguments, losing it). A callback that cannot be pickled (an open file, a lock) is refused
before launch, naming it.

How they run (`CallbackRunner`): on every rank, in the training loop itself, in the order
given, each with its own copy of the context (a callback cannot change another's view or
the run's state). A hook that raises is logged with its traceback, once per callback and
hook, and training goes on: a callback observes the run, it never ends it.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import logging
import traceback
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)

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



def check_callbacks(callbacks: Any) -> list[TrainerCallback]:
    """The callbacks as a list of TrainerCallback instances; ConfigError naming the culprit."""
    if callbacks is None:
        return []
    if not isinstance(callbacks, (list, tuple)):
        raise ConfigError("training_args", ("callbacks",), "must be a list of TrainerCallback instances",
                          callbacks)
    for i, callback in enumerate(callbacks):
        if isinstance(callback, type):
            raise ConfigError("training_args", (f"callbacks[{i}]",), "is a class; pass an instance: "
                              f"callbacks=[{callback.__name__}()]", callback)
        if not isinstance(callback, TrainerCallback):
            raise ConfigError("training_args", (f"callbacks[{i}]",), "is not a TrainerCallback (subclass "
                              "instructpack.TrainerCallback and override the hooks you need)", callback)
    return list(callbacks)


def pack_callbacks(callbacks: list[TrainerCallback]) -> str | None:
    """The callbacks as text for the job file (base64 of a cloudpickle); None for none."""
    if not callbacks:
        return None
    import cloudpickle

    for i, callback in enumerate(callbacks):
        try:
            cloudpickle.dumps(callback)
        except Exception as e:  # what pickling raises depends on the object it meets
            raise ConfigError("training_args", (f"callbacks[{i}]",), f"{type(callback).__name__} cannot be sent "
                              f"to the workers ({type(e).__name__}: {e}); keep open files, locks and clients out "
                              "of the instance (create them in on_train_begin)", callback) from None
    return base64.b64encode(cloudpickle.dumps(list(callbacks))).decode("ascii")


def unpack_callbacks(text: str | None) -> list[TrainerCallback]:
    if not text:
        return []
    import pickle

    return pickle.loads(base64.b64decode(text))  # written by this run's launcher (pack_callbacks)


class CallbackRunner:
    """Calls the hooks; `context` is the run's state, kept current by the training loop."""

    def __init__(self, callbacks: list[TrainerCallback], context: TrainingContext):
        self.callbacks = callbacks
        self.context = context
        self.failures: dict[tuple[str, str], int] = {}
        # Only hooks some callback overrides are dispatched (the per-micro-batch ones are hot).
        self._overridden = {name: [cb for cb in callbacks if getattr(type(cb), name) is not
                                   getattr(TrainerCallback, name)] for name in HOOK_NAMES}

    def wants(self, hook: str) -> bool:
        return bool(self._overridden[hook])

    def fire(self, hook: str, **fields: Any) -> None:
        """Calls `hook` of every callback that overrides it, with the context as it is now
        plus `fields` (for this call only)."""
        for callback in self._overridden[hook]:
            snapshot = copy.deepcopy(dataclasses.replace(self.context, hook_name=hook, **fields))
            try:
                getattr(callback, hook)(snapshot)
            except Exception:
                key = (type(callback).__name__, hook)
                self.failures[key] = self.failures.get(key, 0) + 1
                if self.failures[key] == 1:
                    log.error("callback %s.%s raised at step %d (training goes on; later failures of this hook "
                              "are counted, not logged):\n%s", *key, self.context.step, traceback.format_exc())

    def close(self) -> None:
        for (name, hook), count in self.failures.items():
            log.warning("callback %s.%s raised %d time(s) in this run", name, hook, count)
