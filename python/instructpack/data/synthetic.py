"""Synthetic token datasets in the preprocessed format: random tokens of given lengths.

Used by `mock_data` training (throughput runs without a dataset) and by the benchmarks.
The output is written into `out` as preprocessing writes its output (data/writing.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import locks
from .manifest import Manifest, SyntheticInfo, TokenizerInfo
from .preprocess import PREPROCESS_LOCK, PREPROCESS_WAIT_S
from .shards import ShardSequenceWriter, TokenDataset, load_dataset, token_dtype_for
from .writing import dataset_write


def write_synthetic_dataset(out: str | Path, lengths: np.ndarray, vocab_size: int, *, seed: int = 0,
                            trained: str = "all") -> TokenDataset:
    """Samples of `lengths` tokens drawn uniformly from [0, vocab_size). `trained="all"`
    trains every token; `"runs"` alternates untrained and trained runs of 20-400 tokens,
    like prompts and answers."""
    if trained not in ("all", "runs"):
        raise ValueError(f"trained must be 'all' or 'runs', got {trained!r}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0 or lengths.min() < 1:
        raise ValueError("a synthetic dataset needs at least one sample, each at least 1 token long")
    out = Path(out)
    rng = np.random.default_rng(seed)
    total = int(lengths.sum())
    dtype = token_dtype_for(vocab_size)
    tokens = rng.integers(0, vocab_size, total, dtype=dtype)
    if trained == "all":
        mask = np.ones(total, np.uint8)
    else:
        runs = rng.integers(20, 400, total // 20 + 2)
        mask = (np.repeat(np.arange(len(runs)) % 2, runs)[:total]).astype(np.uint8)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    trained_counts = np.add.reduceat(mask.astype(np.int64), starts)

    with locks.exclusive(out / PREPROCESS_LOCK, locks.holder_note("writing a synthetic dataset"),
                         wait_s=PREPROCESS_WAIT_S), dataset_write(out) as write:
        writer = ShardSequenceWriter(write.directory, dtype, write.shard_name)
        writer.append(tokens, mask, lengths.astype(np.uint32), trained_counts.astype(np.uint32),
                      np.arange(1, len(lengths) + 1))
        write.commit(Manifest(shards=writer.close(), tokenizer=TokenizerInfo(vocab_size=vocab_size),
                              synthetic=SyntheticInfo(seed=seed, trained=trained)))
    return load_dataset(out)
