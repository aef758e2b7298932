"""One optimizer step over this rank's micro-batches: the training math in one place.

The loss of a step is the cross-entropy summed over every trained token of every
micro-batch on every rank, divided by the number of trained tokens in the whole step
(`Step.targets`, known from the plan before the step starts). Each micro-batch
contributes its own sum divided by that one denominator, so the accumulated gradient is
the same however the step was split into micro-batches or ranks.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..callbacks import CallbackRunner
from ..data.collate import IGNORE_INDEX, MicroBatch
from ..data.loader import Step
from . import chunked_loss
from .backends import Backend
from .chunked_loss import chunked_linear_cross_entropy, logit_finish
from .distributed import World, all_reduce
from .model import attention, moe
from .model.layers import hf_model
from .model.liger import has_fused_loss
from .optim import MAX_GRAD_NORM

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """This rank's share of one step; `all_reduce_step` sums it over ranks."""
    loss_sum: float  # cross-entropy summed over this rank's targets
    targets: int  # trained target tokens on this rank
    tokens: int  # real (non-padding) tokens on this rank
    samples: int
    micro_batches: int
    grad_norm: float  # of the whole model, after synchronisation, before clipping
    lr: float
    seconds: float
    # Mixture-of-experts: this rank's share of the step's router loss (coefficient included;
    # summed over ranks it is the step's), and the tokens routed to each expert.
    router_aux_loss: float | None = None
    expert_counts: torch.Tensor | None = None


@dataclass
class ForwardLoss:
    summed: torch.Tensor  # cross-entropy summed over the micro-batch's targets
    router_aux: torch.Tensor | None = None  # mixture-of-experts: the load-balancing loss (no coefficient)
    expert_counts: torch.Tensor | None = None  # [layers, experts] tokens routed to each expert


