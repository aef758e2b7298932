"""Mixture-of-experts models (Qwen3-MoE, Mixtral, GraniteMoe, GPT-OSS, ...): what training
needs to know of them.

- The router's load-balancing loss (transformers' `aux_loss`, computed when the forward is
  asked for `output_router_logits`) is added with the model's own coefficient
  (`config.router_aux_loss_coef`), as the mean over the step's micro-batches of all ranks:
  outside the per-token scaling of the cross-entropy, so its weight does not change with
  how many tokens, micro-batches or ranks a step has (InstructLab adds it once per
  micro-batch, so its weight grows with the number of micro-batches, and without the
  coefficient).
- Router weights are frozen when `freeze_router` says so; by default for the architectures
  InstructLab freezes them for (GPT-OSS, GraniteMoeHybrid).
- The router's load: tokens routed to each expert, summed over the step on every rank;
  `max_expert_load` is the busiest expert's share over an even share (1.0 = balanced),
  the largest over layers.
"""

from __future__ import annotations

import logging
import re

import torch

log = logging.getLogger(__name__)

ROUTERS_FROZEN_BY_DEFAULT = frozenset({"gpt_oss", "granitemoehybrid"})
_ROUTER_PARAMETER = re.compile(r"(^|\.)(router|gate)(\.layer)?\.(weight|bias)$")


def num_experts(config) -> int:
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return 0


def is_moe(model: torch.nn.Module) -> bool:
    return num_experts(model.config) > 0


def experts_per_token(config) -> int:
    return int(getattr(config, "num_experts_per_tok", None) or getattr(config, "top_k", None) or 1)


def aux_coefficient(config) -> float:
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def freeze_routers(model: torch.nn.Module, freeze: bool | None) -> list[str]:
    """Freezes the router weights (freeze None: the architecture's default); their names."""
    if not is_moe(model):
        return []
    if freeze is None:
        freeze = model.config.model_type in ROUTERS_FROZEN_BY_DEFAULT
    if not freeze:
        return []
    frozen = [name for name, p in model.named_parameters() if _ROUTER_PARAMETER.search(name)]
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    if not frozen:
        raise ValueError(f"freeze_router: no router parameters found in {type(model).__name__}")
    log.info("froze %d router parameters (%s, ...)", len(frozen), frozen[0])
    return frozen


def expert_counts(router_logits: tuple[torch.Tensor, ...], top_k: int, experts: int) -> torch.Tensor:
    """[layers, experts] tokens routed to each expert (top_k per token) in one forward."""
    counts = []
    for logits in router_logits:
        chosen = logits.reshape(-1, logits.shape[-1]).topk(top_k, dim=-1).indices.flatten()
        counts.append(torch.bincount(chosen, minlength=experts))
    return torch.stack(counts).to(torch.float64)


def max_expert_load(counts: torch.Tensor) -> float:
    """The busiest expert's share over an even share, the largest over layers (1.0: balanced)."""
    totals = counts.sum(dim=1, keepdim=True).clamp(min=1)
    return float((counts / totals * counts.shape[1]).max())
