"""What every backend is: `Backend`, which is also the single-process one.

A backend owns the wrapped model and the optimizer, and answers the few questions where
the backends differ inside a step:
- `module`: what the forward pass is called on (the wrapper);
- `sync(last)`: a context for one micro-batch's forward and backward, which holds back
  what can wait for the last micro-batch of a step (DDP's all-reduce, FSDP2's all-reduce
  across replicas, DeepSpeed's update);
- `autocast()`: the context of a forward pass (bf16 autocast over fp32 weights, or over a
  bf16 LoRA base with fp32 adapters, for DDP on GPUs, as train/precision.py decides);
- `backward(loss)` and `step(max_grad_norm)` (clip, update, zero the gradients; returns
  the gradient norm before clipping);
- `gather_weights()`: the whole model's weights, gathered onto rank 0 for a Hugging Face
  checkpoint (a collective: every rank calls it);
- `save_weights_and_optimizer(dir)` / `load_weights_and_optimizer(dir)`: what this rank
  holds of both, for a full-state checkpoint (train/checkpoints/full_state.py).

Every backend averages gradients over ranks, while the step's loss is already divided by
the target count of the whole step (step.py), so `grad_scale` (the world size) scales the
average back up to the sum.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from ..distributed import World
from ..precision import Precision

log = logging.getLogger(__name__)
CPU = torch.device("cpu")


class Backend:
    """A single process: the model as it is, nothing to reduce."""
    name = "single process"
    sharded_state = False  # True: each rank holds (and saves) its own part of the state

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World | None = None,
                 module: torch.nn.Module | None = None, precision: Precision | None = None):
        self.model = model  # the Hugging Face (or peft) model, unwrapped: config, saving
        self.module = module if module is not None else model  # what forward runs on
        self.optimizer = optimizer
        self.world = world
        self.grad_scale = float(world.world_size) if world is not None else 1.0
        self.precision = precision or Precision(weights=torch.float32, compute=torch.float32, autocast=False)

    @contextlib.contextmanager
    def sync(self, last: bool) -> Iterator[None]:
        yield

    def autocast(self):
        """The context of a forward pass: bf16 autocast (train/precision.py), or nothing."""
        if not self.precision.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.world.device.type, dtype=self.precision.compute)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(_full(grad_norm))

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def gather_weights(self) -> dict[str, torch.Tensor] | None:
        """Rank 0: every weight of the whole model, as trained (sharded backends gather them
        onto the CPU; the checkpoint writer casts and moves them); other ranks: None."""
        if self.world is not None and not self.world.is_main:
            return None
        return self.model.state_dict()

    def save_weights_and_optimizer(self, directory: str | Path) -> None:
        """The trained weights and the optimizer state, for resuming: one file per rank
        holding that rank's shards as they live in memory (`sharded_state`), or, when every
        rank holds the same state (one process, DDP), one file written by rank 0. Frozen
        weights (a LoRA base) are left out: they reload from model_path. A collective.

        Plain tensors in a torch.save file, so that loading can use `weights_only=True`
        (torch.distributed.checkpoint would pickle its metadata, and unpickling a file can
        run code)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=_trained_only())
        if self.sharded_state or self.world is None or self.world.is_main:
            Path(directory).mkdir(exist_ok=True)  # not its parents: they must be there for every rank
            state = {"model": _local_tensors(model_state), "optimizer": _local_tensors(optimizer_state)}
            with open(Path(directory) / self._state_file(), "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

    def load_weights_and_optimizer(self, directory: str | Path) -> None:
        """Reads what `save_weights_and_optimizer` wrote into this backend's model and optimizer. The world
        and the sharding must be those of the run that saved (the resume fingerprint says
        so); a tensor of another shape is refused. A collective."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = Path(directory) / self._state_file()
        saved = torch.load(path, map_location="cpu", weights_only=True)
        # The live state gives the structure to restore into: which tensors are sharded
        # (DTensors, rebuilt around the saved local shards) and where each one lives.
        # get_state_dict creates the optimizer's state if no step has run yet.
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=_trained_only())
        model_state = _restore(saved["model"], model_state, f"{path}: model")
        optimizer_state = _restore(saved["optimizer"], optimizer_state, f"{path}: optimizer")
        # Not strict: the frozen weights are left out on purpose; _restore has checked that
        # every trained one is there.
        set_state_dict(self.model, self.optimizer, model_state_dict=model_state,
                       optim_state_dict=optimizer_state, options=_trained_only(strict=False))

    def _state_file(self) -> str:
        rank = self.world.rank if self.sharded_state and self.world is not None else 0
        return f"rank{rank:05d}.pt"


def _local_tensors(tree):
    """`tree` with each DTensor replaced by this rank's shard of it, copied out of any
    larger storage (torch.save writes a view's whole storage). A GPU tensor is copied to
    the CPU directly (the copy holds the view's elements only), never cloned on the GPU first."""
    if isinstance(tree, dict):
        return {k: _local_tensors(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_local_tensors(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        t = tree.to_local() if isinstance(tree, DTensor) else tree
        t = t.detach()
        if t.device.type != "cpu":
            return t.to("cpu")
        return t.clone() if t.untyped_storage().nbytes() != t.nbytes else t
    return tree


def _restore(saved, live, where: str):
    """`saved` (from _local_tensors) in the form of `live`: DTensors rebuilt around the saved
    shards on the live tensors' devices. Keys and shapes must match."""
    if isinstance(live, dict):
        if not isinstance(saved, dict):
            raise ValueError(f"{where}: the saved state does not fit this model (not a mapping)")
        # Every tensor must be there; other entries (hyperparameters such as the
        # scheduler's initial_lr) are taken from the saved state where it has them.
        missing = sorted(str(k) for k in live.keys() - saved.keys() if _has_tensors(live[k]))
        extra = sorted(str(k) for k in saved.keys() - live.keys() if _has_tensors(saved[k]))
        if missing or extra:
            raise ValueError(f"{where}: the saved state does not fit this model (missing {missing[:5]}, "
                             f"unexpected {extra[:5]}); it was written for another model or settings")
        restored = {k: _restore(saved[k], v, f"{where}.{k}") if k in saved else v for k, v in live.items()}
        return restored | {k: v for k, v in saved.items() if k not in live}
    if isinstance(live, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(live):
            raise ValueError(f"{where}: the saved state does not fit this model (a list of another length)")
        return type(live)(_restore(s, v, f"{where}[{i}]") for i, (s, v) in enumerate(zip(saved, live)))
    if isinstance(live, torch.Tensor):
        local = live.to_local() if isinstance(live, DTensor) else live
        if not isinstance(saved, torch.Tensor) or saved.shape != local.shape:
            shape = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise ValueError(f"{where}: saved {shape}, this run holds {tuple(local.shape)} (another model, "
                             "world size or sharding)")
        tensor = saved.to(device=local.device, dtype=local.dtype)
        if isinstance(live, DTensor):
            return DTensor.from_local(tensor, live.device_mesh, live.placements, shape=live.shape,
                                      stride=live.stride(), run_check=False)
        return tensor
    return saved  # hyperparameters and names (param_groups)


def _has_tensors(tree) -> bool:
    if isinstance(tree, dict):
        return any(_has_tensors(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(_has_tensors(v) for v in tree)
    return isinstance(tree, torch.Tensor)


def _trained_only(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's gradient norm) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
