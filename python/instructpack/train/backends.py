"""How the model is spread over processes: one small class per backend.

A backend owns the wrapped model and the optimizer, and answers the few questions where
the backends differ inside a step:
- `module`: what the forward pass is called on (the wrapper);
- `sync(last)`: a context for one micro-batch's forward and backward, which holds back
  what can wait for the last micro-batch of a step (DDP's all-reduce, FSDP2's all-reduce
  across replicas, DeepSpeed's update);
- `autocast()`: the context of a forward pass (bf16 autocast over fp32 weights for DDP
  on GPUs);
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
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from ..config import DistributedBackend, ShardingStrategies, TrainingArgs
from .distributed import World, ensure_process_group
from .model import autocast_dtype, decoder_layers
from .optim import build_optimizer

log = logging.getLogger(__name__)
CPU = torch.device("cpu")


class Backend:
    """A single process: the model as it is, nothing to reduce."""
    name = "single process"
    sharded_state = False  # True: each rank holds (and saves) its own part of the state

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World | None = None,
                 module: torch.nn.Module | None = None, autocast_dtype: torch.dtype | None = None):
        self.model = model  # the Hugging Face (or peft) model, unwrapped: config, saving
        self.module = module if module is not None else model  # what forward runs on
        self.optimizer = optimizer
        self.world = world
        self.grad_scale = float(world.world_size) if world is not None else 1.0
        self.autocast_dtype = autocast_dtype  # fp32 weights computing in bf16 (DDP on GPUs)

    @contextlib.contextmanager
    def sync(self, last: bool) -> Iterator[None]:
        yield

    def autocast(self):
        """The context of a forward pass: bf16 autocast over fp32 master weights, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.world.device.type, dtype=self.autocast_dtype)

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
        """Rank 0: every weight of the whole model, as trained (sharded backends gather them
        onto the CPU; the checkpoint writer casts and moves them); other ranks: None."""
        if self.world is not None and not self.world.is_main:
            return None
        return self.model.state_dict()

    def save_state(self, directory: str | Path) -> None:
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

    def load_state(self, directory: str | Path) -> None:
        """Reads what `save_state` wrote into this backend's model and optimizer. The world
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
    larger storage (torch.save writes a view's whole storage)."""
    if isinstance(tree, dict):
        return {k: _local_tensors(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_local_tensors(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        t = tree.to_local() if isinstance(tree, DTensor) else tree
        t = t.detach()
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


class DDPBackend(Backend):
    """Every rank holds the whole model; gradients are all-reduced once per step."""
    name = "DDP"

    def __init__(self, model: torch.nn.Module, world: World, args: TrainingArgs):
        device_ids = [world.device] if world.device.type == "cuda" else None
        module = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        super().__init__(model, build_optimizer(model, args), world, module, autocast_dtype(args, world.device))

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
    sharded_state = True

    def __init__(self, model: torch.nn.Module, world: World, args: TrainingArgs):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        ensure_process_group(world)
        options = args.fsdp_options
        strategy = options.sharding_strategy
        device_type = world.device.type
        shape = mesh_shape(strategy, world.world_size, world.local_world_size)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=("replicate", "shard")[-len(shape):])
        self.replicated = len(shape) == 2
        kwargs = {"mesh": mesh}
        if device_type == "cuda":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if options.cpu_offload_params:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device_type == "cuda")
        # Under several processes only rank 0 has read the weights; the others hold the model
        # on the meta device (worker.run). Rank 0's whole weights are sent out once sharded.
        on_meta = any(p.is_meta for p in model.parameters())
        full = model.state_dict() if world.distributed and world.is_main else {}
        # fully_shard moves each unit's shard to the mesh's device (or keeps it on the CPU
        # under offload): the model was loaded on the CPU, so a GPU never holds it whole.
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=strategy != ShardingStrategies.SHARD_GRAD_OP, **kwargs)
        # The root (embeddings, final norm, output layer) runs last in the forward pass and
        # first in the backward: freeing its parameters in between would only re-gather them.
        fully_shard(model, reshard_after_forward=False, **kwargs)
        if world.distributed:
            _broadcast_from_rank0(model, full, on_meta, world.device, offload=options.cpu_offload_params)
            log.info("FSDP2: rank 0 read the weights and sent each of %d processes its shards", world.world_size)
        del full
        log.info("FSDP2 %s over a %s mesh%s", strategy.value, shape,
                 ", parameters offloaded to the CPU" if options.cpu_offload_params else "")
        super().__init__(model, build_optimizer(model, args), world, model)

    def sync(self, last: bool):
        # Gradients are reduce-scattered in every backward, so each process accumulates only
        # its shard (holding whole gradients until the last micro-batch would cost a full
        # fp32 copy of them per process). The all-reduce across replicas (HYBRID_SHARD,
        # NO_SHARD) is what can wait for the last micro-batch.
        if self.replicated:
            self.module.set_requires_all_reduce(last)
        return contextlib.nullcontext()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.world.is_main else None


def _broadcast_from_rank0(model: torch.nn.Module, full: dict[str, torch.Tensor], on_meta: bool,
                          device: torch.device, offload: bool) -> None:
    """Every rank's shards from rank 0's whole weights (`full`, empty elsewhere). Buffers are
    not sharded and not all in the state dict (rotary frequencies are computed when the
    model is built, and are garbage on a rank that built it on the meta device): rank 0
    broadcasts each of them."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if on_meta:
        # Offloaded shards live on the CPU; buffers, like rank 0's, on the compute device.
        model.to_empty(device=CPU if offload else device)
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def mesh_shape(strategy: ShardingStrategies, world_size: int, per_node: int) -> tuple[int, ...]:
    """FSDP2's device mesh for a sharding strategy: 1-D (shard over every process) or 2-D
    (replicate x shard): HYBRID_SHARD shards within a node and replicates across nodes;
    NO_SHARD replicates everywhere (shards of size one)."""
    if strategy == ShardingStrategies.HYBRID_SHARD:
        return (world_size // per_node, per_node)
    if strategy == ShardingStrategies.NO_SHARD:
        return (world_size, 1)
    return (world_size,)


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
    return Backend(model, build_optimizer(model, args), world, autocast_dtype=autocast_dtype(args, world.device))
