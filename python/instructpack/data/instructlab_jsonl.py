"""A dataset InstructLab preprocessed (`data.jsonl` in its data_output_dir, one JSON object a
line with `input_ids`, `labels` and `len`), converted once into token shards beside it, so
that `process_data=False` trains what InstructLab made. data.jsonl itself is only read.

Labels are InstructLab's: -100 for an untrained token, else the token itself (the shift to
next-token targets happens in training, as in transformers). A label that is neither is an
error naming the line: it would mean the file is not what InstructLab writes.

The ids carry no record of the tokenizer that made them; the conversion takes the model's
(its fingerprint goes into the manifest, as preprocessing's does) and checks that every id
is one the tokenizer has. The dataset is converted again when data.jsonl changes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import numpy as np

from ..errors import InputError
from .chat import tokenizer_identity
from .manifest import Counts, ImportInfo, Manifest, SourceInfo, TokenizerInfo
from .preprocess import PreprocessResult, length_stats, write_dataset
from .shards import ShardSequenceWriter, token_dtype_for

INSTRUCTLAB_DATA = "data.jsonl"
FORMAT = "instructlab data.jsonl"
CHUNK_LINES = 4096
IGNORE = -100


class _Sample(msgspec.Struct):
    input_ids: list[int]
    labels: list[int]
    len: int | None = None


def has_instructlab_data(directory: Path) -> bool:
    return (directory / INSTRUCTLAB_DATA).is_file()


def import_instructlab_data(directory: str | Path, model_path: str) -> PreprocessResult:
    """The shards of `directory`/data.jsonl, written beside it (or reused when they were made
    from this very file with this tokenizer)."""
    directory = Path(directory)
    source = directory / INSTRUCTLAB_DATA
    tokenizer = tokenizer_identity(model_path)
    with open(source, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    fingerprint = hashlib.sha256(f"{FORMAT}\n{sha256}\n{tokenizer.fingerprint}".encode()).hexdigest()
    def make(write):
        token_dtype = token_dtype_for(tokenizer.vocab_size)
        writer = ShardSequenceWriter(write.directory, token_dtype, write.shard_name)
        lines, trained_tokens, lengths_seen = 0, 0, []
        for tokens, mask, lengths, trained, source_lines in _chunks(source, tokenizer.vocab_size, token_dtype):
            writer.append(tokens, mask, lengths, trained, source_lines)
            lengths_seen.append(lengths)
            lines += len(lengths)
            trained_tokens += int(trained.sum())
        if not lines:
            raise InputError(str(source), None, "holds no sample; preprocess the data again "
                             "(process_data=True with data_path)")
        lengths = np.concatenate(lengths_seen)
        return Manifest(
            shards=writer.close(),
            tokenizer=TokenizerInfo(path=str(Path(model_path).resolve()), fingerprint=tokenizer.fingerprint,
                                    vocab_size=tokenizer.vocab_size, token_dtype=token_dtype.name),
            source=SourceInfo(path=str(source.resolve()), lines=lines, sha256=sha256),
            counts=Counts(samples=lines, tokens=int(lengths.sum()), trained_tokens=trained_tokens, dropped={},
                          invalid_lines=0, invalid_reasons={}),
            lengths=length_stats(lengths),
            imported=ImportInfo(format=FORMAT),
        ), []

    return write_dataset(directory, fingerprint, False, f"converting {source}", make)


def _chunks(source: Path, vocab_size: int, token_dtype: np.dtype):
    """(tokens, mask, lengths, trained, source_lines) of CHUNK_LINES samples at a time."""
    decoder = msgspec.json.Decoder(_Sample)
    batch: list[tuple[int, _Sample]] = []
    with open(source, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                sample = decoder.decode(line)
            except msgspec.DecodeError as e:
                raise InputError(str(source), number, f"not a sample of InstructLab's data.jsonl ({e}); each line "
                                 "holds input_ids and labels, lists of token ids") from None
            batch.append((number, _checked(sample, source, number, vocab_size)))
            if len(batch) == CHUNK_LINES:
                yield _arrays(batch, token_dtype)
                batch = []
    if batch:
        yield _arrays(batch, token_dtype)


def _checked(sample: _Sample, source: Path, number: int, vocab_size: int) -> _Sample:
    def fail(problem: str):
        raise InputError(str(source), number, f"{problem}; this is not the data.jsonl InstructLab writes: "
                         "preprocess the data again (process_data=True with data_path)")

    ids, labels = sample.input_ids, sample.labels
    if not ids:
        fail("input_ids is empty")
    if len(labels) != len(ids):
        fail(f"{len(labels)} labels for {len(ids)} input_ids")
    if sample.len is not None and sample.len != len(ids):
        fail(f"len is {sample.len}, but there are {len(ids)} input_ids")
    if min(ids) < 0 or max(ids) >= vocab_size:
        fail(f"token id {max(ids) if max(ids) >= vocab_size else min(ids)} is not one of the model's "
             f"{vocab_size} (was it made for another model?)")
    if any(label != IGNORE and label != token for label, token in zip(labels, ids)):
        fail("a label is neither -100 nor the token at its position")
    return sample


def _arrays(batch: list[tuple[int, _Sample]], token_dtype: np.dtype):
    tokens = np.fromiter((t for _, s in batch for t in s.input_ids), dtype=token_dtype)
    mask = np.fromiter((label != IGNORE for _, s in batch for label in s.labels), dtype=np.uint8, count=len(tokens))
    lengths = np.array([len(s.input_ids) for _, s in batch], dtype=np.uint32)
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]])
    trained = np.add.reduceat(mask.astype(np.int64), starts).astype(np.uint32)
    source_lines = np.array([number for number, _ in batch], dtype=np.uint64)
    return tokens, mask, lengths, trained, source_lines
