"""Console entry points. Argument parsing only: the work is in the library. Errors the library
raises on purpose (InstructPackError) are printed as one line and exit 2 (1 for a failed
training run); anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys


def _preprocess_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data-path", required=True, help="messages-format JSONL file")
    parser.add_argument("--data-output-path", required=True, help="directory to write the token shards to")
    parser.add_argument("--model-path", required=True, help="model or tokenizer directory (tokenizer.json)")
    parser.add_argument("--max-seq-len", type=int, required=True, help="drop samples longer than this (tokens)")
    parser.add_argument("--min-seq-len", type=int, default=0, help="drop samples shorter than this (0: off)")
    parser.add_argument("--chat-tmpl-path", default=None, help="Jinja chat template file (default: the tokenizer's)")
    parser.add_argument("--num-cpu-procs", type=int, default=16, help="worker processes (capped by the CPUs)")
    parser.add_argument("--skip-invalid-lines", action="store_true", help="skip bad input lines and report them")
    parser.add_argument("--overwrite", action="store_true", help="re-process even if matching output exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--pretraining-block-size", type=int, default=None, metavar="N",
                        help="the lines are documents for continual pretraining: cut them into blocks of N tokens")
    parser.add_argument("--document-column-name", default="document",
                        help="with --pretraining-block-size: the key holding each document's text")
    return parser


def _run_preprocess(ns: argparse.Namespace) -> int:
    from . import data_process
    from .config import DataProcessArgs, PretrainingConfig
    from .errors import InstructPackError

    try:
        args = DataProcessArgs(data_path=ns.data_path, data_output_path=ns.data_output_path,
                               model_path=ns.model_path, max_seq_len=ns.max_seq_len, min_seq_len=ns.min_seq_len,
                               chat_tmpl_path=ns.chat_tmpl_path, num_cpu_procs=ns.num_cpu_procs,
                               skip_invalid_lines=ns.skip_invalid_lines, overwrite=ns.overwrite,
                               pretraining=None if ns.pretraining_block_size is None else PretrainingConfig(
                                   block_size=ns.pretraining_block_size,
                                   document_column_name=ns.document_column_name))
        result = data_process.main(args, progress=False if ns.no_progress else None)
    except InstructPackError as e:
        print(f"instructpack-preprocess: error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    if result.invalid_examples:
        print("skipped lines (first ones):")
        for line in result.invalid_examples:
            print(f"  {line}")
    return 0


def _console_command(run):
    """Ctrl-C and a closed pipe (`... | head`) end a command quietly, with the usual exit
    codes (130, 141), instead of a traceback."""
    @functools.wraps(run)
    def command(argv: list[str] | None = None) -> int:
        try:
            code = run(argv)
            sys.stdout.flush()  # a closed pipe shows here, while it can still be handled
            # The work is done: a Ctrl-C now has nothing to stop, and landing in the
            # interpreter's exit it would print "Exception ignored" from whatever is being freed.
            with contextlib.suppress(ValueError):  # not the main thread: nothing to change
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            return code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # Python would flush stdout again at exit and print its own error: point it at nothing.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
    return command


@_console_command
def preprocess_main(argv: list[str] | None = None) -> int:
    """`instructpack-preprocess`: JSONL -> token shards. Does not import torch."""
    parser = _preprocess_parser(argparse.ArgumentParser(prog="instructpack-preprocess", description=__doc__))
    return _run_preprocess(parser.parse_args(argv))


def _plot_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("ckpt_output_dir", metavar="CKPT_OUTPUT_DIR",
                        help="the run's ckpt_output_dir (holding metrics.jsonl), or the metrics file")
    parser.add_argument("-o", "--output", default=None, help="PNG to write (default: CKPT_OUTPUT_DIR/metrics.png)")
    return parser


def _run_plot(ns: argparse.Namespace) -> int:
    from .errors import InstructPackError
    from .train.plot import plot_metrics

    try:
        path = plot_metrics(ns.ckpt_output_dir, ns.output)
    except InstructPackError as e:
        print(f"instructpack plot: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", metavar="CONFIG",
                        help="YAML, JSON or TOML file: TrainingArgs fields, or training_args + torchrun_args")
    return parser


EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request with the state saved; run again to resume


def _run_train(ns: argparse.Namespace) -> int:
    from .config import RunConfig, TorchrunArgs
    from .config_files import load_config
    from .errors import InstructPackError, TrainingError, TrainingStopped
    from .launch import run_training

    try:
        config = load_config(ns.config)
        torchrun_args, training_args = ((config.torchrun_args, config.training_args) if isinstance(config, RunConfig)
                                        else (TorchrunArgs(), config))
        run_training(torchrun_args, training_args)
    except TrainingStopped as e:  # preempted: a scheduler may requeue the job, which then resumes
        print(f"instructpack train: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except InstructPackError as e:
        print(f"instructpack train: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, TrainingError) else 2
    return 0


@_console_command
def main(argv: list[str] | None = None) -> int:
    """`instructpack <command>`."""
    parser = argparse.ArgumentParser(prog="instructpack")
    sub = parser.add_subparsers(dest="command", required=True)
    _preprocess_parser(sub.add_parser("preprocess", help="messages JSONL -> token shards"))
    _plot_parser(sub.add_parser("plot", help="metrics.jsonl -> PNG of loss, throughput and learning rate"))
    _train_parser(sub.add_parser("train", help="run_training from a config file"))
    ns = parser.parse_args(argv)
    if ns.command == "train":
        return _run_train(ns)
    if ns.command == "preprocess":
        return _run_preprocess(ns)
    if ns.command == "plot":
        return _run_plot(ns)
    return 2


if __name__ == "__main__":
    sys.exit(main())
