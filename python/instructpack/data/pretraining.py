"""Continual pretraining data: JSONL lines of {"document": text} (the key is
`document_column_name`) turned into blocks of `block_size` tokens, in the shard format of
chat data, for the same planner and loader.

Each document is tokenized as InstructLab tokenizes it (the tokenizer's own special tokens,
so BOS where the tokenizer adds one, and EOS appended unless it is there already), the
documents are concatenated in input order, and the stream is cut into blocks of
`block_size` tokens (the last one may be shorter; nothing is padded). Every token is
trained except the first of each document: a block is trained as if each of its document
pieces were a sample of its own. The collator restarts positions at those tokens, and
packed attention keeps each piece to itself, so no document attends to another (InstructLab
lets a block's documents attend across their boundaries and predicts one's first token
from the one before it).

No torch here: `instructpack-preprocess --pretraining-block-size N` runs it on any machine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np

from ..config import DataProcessArgs, PretrainingConfig
from ..errors import ConfigError, InputError
from .chat import tokenizer_identity
from .manifest import Counts, Manifest, PretrainingInfo, SourceInfo, TokenizerInfo
from .shards import ShardSequenceWriter, token_dtype_for

CHUNK_LINES = 2048
FORMAT_VERSION = 1


def preprocess_documents(args: DataProcessArgs, pretraining: PretrainingConfig, progress: bool | None = None):
    """Preprocesses `args.data_path` (documents) into `args.data_output_path`, or reuses a
    matching output already there. Returns a preprocess.PreprocessResult."""
    from .preprocess import check_paths, length_stats, write_dataset

    pretraining.validate()
    data_path, out = check_paths(args)
    identity = tokenizer_identity(args.model_path)
    tokenizer = _tokenizer(args.model_path)
    with open(data_path, "rb") as f:
        input_sha = hashlib.file_digest(f, "sha256").hexdigest()
    fingerprint = hashlib.sha256("\0".join(map(str, (
        "pretraining", FORMAT_VERSION, input_sha, identity.fingerprint, pretraining.block_size,
        pretraining.document_column_name, args.skip_invalid_lines))).encode()).hexdigest()[:24]

    def make(write):
        token_dtype = token_dtype_for(identity.vocab_size)
        writer = ShardSequenceWriter(write.directory, token_dtype, write.shard_name)
        stats = {"lines": 0, "documents": 0, "empty": 0, "invalid": 0, "tokens": 0, "trained": 0}
        lengths_seen, invalid_examples = [], []
        for block in _blocks(data_path, tokenizer, pretraining, args.skip_invalid_lines, stats,
                             invalid_examples):
            tokens, mask, lengths, trained, lines = block
            writer.append(tokens.astype(token_dtype), mask, lengths, trained, lines)
            lengths_seen.append(lengths)
            stats["tokens"] += int(lengths.sum())
            stats["trained"] += int(trained.sum())
        if not lengths_seen:
            raise InputError(str(data_path), None, f"no document with text under "
                             f"{pretraining.document_column_name!r} ({stats['empty']} empty)")
        lengths = np.concatenate(lengths_seen)
        manifest = Manifest(
            shards=writer.close(),
            tokenizer=TokenizerInfo(path=str(Path(args.model_path).resolve()),
                                    fingerprint=identity.fingerprint, vocab_size=identity.vocab_size,
                                    token_dtype=token_dtype.name),
            source=SourceInfo(path=str(data_path.resolve()), lines=stats["lines"], sha256=input_sha),
            counts=Counts(samples=len(lengths), tokens=stats["tokens"], trained_tokens=stats["trained"],
                          dropped={"empty_document": stats["empty"]}, invalid_lines=stats["invalid"],
                          invalid_reasons={"not_a_document": stats["invalid"]} if stats["invalid"] else {}),
            lengths=length_stats(lengths),
            pretraining=PretrainingInfo(block_size=pretraining.block_size,
                                        document_column_name=pretraining.document_column_name,
                                        documents=stats["documents"]),
        )
        return manifest, invalid_examples

    return write_dataset(out, fingerprint, args.overwrite, f"preprocessing of {data_path}", make)


class _Tokenizer:
    """InstructLab's encoding of a document: the tokenizer's special tokens, then EOS."""

    def __init__(self, hf):
        self.hf = hf
        self.eos = hf.eos_token_id

    def encode(self, texts: list[str]) -> list[list[int]]:
        encoded = self.hf(texts, add_special_tokens=True)["input_ids"]
        return [ids if ids and ids[-1] == self.eos else ids + [self.eos] for ids in encoded]


def _tokenizer(model_path: str) -> _Tokenizer:
    from transformers.tokenization_utils_fast import PreTrainedTokenizerFast  # no torch, unlike AutoTokenizer

    hf = PreTrainedTokenizerFast.from_pretrained(str(model_path))
    if hf.eos_token_id is None:
        raise ConfigError("", ("model_path",), "the tokenizer has no eos_token, which ends every document in "
                          "pretraining data; set eos_token in tokenizer_config.json", str(model_path))
    return _Tokenizer(hf)


def _documents(data_path: Path, column: str, skip_invalid: bool, stats: dict, invalid_examples: list
               ) -> Iterator[list[tuple[int, str]]]:
    """(line number, text) of the documents, CHUNK_LINES lines at a time."""
    chunk = []
    with open(data_path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            stats["lines"] = number
            if not raw.strip():
                continue
            text, problem = None, None
            try:
                value = msgspec.json.decode(raw)
            except msgspec.DecodeError as e:
                problem = f"malformed JSON ({e})"
            else:
                if not isinstance(value, dict) or column not in value:
                    problem = f"no {column!r} key (pretraining lines are {{{json.dumps(column)}: text}})"
                elif not isinstance(value[column], str):
                    problem = f"{column!r} is not a string"
                else:
                    text = value[column]
            if problem is not None:
                if not skip_invalid:
                    raise InputError(str(data_path), number, problem + " (fix the line, or set skip_invalid_lines "
                                     "to skip bad lines and report them)")
                stats["invalid"] += 1
                if len(invalid_examples) < 20:
                    invalid_examples.append(f"{data_path}:{number}: {problem}")
                continue
            if not text:
                stats["empty"] += 1
                continue
            chunk.append((number, text))
            if len(chunk) == CHUNK_LINES:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _blocks(data_path: Path, tokenizer: _Tokenizer, pretraining: PretrainingConfig, skip_invalid: bool,
            stats: dict, invalid_examples: list):
    """(tokens, mask, lengths, trained, source_lines) of whole blocks, then of the last part."""
    size = pretraining.block_size
    pending_tokens = np.zeros(0, np.int64)
    pending_mask = np.zeros(0, np.uint8)
    pending_lines = np.zeros(0, np.uint64)  # per token: the line of its document
    for chunk in _documents(data_path, pretraining.document_column_name, skip_invalid, stats, invalid_examples):
        encoded = tokenizer.encode([text for _, text in chunk])
        stats["documents"] += len(encoded)
        doc_lengths = np.array([len(ids) for ids in encoded], np.int64)
        tokens = np.fromiter((t for ids in encoded for t in ids), np.int64, count=int(doc_lengths.sum()))
        mask = np.ones(len(tokens), np.uint8)
        mask[np.concatenate([[0], np.cumsum(doc_lengths)[:-1]])] = 0  # a document's first token is no target
        lines = np.repeat(np.array([number for number, _ in chunk], np.uint64), doc_lengths)
        pending_tokens = np.concatenate([pending_tokens, tokens])
        pending_mask = np.concatenate([pending_mask, mask])
        pending_lines = np.concatenate([pending_lines, lines])
        full = len(pending_tokens) // size * size
        if full:
            yield _as_blocks(pending_tokens[:full], pending_mask[:full], pending_lines[:full], size)
            pending_tokens, pending_mask, pending_lines = (
                pending_tokens[full:], pending_mask[full:], pending_lines[full:])
    if len(pending_tokens):
        yield _as_blocks(pending_tokens, pending_mask, pending_lines, size)


def _as_blocks(tokens: np.ndarray, mask: np.ndarray, lines: np.ndarray, size: int):
    starts = np.arange(0, len(tokens), size)
    lengths = np.diff(np.append(starts, len(tokens))).astype(np.uint32)
    trained = np.add.reduceat(mask.astype(np.int64), starts).astype(np.uint32)
    return tokens, mask, lengths, trained, lines[starts]
