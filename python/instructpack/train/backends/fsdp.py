"""PyTorch FSDP2 (`fully_shard`) as a backend: each decoder layer is one unit of sharding
and communication; the root holds the rest (embeddings, final norm, output layer)."""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from ...config import ShardingStrategies, TrainingArgs
from ..distributed import World, ensure_process_group
from ..model.layers import decoder_layers
from ..optim import build_optimizer
from ..precision import Precision, decide_precision
from .base import CPU, Backend

log = logging.getLogger(__name__)


class FSDPBackend(Backend):
    """Sharding strategies:
    - FULL_SHARD: parameters sharded over all ranks, re-sharded after each layer's forward
      and gathered again for its backward (ZeRO-3);
    - SHARD_GRAD_OP: sharded, but kept gathered from forward to backward (ZeRO-2-like:
      less communication, more memory);
    - HYBRID_SHARD: a 2-D mesh (nodes x processes per node), sharded within a node and
      replicated across nodes, so only gradient all-reduces cross the slower network;
    - NO_SHARD: the same 2-D mesh with shards of size one: every rank holds everything and
      gradients are all-reduced (plain replication).
    With mixed precision (GPUs, train/precision.py), layers compute in bf16 while the
    optimizer keeps fp32 master weights, and gradients are reduced in fp32.
    """
    name = "FSDP2"
    sharded_state = True

    def __init__(self, model: torch.nn.Module, world: World, args: TrainingArgs, precision: Precision | None = None):
        ensure_process_group(world)
        precision = precision or decide_precision(args, world.device)
        options = args.fsdp_options
        strategy = options.sharding_strategy
        device_type = world.device.type
        shape = mesh_shape(strategy, world.world_size, world.local_world_size)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=("replicate", "shard")[-len(shape):])
        self.replicated = len(shape) == 2
        kwargs = {"mesh": mesh}
        if precision.mixed:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=precision.compute, reduce_dtype=precision.reduce)
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
        super().__init__(model, build_optimizer(model, args), world, model, precision)

    def sync(self, last: bool):
        # Gradients are reduce-scattered in every backward, so each process accumulates only
        # its shard (holding whole gradients until the last micro-batch would cost a full
        # fp32 copy of them per process). The all-reduce across replicas (HYBRID_SHARD,
        # NO_SHARD) is what can wait for the last micro-batch.
        if self.replicated:
            self.module.set_requires_all_reduce(last)
        return contextlib.nullcontext()

    def gather_weights(self) -> dict[str, torch.Tensor] | None:
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.world.is_main else None


def _broadcast_from_rank0(model: torch.nn.Module, full: dict[str, torch.Tensor], on_meta: bool,
                          device: torch.device, offload: bool) -> None:
    """Every rank's shards from rank 0's whole weights (`full`, empty elsewhere). Buffers are
    not sharded and not all in the state dict (rotary frequencies are computed when the
    model is built, and are garbage on a rank that built it on the meta device): rank 0
    broadcasts each of them."""
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
