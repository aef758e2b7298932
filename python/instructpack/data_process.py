"""Preprocessing through InstructLab's entry points: `data_process.main(DataProcessArgs(...))`
and `data_process.process_data(...)` turn a messages-format JSONL file into token shards (the
pipeline is data/preprocess.py). Nothing here imports torch."""

from __future__ import annotations

from .config import DataProcessArgs
from .data.preprocess import PreprocessResult, format_summary, preprocess
from .environment import trust_remote_code_from_env
from .hub import resolve_model_path

__all__ = ["PreprocessResult", "format_summary", "main", "process_data"]


def main(args: DataProcessArgs, progress: bool | None = None, shard_tokens: int | None = None) -> PreprocessResult:
    """Preprocesses `args.data_path` into `args.data_output_path`, or reuses a matching
    output already there. `progress`: a progress bar (default: when stderr is a terminal).
    `args` is checked as it is now (ConfigError names the field) and left unchanged."""
    args.validate()
    model_path = resolve_model_path(args.model_path, root="data_process_args",
                                    trust_remote_code=trust_remote_code_from_env())
    if model_path != args.model_path:
        args = args.model_copy(update={"model_path": model_path})
    return preprocess(args, progress=progress, shard_tokens=shard_tokens)


def process_data(data_path: str, data_output_path: str, max_seq_len: int, model_path: str, num_cpu_procs: int,
                 chat_tmpl_path: str | None = None) -> PreprocessResult:
    """InstructLab's other entry point, with its signature: `main` with these arguments."""
    return main(DataProcessArgs(data_path=data_path, data_output_path=data_output_path, max_seq_len=max_seq_len,
                                model_path=model_path, num_cpu_procs=num_cpu_procs, chat_tmpl_path=chat_tmpl_path))