def summed_loss(model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
    """Cross-entropy summed over the micro-batch's targets (fp32 logits, like transformers)."""
    return forward_loss(model, mb).summed


def forward_loss(model: torch.nn.Module, mb: MicroBatch, router: bool = False) -> ForwardLoss:
    """The micro-batch's summed cross-entropy; with `router` (mixture-of-experts models),
    also the router's load-balancing loss and load (moe.py).

    Logits are computed only where there is a target: the output layer then skips the
    prompt tokens (often half of a row), and the fp32 logits, tokens x vocabulary, are the
    largest activation of a step. transformers applies the model's own final scaling or
    soft-capping to the kept positions as to any other."""
    inputs = mb.model_inputs(varlen=takes_varlen(model))
    if has_fused_loss(hf_model(model)):  # Liger: the model's own forward computes it, without the logits
        one = torch.ones((), dtype=torch.long, device=mb.input_ids.device)
        return ForwardLoss(model(**inputs, use_cache=False, labels=mb.shift_labels, shift_labels=mb.shift_labels,
                                 num_items_in_batch=one).loss.float())
    keep = _target_positions(mb) if _accepts_logits_to_keep(type(hf_model(model))) else None
    extra = {"output_router_logits": True} if router else {}
    # The one-time check runs on every rank's first micro-batch whatever its size (before the
    # size test), so that all ranks run its forward passes together.
    if keep is not None and keep.dtype != torch.bool and _chunks_output_layer(model, mb) \
            and len(keep) * hf_model(model).get_output_embeddings().weight.shape[0] > chunked_loss.CHUNK_LOGITS:
        # The output layer's loss in chunks of tokens (chunked_loss.py): the model runs
        # without computing any logits, and its decoder's output goes to the chunked loss.
        with _decoder_output(hf_model(model)) as hidden:
            out = model(**inputs, use_cache=False, logits_to_keep=keep[:0], **extra)
        head = hf_model(model).get_output_embeddings()
        summed = chunked_linear_cross_entropy(hidden[0][0, keep], head.weight, mb.shift_labels[0, keep],
                                              bias=head.bias, finish=logit_finish(hf_model(model).config))
        return _with_router(model, summed, out, router)
    if keep is None:
        out = model(**inputs, use_cache=False, **extra)
        logits, labels = out.logits, mb.shift_labels
    else:
        out = model(**inputs, use_cache=False, logits_to_keep=keep, **extra)
        logits = out.logits
        labels = mb.shift_labels[:, keep] if keep.dtype != torch.bool else mb.shift_labels[keep]
    summed = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
    return _with_router(model, summed, out, router)


VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", attention.NAME, attention.EAGER_NAME)


def takes_varlen(model: torch.nn.Module) -> bool:
    """Whether `model`'s attention reads the packed row's boundaries from transformers'
    variable-length keywords (MicroBatch.model_inputs): flash-attention and our packed
    attentions do; anything else (a model's own code) gets the row as before."""
    return getattr(hf_model(model).config, "_attn_implementation", None) in VARLEN_ATTENTION


def _with_router(model: torch.nn.Module, summed: torch.Tensor, out, router: bool) -> ForwardLoss:
    if not router:
        return ForwardLoss(summed)
    config = hf_model(model).config
    counts = moe.expert_counts(out.router_logits, moe.experts_per_token(config), moe.num_experts(config))
    return ForwardLoss(summed, out.aux_loss.float(), counts)


@contextlib.contextmanager
def _decoder_output(model: torch.nn.Module):
    """A list that receives the last hidden state of `model`'s decoder during the block."""
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = model.get_decoder().register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


_CHUNKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transformers model -> chunked loss fits it


def _chunks_output_layer(model: torch.nn.Module, mb: MicroBatch) -> bool:
    """Whether the output layer's loss can be chunked for this model: an output layer whose
    weight is there after the forward pass (not DeepSpeed ZeRO-3, which partitions it), and
    the logits it gives through logit_finish equal the model's own on the first micro-batch's
    first tokens (so a model that transforms its logits otherwise keeps the plain path)."""
    hf = hf_model(model)
    if hf in _CHUNKED:
        return _CHUNKED[hf]
    head = hf.get_output_embeddings()
    ok = head is not None and isinstance(getattr(head, "weight", None), torch.Tensor) \
        and not hasattr(head.weight, "ds_id")
    if ok:  # every rank runs the same forward passes here: collectives stay matched
        n = min(mb.input_ids.shape[1], 32)
        probe = {"input_ids": mb.input_ids[:, :n], "position_ids": mb.position_ids[:, :n]}
        # The probe draws no random numbers for the run (dropout in a resumed run must follow
        # the same stream as in one never stopped), and both passes draw the same dropout.
        device = mb.input_ids.device
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            state = _rng_state(device)
            logits = model(**probe, use_cache=False).logits[0].float()
            _rng_state(device, state)
            with _decoder_output(hf) as hidden:
                model(**probe, use_cache=False, logits_to_keep=torch.zeros(0, dtype=torch.long,
                                                                           device=mb.input_ids.device))
            ours = F.linear(hidden[0][0], head.weight, head.bias)
            finish = logit_finish(hf.config)
            ours = (finish(ours) if finish is not None else ours).float()
        ok = torch.allclose(ours, logits, rtol=1e-2 if ours.dtype != logits.dtype else 1e-3, atol=1e-3)
        if ok:
            vocab = head.weight.shape[0]
            log.info("output layer loss: in chunks of %d tokens when a micro-batch has more than %d target "
                     "logits", chunked_loss.default_chunk(vocab), chunked_loss.CHUNK_LOGITS)
        else:
            log.warning("%s transforms its logits in a way the chunked loss does not know: the loss holds all "
                        "target logits at once for this model", type(hf).__name__)
    _CHUNKED[hf] = ok
    return ok


def _rng_state(device: torch.device, state=None):
    """The random generator state that dropout on `device` draws from; with `state`, restored."""
    cuda = device.type == "cuda"
    if state is None:
        return torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state()
    if cuda:
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
    return state


def _target_positions(mb: MicroBatch) -> torch.Tensor | None:
    """Indices of the positions with a target in a packed row (found by the collator); a
    boolean mask for padded rows where transformers takes one (5.x), else None (all)."""
    if mb.target_positions is not None:
        return mb.target_positions
    return mb.shift_labels != IGNORE_INDEX if _BOOLEAN_KEEP else None


@functools.cache
def _accepts_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


try:  # transformers >= 5 keeps a per-row boolean mask of positions (flattened output)
    from transformers.modeling_utils import slice_logits_to_keep as _  # noqa: F401
    _BOOLEAN_KEEP = True
except ImportError:
    _BOOLEAN_KEEP = False


def stand_in(mb: MicroBatch, device: torch.device) -> MicroBatch:
    """An empty micro-batch (this rank has no samples left in it) still has to run forward
    and backward, because DDP/FSDP collectives must match on every rank. One token with no
    target gives a zero loss and zero gradients through the same graph."""
    one = torch.zeros((1, 1), dtype=torch.long, device=device)
    return MicroBatch(input_ids=one, position_ids=one, shift_labels=torch.full_like(one, IGNORE_INDEX),
                      cu_seqlens=torch.tensor([0, 1], dtype=torch.int32, device=device), max_seqlen=1,
                      attention_mask=None, target_positions=torch.zeros(0, dtype=torch.long, device=device),
                      num_samples=0, num_tokens=0, num_targets=0,
                      step_targets=mb.step_targets, epoch=mb.epoch, step=mb.step, index=mb.index, count=mb.count)


def run_step(backend: Backend, step: Step, scheduler: torch.optim.lr_scheduler.LRScheduler | None, *,
             device: torch.device, max_grad_norm: float = MAX_GRAD_NORM, hooks: CallbackRunner | None = None,
             world: World | None = None) -> StepResult:
    """Forward and backward over the step's micro-batches, then clip and update.

    Every backend averages gradients over ranks, while the step loss is already normalised
    by the step-wide target count, so each loss is multiplied by `backend.grad_scale` (the
    world size) to turn the average back into the sum. `hooks`: the callbacks' per
    micro-batch and optimizer hooks (`world` then gives the step's loss over all ranks to
    on_pre_optimizer_step, as InstructLab does).
    """
    start = time.perf_counter()
    denominator = max(step.targets, 1)  # a step with no targets at all updates nothing
    loss_sum = torch.zeros((), device=device)  # a tensor: no device sync per micro-batch
    targets, tokens, samples = 0, 0, 0
    last = len(step.micro_batches) - 1
    config = hf_model(backend.module).config
    router = moe.num_experts(config) > 0
    if router:
        # The router loss is the mean over the step's non-empty micro-batches of all ranks.
        local = float(sum(not mb.empty for mb in step.micro_batches))
        (routed,) = all_reduce([local], world) if world is not None else [local]
        router_weight = moe.aux_coefficient(config) * backend.grad_scale / max(routed, 1.0)
        aux_sum, counts = torch.zeros((), device=device), None
    for i, mb in enumerate(step.micro_batches):
        empty = mb.empty
        mb = stand_in(mb, device) if empty else mb.to(device, non_blocking=True)
        if hooks is not None:
            hooks.fire("on_before_forward")
        with backend.sync(last=i == last):  # what can wait for the step's last backward waits
            with backend.autocast():
                out = forward_loss(backend.module, mb, router=router)
            loss = out.summed
            total = loss * (backend.grad_scale / denominator)
            if router:  # a stand-in micro-batch counts for nothing, but every rank has counts to sum
                if not empty:
                    total = total + out.router_aux * router_weight
                    aux_sum += out.router_aux.detach() * (router_weight / backend.grad_scale)
                routed_here = out.expert_counts * (not empty)
                counts = routed_here if counts is None else counts + routed_here
            backend.backward(total)
        if hooks is not None:
            hooks.fire("on_after_backward")
        loss_sum += loss.detach()
        targets += mb.num_targets
        tokens += mb.num_tokens
        samples += mb.num_samples
    lr = backend.lr
    if hooks is not None and hooks.wants("on_pre_optimizer_step"):
        # Every rank has the same callbacks, so every rank joins this collective.
        (total,) = all_reduce([loss_sum.item()], world) if world is not None else [loss_sum.item()]
        hooks.fire("on_pre_optimizer_step", loss=total / denominator, learning_rate=lr)
    grad_norm = backend.step(max_grad_norm)
    if scheduler is not None:
        scheduler.step()
    if hooks is not None:
        hooks.fire("on_optimizer_step", learning_rate=lr, grad_norm=grad_norm)
    result = StepResult(loss_sum=loss_sum.item(), targets=targets, tokens=tokens, samples=samples,
                        micro_batches=len(step.micro_batches), grad_norm=grad_norm, lr=lr,
                        seconds=time.perf_counter() - start)
    if router:
        result.router_aux_loss, result.expert_counts = aux_sum.item(), counts
    return result
