"""The dataset the workers read: preprocessed now from data_path (or reused), given as it
is in data_output_dir (process_data=False; InstructLab's data.jsonl there is converted
once), or random tokens (mock_data). Checked here, in
the launcher, so that bad data fails before any worker starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import DataProcessArgs, TrainingArgs
from ..data.instructlab_jsonl import has_instructlab_data, import_instructlab_data
from ..data.manifest import MANIFEST, read_manifest
from ..data.preprocess import PreprocessPlan, plan_preprocessing, preprocess, run_preprocessing
from ..data.sampler import check_plan_settings
from ..data.shards import load_dataset
from ..data.synthetic import write_synthetic_dataset
from ..data.tokenizer_check import check_dataset_matches_model
from ..data.validation import make_split
from ..errors import ConfigError, ResumeError
from ..train.checkpoints.identity import TrainerState

MOCK_STEPS = 8  # mock_data: this many steps of effective_batch_size samples per epoch


def prepare_dataset(args: TrainingArgs, world_size: int = 1,
                    resuming: tuple[Path | None, TrainerState | None] = (None, None)) -> Path:
    """The directory of the dataset to train, checked against the model and the planner.
    `resuming`: the full state the run will resume; preprocessing that would make another
    dataset than it trained is refused before it writes anything."""
    # Every byte of a dataset that was on the disk before is checked against the manifest's
    # checksums (a damaged shard fails before launch, naming the file), and a dataset given
    # as it is, against the model's tokenizer. What preprocessing writes or reuses now was
    # made with this tokenizer and template (they are part of its reuse fingerprint), and
    # what it has just written was checksummed as it was written.
    result = None
    if args.mock_data:
        path = _mock_dataset(args)
    elif args.process_data and args.pretraining_config is not None:
        blocks = args.pretraining_config.block_size
        if blocks > args.max_batch_len:
            raise ConfigError("training_args", ("pretraining_config", "block_size"), f"a block must fit one "
                              f"micro-batch: raise max_batch_len to at least {blocks}, or lower block_size", blocks)
        result = preprocess(_data_process_args(args))
    elif args.process_data:
        plan = plan_preprocessing(_data_process_args(args))
        _check_resumed_data(plan, *resuming)
        result = run_preprocessing(plan)
    elif _instructlab_data_to_import(Path(args.data_output_dir)):
        result = import_instructlab_data(args.data_output_dir, args.model_path)
    else:
        path = Path(args.data_output_dir)
    just_written = result is not None and not result.reused
    if result is not None:
        print(result.summary(), flush=True)
        path = result.output_path
    dataset = load_dataset(path, verify=not just_written)  # DatasetError names the file and the fix
    if not args.process_data or args.mock_data:
        check_dataset_matches_model(path, args.model_path, args.chat_tmpl_path)
    if not args.process_data and not args.mock_data and not args.allow_longer_samples:
        longer = int((dataset.lengths > args.max_seq_len).sum())
        if longer:
            raise ConfigError("training_args", ("max_seq_len",), f"the dataset {path} was made with max_seq_len "
                              f"{dataset.manifest.settings.max_seq_len if dataset.manifest.settings else '?'} and "
                              f"holds {longer} samples longer than this run's (the longest: "
                              f"{int(dataset.lengths.max())} tokens): preprocess again with this max_seq_len "
                              "(process_data=True), or set allow_longer_samples=True to train them",
                              args.max_seq_len)
    # Planning settings are checked now (a sample longer than max_batch_len...) rather than
    # in every worker after the model has loaded, on the samples that train.
    lengths = dataset.lengths
    if args.validation_split > 0:
        split = make_split(path, dataset.manifest, len(dataset), args.validation_split, args.random_seed)
        if len(split.validation) < world_size:
            raise ConfigError("training_args", ("validation_split",), f"holds out {len(split.validation)} "
                              f"samples, fewer than the {world_size} processes, which each compute the loss of "
                              "some: raise it", args.validation_split)
        check_plan_settings(lengths[split.validation], effective_batch_size=len(split.validation),
                            max_batch_len=args.max_batch_len, world_size=world_size)
        lengths = lengths[split.train]
    check_plan_settings(lengths, effective_batch_size=args.effective_batch_size,
                        max_batch_len=args.max_batch_len, world_size=world_size)
    return path


def _data_process_args(args: TrainingArgs) -> DataProcessArgs:
    """What run_training preprocesses data_path with: InstructLab's length rule (min_seq_len None)."""
    return DataProcessArgs(data_path=args.data_path, data_output_path=args.data_output_dir, model_path=args.model_path,
                           chat_tmpl_path=args.chat_tmpl_path, max_seq_len=args.max_seq_len,
                           num_cpu_procs=args.data_process_num_cpu_procs, pretraining=args.pretraining_config)


def _instructlab_data_to_import(directory: Path) -> bool:
    """process_data=False over a directory InstructLab preprocessed (its data.jsonl): train
    what it made, converted (once) into shards beside it. A dataset of instructpack's own
    there is trained as it is."""
    if not has_instructlab_data(directory):
        return False
    return not (directory / MANIFEST).is_file() or read_manifest(directory).imported is not None


def _check_resumed_data(plan: PreprocessPlan, checkpoint: Path | None, state: TrainerState | None) -> None:
    """Refuses, before preprocessing writes anything, data that would make another dataset
    than the one the checkpoint trained (and that resuming would refuse after)."""
    saved = state.dataset if state is not None else None
    if saved is None or saved.preprocess_fingerprint in (None, plan.fingerprint):
        return
    if saved.source_sha256 != plan.input_sha256:
        what = f"data_path {plan.data_path} is not the file it was made from (sha256 {plan.input_sha256[:12]})"
    else:
        what = ("the same data_path, but another tokenizer, chat template or preprocessing setting "
                "(max_seq_len) would make other tokens")
    raise ResumeError(f"cannot resume from {checkpoint}: it trained {saved.describe()}; {what}. Nothing was "
                      f"written (the dataset in {plan.output_path} is as it was). Run with the data the checkpoint "
                      f"trained to resume, or start fresh: move {checkpoint.parent} away, or use another "
                      "ckpt_output_dir")


def _mock_dataset(args: TrainingArgs) -> Path:
    vocab = _model_vocab_size(args.model_path)
    length = args.mock_data_len or args.max_seq_len
    n = MOCK_STEPS * args.effective_batch_size
    path = Path(args.data_output_dir) / f"mock-{n}x{length}-vocab{vocab}-seed{args.random_seed}"
    if not (path / MANIFEST).is_file():
        write_synthetic_dataset(path, np.full(n, length), vocab, seed=args.random_seed)
    return path


def _model_vocab_size(model_path: str) -> int:
    """The embedding rows of the model (config.json; multimodal configs nest it in text_config)."""
    config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    vocab = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise ConfigError("training_args", ("model_path",), f"{model_path}/config.json has no vocab_size, which "
                          "mock_data needs to draw token ids", model_path)
    return vocab
