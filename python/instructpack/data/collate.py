"""Tensors for one micro-batch, gathered from the memory-mapped shards in one C++ call.

Packed (the default): one row of concatenated samples, `position_ids` restarting at 0 for
each sample and no attention mask, which transformers turns into a block-diagonal causal
mask (run the model with use_cache=False). Padded: one right-padded row per sample with an
attention mask, for models or kernels that cannot take packed rows.

Labels are shifted here, per sample: `shift_labels[t]` is the token position t must
predict, or -100. Pass them to a transformers model as `shift_labels=`; its own
ForCausalLM loss then uses them as they are. Shifting the packed row as a whole instead
would make each sample's last token predict the next sample's first token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from .sampler import MicroBatchRef
from .shards import TokenDataset

IGNORE_INDEX = -100


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [1, T] packed, [n, longest] padded; int64
    position_ids: torch.Tensor  # same shape; restart at 0 for every sample
    shift_labels: torch.Tensor  # same shape; the target of each position, or -100
    cu_seqlens: torch.Tensor  # [n + 1] int32 sample boundaries in the packed row
    max_seqlen: int
    attention_mask: torch.Tensor | None  # padded only: 1 on real tokens
    target_positions: torch.Tensor | None  # packed only: [num_targets] int64, positions with a target
    num_samples: int
    num_tokens: int  # real tokens, without padding
    num_targets: int  # positions with a target here
    step_targets: int  # positions with a target in the whole step, all ranks (-1 if unknown)
    epoch: int
    step: int
    index: int  # this micro-batch's position within the step
    count: int  # micro-batches per rank in this step

    @property
    def empty(self) -> bool:
        """A rank with nothing left in this micro-batch of the step still takes part in it
        (collectives must match) but contributes no tokens to the loss."""
        return self.num_samples == 0

    @property
    def last_in_step(self) -> bool:
        return self.index == self.count - 1

    def model_inputs(self, varlen: bool = False) -> dict:
        """Keyword arguments for a transformers causal LM forward pass (without labels).
        `varlen` (an attention that takes them: flash-attention, sdpa_packed): a packed row
        also passes its sample boundaries as transformers' variable-length keywords, so no
        layer derives them again from the position ids (a dozen host-device syncs per layer
        in transformers' flash path): `cu_seq_lens_q/k` (int32, where the row is) and
        `max_length_q/k` (Python ints)."""
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        elif varlen:
            inputs.update(cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                          max_length_q=self.max_seqlen, max_length_k=self.max_seqlen)
        return inputs

    def to(self, device, non_blocking: bool = False) -> MicroBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> MicroBatch:  # called by DataLoader(pin_memory=True)
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> MicroBatch:
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def collate_packed(dataset: TokenDataset, ref: MicroBatchRef) -> MicroBatch:
    input_ids, shift_labels, position_ids, cu_seqlens = dataset.gather(ref.sample_ids, shift_labels=True)
    if dataset.manifest.pretraining is not None:
        position_ids, cu_seqlens = document_positions(shift_labels)
    lengths = np.diff(cu_seqlens)
    return MicroBatch(
        input_ids=torch.from_numpy(input_ids).view(1, -1),
        position_ids=torch.from_numpy(position_ids).view(1, -1),
        shift_labels=torch.from_numpy(shift_labels).view(1, -1),
        cu_seqlens=torch.from_numpy(cu_seqlens),
        max_seqlen=int(lengths.max()) if len(lengths) else 0,
        attention_mask=None,
        # Found here, on the CPU (often in a loader worker), not on the GPU: the training
        # step computes logits only at these positions without a device sync to find them.
        target_positions=torch.from_numpy(np.flatnonzero(shift_labels != IGNORE_INDEX)),
        num_samples=len(ref.sample_ids),
        num_tokens=len(input_ids),
        num_targets=int(dataset.target_counts[ref.sample_ids].sum()),
        step_targets=ref.step_targets,
        epoch=ref.epoch, step=ref.step, index=ref.index, count=ref.count,
    )


def document_positions(shift_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions and boundaries of a packed row of pretraining blocks, restarting at every
    document (data/pretraining.py): a document's first token is never a target, so a
    position without a target is the end of a sample or of a document piece, and the next
    token starts a new piece. transformers finds the pieces from the position restarts and
    keeps each piece's attention to itself."""
    n = len(shift_labels)
    starts = np.concatenate([[0], np.flatnonzero(shift_labels[:-1] == IGNORE_INDEX) + 1]).astype(np.int64)
    index = np.arange(n, dtype=np.int64)
    positions = index - starts[np.searchsorted(starts, index, side="right") - 1]
    return positions, np.append(starts, n).astype(np.int32)


def collate_padded(dataset: TokenDataset, ref: MicroBatchRef, pad_token_id: int) -> MicroBatch:
    """Right padding to the longest sample of the micro-batch; pads have label -100 and
    attention mask 0. Plan with `padded=True` so the padded rows fit max_batch_len."""
    if dataset.manifest.pretraining is not None:
        raise ValueError("pretraining blocks are trained as packed rows only (their documents restart positions)")
    packed = collate_packed(dataset, ref)
    n, longest = packed.num_samples, packed.max_seqlen
    lengths = np.diff(packed.cu_seqlens.numpy())
    row = np.repeat(np.arange(n), lengths)
    col = packed.position_ids.numpy()[0]
    input_ids = np.full((n, longest), pad_token_id, np.int64)
    input_ids[row, col] = packed.input_ids.numpy()[0]
    shift_labels = np.full((n, longest), IGNORE_INDEX, np.int64)
    shift_labels[row, col] = packed.shift_labels.numpy()[0]
    attention_mask = np.zeros((n, longest), np.int64)
    attention_mask[row, col] = 1
    positions = np.broadcast_to(np.arange(longest, dtype=np.int64), (n, longest)).copy()
    return replace(packed, input_ids=torch.from_numpy(input_ids), shift_labels=torch.from_numpy(shift_labels),
                   position_ids=torch.from_numpy(positions), attention_mask=torch.from_numpy(attention_mask),
                   target_positions=None)
