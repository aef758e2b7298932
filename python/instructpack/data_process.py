"""Preprocessing through InstructLab's entry point: `data_process.main(DataProcessArgs(...))`
turns a messages-format JSONL file into token shards (the pipeline is data/preprocess.py).
Nothing here imports torch."""

from __future__ import annotations

from .config import DataProcessArgs
from .data.preprocess import PreprocessResult, format_summary, preprocess

__all__ = ["PreprocessResult", "format_summary", "main"]


def main(args: DataProcessArgs, progress: bool | None = None, shard_tokens: int | None = None) -> PreprocessResult:
    """Preprocesses `args.data_path` into `args.data_output_path`, or reuses a matching
    output already there. `progress`: a progress bar (default: when stderr is a terminal)."""
    return preprocess(args, progress=progress, shard_tokens=shard_tokens)
