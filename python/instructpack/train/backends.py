"""How the model is spread over processes: one small class per backend.

A backend owns the wrapped model and the optimizer, and answers the few questions where
the backends differ inside a step:
- `module`: what the forward pass is called on (the wrapper);
- `sync(last)`: a context for one micro-batch's backward, which reduces gradients over
  ranks only in the last micro-batch of a step;
- `backward(loss)` and `step(max_grad_norm)` (clip, update, zero the gradients; returns
  the gradient norm before clipping);
- `full_state_dict()`: the whole model's weights, gathered onto rank 0 for a Hugging Face
  checkpoint (a collective: every rank calls it).

Every backend averages gradients over ranks, while the step's loss is already divided by
the target count of the whole step (step.py), so `grad_scale` (the world size) scales the
average back up to the sum.

DeepSpeed lives in deepspeed_backend.py, so that `import deepspeed` happens only when it is
used.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import DistributedBackend, ShardingStrategies, TrainingArgs
from .distributed import World
from .model import decoder_layers, training_dtype
from .optim import build_optimizer

log = logging.getLogger(__name__)


class Backend:
    """A single process: the model as it is, nothing to reduce."""
    name = "single process"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World | None = None,
                 module: torch.nn.Module | None = None):
        self.model = model  # the Hugging Face (or peft) model, unwrapped: config, saving
        self.module = module if module is not None else model  # what forward runs on
        self.optimizer = optimizer
        self.world = world
        self.grad_scale = float(world.world_size) if world is not None else 1.0

    @contextlib.contextmanager
    def sync(self, last: bool) -> Iterator[None]:
        yield

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

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Rank 0: every weight in the training dtype (sharded backends gather them onto the
        CPU); other ranks: None."""
        if self.world is not None and not self.world.is_main:
            return None
        return self.model.state_dict()

    def save_state(self, directory: str | Path) -> None:
        """The trained weights and the optimizer state for resuming, sharded as they live in
        memory: each rank writes its own shards (torch.distributed.checkpoint; replicated
        tensors once). Frozen weights (a LoRA base) are not saved: they reload from
        model_path. A collective."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._training_state(), checkpoint_id=str(directory))

    def load_state(self, directory: str | Path) -> None:
        """Reads what `save_state` wrote into this backend's model and optimizer, resharded
        onto this world. A collective."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._training_state()
        dcp.load(state, checkpoint_id=str(directory))
        # Not strict: the frozen weights are missing on purpose, and dcp.load has already
        # failed on any trained weight the checkpoint lacks.
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=_trained_only(strict=False))

    def _training_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=_trained_only())
        return {"model": model_state, "optimizer": optimizer_state}


def _trained_only(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)


class DDPBackend(Backend):
    """Every rank holds the whole model; gradients are all-reduced once per step."""
    name = "DDP"

    def __init__(self, model: torch.nn.Module, world: World, args: TrainingArgs):
        device_ids = [world.device] if world.device.type == "cuda" else None
        module = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        super().__init__(model, build_optimizer(model, args), world, module)

    def sync(self, last: bool):
        return contextlib.nullcontext() if last else self.module.no_sync()


class FSDPBackend(Backend):
    """PyTorch FSDP2 (`fully_shard`): each decoder layer is one unit of communication, the
    root holds the rest (embeddings, final norm, output layer).

    Sharding strategies:
    - FULL_SHARD: parameters sharded over all ranks, re-sharded after each layer's forward
      and gathered again for its backward (ZeRO-3);
    - SHARD_GRAD_OP: sharded, but kept gathered from forward to backward (ZeRO-2-like:
      less communication, more memory);
    - HYBRID_SHARD: a 2-D mesh (nodes x processes per node), sharded within a node and
      replicated across nodes, so only gradient all-reduces cross the slower network;
    - NO_SHARD: the same 2-D mesh with shards of size one: every rank holds everything and
      gradients are all-reduced (plain replication).
    On CUDA, layers compute in bf16 while the optimizer keeps fp32 master weights and
    gradients are reduced in fp32; on the CPU everything is fp32.
    """
    name = "FSDP2"

    def __init__(self, model: torch.nn.Module, world: World, args: TrainingArgs):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        options = args.fsdp_options
        strategy = options.sharding_strategy
        device_type = world.device.type
        if strategy == ShardingStrategies.HYBRID_SHARD:
            per_node = world.local_world_size
            mesh = init_device_mesh(device_type, (world.world_size // per_node, per_node),
                                    mesh_dim_names=("replicate", "shard"))
        elif strategy == ShardingStrategies.NO_SHARD:
            mesh = init_device_mesh(device_type, (world.world_size, 1), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh(device_type, (world.world_size,), mesh_dim_names=("shard",))
        kwargs = {"mesh": mesh, "reshard_after_forward": strategy != ShardingStrategies.SHARD_GRAD_OP}
        if device_type == "cuda":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if options.cpu_offload_params:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device_type == "cuda")
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        if not options.cpu_offload_params:
            model.to(world.device)  # only this process's shards: the model was loaded on the CPU
        self.save_dtype = training_dtype(world.device)
        log.info("FSDP2 %s over a %s mesh%s", strategy.value, tuple(mesh.shape),
                 ", parameters offloaded to the CPU" if options.cpu_offload_params else "")
        super().__init__(model, build_optimizer(model, args), world, model)

    def sync(self, last: bool):
        # FSDP2 reduce-scatters gradients in each backward unless told not to; accumulate
        # unsharded gradients locally and reduce once, in the last micro-batch.
        self.module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.world.is_main:
            return None
        # Master weights are fp32 under mixed precision; the checkpoint keeps the training
        # dtype (bf16 on GPUs) instead of doubling its size.
        return {k: v.to(self.save_dtype) if v.is_floating_point() else v
                for k, v in without_tied_copies(self.model, state).items()}


def without_tied_copies(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A gathered state dict holds a separate copy of each tied weight (an output layer tied
    to the input embeddings) under every name. `save_pretrained` drops ties only when the
    tensors share storage, so the checkpoint would carry the copy; keep the first name."""
    first: dict[int, str] = {}
    copies = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            copies.add(name)
    return {k: v for k, v in state.items() if k not in copies}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's gradient norm) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def build_backend(model: torch.nn.Module, args: TrainingArgs, world: World, micro_batches: int = 1) -> Backend:
    """The backend `args.distributed_backend` names. Under "ddp" one process trains the
    model as it is; FSDP2 and DeepSpeed wrap even one process (mixed precision, offload).
    `micro_batches`: the most micro-batches a step of the plan has (DeepSpeed's gradient
    accumulation steps, for its bookkeeping)."""
    backend = args.distributed_backend
    if backend == DistributedBackend.DEEPSPEED:
        from .deepspeed_backend import DeepSpeedBackend
        return DeepSpeedBackend(model, world, args, gradient_accumulation_steps=micro_batches)
    if backend == DistributedBackend.FSDP:
        return FSDPBackend(model, world, args)
    if world.distributed:
        return DDPBackend(model, world, args)
    return Backend(model, build_optimizer(model, args), world)
