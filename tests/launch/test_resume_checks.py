"""The launcher trains only what it checked, and refuses what a resume would refuse before it
rewrites anything: other data than the checkpoint trained (named in words), a dataset
holding longer samples than the run's max_seq_len, and (in the worker) a dataset changed
after the check. torchrun is replaced by a command that succeeds; the worker runs alone."""

from __future__ import annotations

import json
import subprocess
import sys

import msgspec
import pytest

from instructpack import ConfigError, ResumeError, TorchrunArgs, TrainingArgs, load_dataset, run_training
from instructpack.demo.example import generate_conversations, generate_fact_conversations, write_jsonl
from instructpack.launch.diagnosis import diagnose
from instructpack.train.checkpoints.identity import (
    DatasetSummary,
    Progress,
    TrainerState,
    encode_trainer_state,
    run_fingerprint,
)
from instructpack.train.checkpoints.resumable import record_of
from instructpack.train.job import JobConfig, read_job, write_job

from support.launching import small_args


def fake_full_state(training_args: TrainingArgs, step: int = 2):
    """A complete full state as a run of these settings on this dataset would leave it (its
    model files are stand-ins: the launcher reads only the trainer state and the checksums)."""
    dataset = load_dataset(training_args.data_output_dir)
    checkpoint = tmp = dataset.path.parent / "ckpt" / "full_state" / f"step_{step}"
    (tmp / "model").mkdir(parents=True)
    (tmp / "model" / "rank00000.pt").write_bytes(b"weights and moments")
    (tmp / "rng_rank00000.pt").write_bytes(b"generators")
    state = TrainerState(time=0.0, progress=Progress(step, 8, 400, 1.0), scheduler={},
                         sampler={"epoch": 0, "step": step, "num_samples": len(dataset), "effective_batch_size": 4,
                                  "seed": 42},
                         fingerprint=run_fingerprint(training_args, dataset.manifest, 1),
                         dataset=DatasetSummary.of(dataset.path, dataset.manifest))
    (tmp / "trainer_state.json").write_text(encode_trainer_state(state))
    (tmp / "COMPLETE").write_text(json.dumps({"step": step, "files": record_of(tmp)}))
    return checkpoint


def test_the_job_names_the_checked_dataset_and_the_chosen_full_state(tmp_path, valid_model, stub_workers):
    training_args = small_args(tmp_path, valid_model)
    run_training(TorchrunArgs(), training_args)
    first = read_job(tmp_path / "ckpt" / "job.json")
    assert first.resume_checked and first.resume_from is None and len(first.dataset_identity) == 16
    checkpoint = fake_full_state(training_args)
    run_training(TorchrunArgs(), training_args)
    again = read_job(tmp_path / "ckpt" / "job.json")
    assert again.resume_from == str(checkpoint) and again.dataset_identity == first.dataset_identity


def test_other_data_is_refused_in_words_before_the_dataset_is_rewritten(tmp_path, valid_model, stub_workers):
    training_args = small_args(tmp_path, valid_model)
    run_training(TorchrunArgs(), training_args)  # preprocesses data/
    checkpoint = fake_full_state(training_args)
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}
    write_jsonl(tmp_path / "chat.jsonl", generate_fact_conversations(20, seed=1))  # new data, same file name
    with pytest.raises(ResumeError) as info:
        run_training(TorchrunArgs(), training_args)
    message = str(info.value)
    assert f"cannot resume from {checkpoint}: it trained {tmp_path / 'data'}, made from {tmp_path / 'chat.jsonl'}" \
        in message
    assert "16 samples" in message and "is not the file it was made from" in message
    assert "Nothing was written" in message
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before


def test_a_given_dataset_of_other_samples_is_named_in_words(tmp_path, valid_model, stub_workers):
    training_args = small_args(tmp_path, valid_model)
    run_training(TorchrunArgs(), training_args)
    fake_full_state(training_args)
    other = small_args(tmp_path, valid_model, data_path=str(write_jsonl(tmp_path / "other.jsonl",
                                                                generate_fact_conversations(12, seed=3))),
                 data_output_dir=str(tmp_path / "other-data"))
    run_training(TorchrunArgs(), msgspec.structs.replace(other, ckpt_output_dir=str(tmp_path / "scratch")))
    given = msgspec.structs.replace(other, process_data=False)  # the other dataset, as it is
    with pytest.raises(ResumeError, match=r"dataset: the checkpoint trained .*/data, made from .*chat.jsonl .*16 "
                                          r"samples.*this run has .*/other-data, made from .*other.jsonl .*12 samples"):
        run_training(TorchrunArgs(), given)


def test_a_given_dataset_with_longer_samples_than_max_seq_len_is_refused_unless_allowed(tmp_path, valid_model,
                                                                                         stub_workers):
    write_jsonl(tmp_path / "chat.jsonl", generate_conversations(24, seed=0, median_words=80))
    made = small_args(tmp_path, valid_model, max_seq_len=2048, max_batch_len=4096)
    run_training(TorchrunArgs(), made)
    longest = int(load_dataset(tmp_path / "data").lengths.max())
    given = msgspec.structs.replace(made, process_data=False, max_seq_len=64, max_batch_len=4096)
    with pytest.raises(ConfigError, match=rf"training_args.max_seq_len = 64: the dataset .*data was made with "
                                          rf"max_seq_len 2048 and holds \d+ samples longer than this run's \(the "
                                          rf"longest: {longest} tokens\).*allow_longer_samples=True"):
        run_training(TorchrunArgs(), given)
    run_training(TorchrunArgs(), msgspec.structs.replace(given, allow_longer_samples=True))


def _run_worker(job_path, status_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "instructpack.train.worker", str(job_path), str(status_dir)],
                          capture_output=True, text=True, timeout=300)


def test_a_worker_refuses_a_dataset_changed_after_the_launchers_check(tmp_path, valid_model, stub_workers):
    training_args = small_args(tmp_path, valid_model)
    run_training(TorchrunArgs(), training_args)
    job = read_job(tmp_path / "ckpt" / "job.json")
    status = tmp_path / "status"
    status.mkdir()
    checked = msgspec.structs.replace(job, status_dir=str(status), dataset_identity="0123456789abcdef")
    done = _run_worker(write_job(tmp_path / "job.json", checked), status)
    assert done.returncode != 0
    failure = json.loads((status / "rank0.json").read_text())
    assert failure["error"].startswith(f"DatasetError: {tmp_path / 'data'}: the dataset changed after the launcher "
                                       "checked it")


def test_a_worker_that_cannot_read_its_job_reports_why(tmp_path, valid_model):
    job = JobConfig(training_args=small_args(tmp_path, valid_model), dataset_path=str(tmp_path), status_dir="unused")
    raw = json.loads(msgspec.json.encode(job))
    raw["training_args"]["max_batch_len"] = 16  # a setting no launcher would have let through
    (tmp_path / "job.json").write_text(json.dumps(raw))
    status = tmp_path / "status"
    status.mkdir()
    done = _run_worker(tmp_path / "job.json", status)
    assert done.returncode != 0
    error = diagnose(done.returncode, status, [], tmp_path / "training.log")
    assert error.rank == 0 and "ConfigError: training_args.max_batch_len = 16: must be >= max_seq_len" in error.reason
