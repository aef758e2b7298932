"""Typed wrappers over the C++ extension; the only module that imports `_C`.
Each function has a NumPy twin in kernels_ref.py that the tests compare against."""

from __future__ import annotations

import numpy as np

from . import _C

ShardError = _C.ShardError
Shard = _C.Shard
ShardSet = _C.ShardSet
ShardWriter = _C.ShardWriter


def label_mask(starts: np.ndarray, ends: np.ndarray, tok_begin: np.ndarray, span_starts: np.ndarray,
               span_ends: np.ndarray, span_begin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token trained mask (uint8) and per-sample trained counts (int64) from token
    character offsets and trained character spans, both in CSR layout over samples."""
    return _C.label_mask(starts, ends, tok_begin, span_starts, span_ends, span_begin)


def token_byte_offsets(ids: np.ndarray, tok_begin: np.ndarray, byte_len: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token byte offsets (starts, ends; restarting per sample) from ids and a per-id byte
    length table, plus each sample's total bytes (-1 where an id has no known length)."""
    return _C.token_byte_offsets(ids, tok_begin, byte_len)


def write_shard(path: str, tokens: np.ndarray, mask: np.ndarray, lengths: np.ndarray, trained: np.ndarray,
                source_lines: np.ndarray) -> int:
    """Writes one whole shard file (tokens uint16 or uint32) and returns its checksum."""
    writer = ShardWriter(str(path), tokens.dtype.itemsize)
    writer.append(tokens, mask, lengths.astype(np.uint32, copy=False), trained.astype(np.uint32, copy=False),
                  source_lines.astype(np.uint64, copy=False))
    return writer.close()


def checksum64(data) -> int:
    return _C.checksum64(data)


def gather(shards: ShardSet, ids: np.ndarray, shift_labels: bool = False
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Concatenates samples: (input_ids, labels, position_ids, cu_seqlens). Labels are the id
    where trained, -100 elsewhere; with `shift_labels` they are already shifted (labels[t] is
    the target of position t, -100 at each sample's last token)."""
    return shards.gather(np.ascontiguousarray(ids, dtype=np.int64), shift_labels)


def plan_epoch(lengths: np.ndarray, effective_batch_size: int, max_batch_len: int, world_size: int, seed: int,
               epoch: int, padded: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One epoch's multipack plan (csrc/packing.h): sample_ids, bin_begin, step_bin_begin, lower_bound."""
    return _C.plan_epoch(np.ascontiguousarray(lengths, dtype=np.int64), effective_batch_size, max_batch_len,
                         world_size, seed % 2**64, epoch % 2**64, padded)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return _C.epoch_permutation(num_samples, seed % 2**64, epoch % 2**64)
