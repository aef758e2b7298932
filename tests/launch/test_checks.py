"""What run_training refuses before any work: directories that would let one output destroy
another, settings changed after the objects were built, and a directory another run works
in. Nothing is written, no worker starts (torchrun is replaced by a stand-in)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from instructpack import ConfigError, DirectoryInUseError, PathExistsError, TorchrunArgs, run_training
from instructpack.demo.example import generate_fact_conversations, write_jsonl

from support.launching import small_args


@pytest.mark.parametrize("data_output_dir", ["ckpt", "ckpt/data", "."])
def test_a_dataset_directory_overlapping_the_checkpoints_is_refused(tmp_path, valid_model, no_workers,
                                                                    data_output_dir):
    # "." contains ckpt_output_dir, "ckpt/data" lies inside it, "ckpt" is it: a dataset written
    # there could replace the checkpoints, or the checkpoints the dataset.
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "precious.safetensors").write_bytes(b"weights")
    with pytest.raises(ConfigError, match="training_args.data_output_dir = .*equals, contains or lies inside "
                                          "ckpt_output_dir"):
        run_training(TorchrunArgs(), small_args(tmp_path, valid_model, data_output_dir=str(tmp_path / data_output_dir)))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["precious.safetensors"]


def test_an_input_inside_the_dataset_directory_is_refused(tmp_path, valid_model, no_workers):
    (tmp_path / "data").mkdir()
    raw = write_jsonl(tmp_path / "data" / "my_raw.jsonl", generate_fact_conversations(16, seed=0))
    with pytest.raises(ConfigError, match="training_args.data_path = .*lies inside data_output_dir"):
        run_training(TorchrunArgs(), small_args(tmp_path, valid_model, data_path=str(raw)))
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["my_raw.jsonl"]


@pytest.mark.parametrize("field", ["ckpt_output_dir", "data_output_dir"])
def test_an_output_directory_that_is_a_file_is_named(tmp_path, valid_model, no_workers, field):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(PathExistsError, match=f"training_args.{field} = .*a-file.*is a file; give a directory"):
        run_training(TorchrunArgs(), small_args(tmp_path, valid_model, **{field: str(tmp_path / "a-file")}))


@pytest.mark.parametrize("change, match", [
    (lambda a: setattr(a, "max_batch_len", 16), r"training_args.max_batch_len = 16: must be >= max_seq_len \(512\)"),
    (lambda a: setattr(a, "learning_rate", -1.0), "training_args.learning_rate = -1.0: must be a finite number > 0"),
    (lambda a: setattr(a.fsdp_options, "sharding_strategy", "EVERYWHERE"),
     "training_args.fsdp_options.sharding_strategy = 'EVERYWHERE': expected one of"),
    (lambda a: setattr(a, "num_epochs", "three"), "training_args.num_epochs = 'three': expected an integer"),
])
def test_a_setting_changed_after_construction_is_checked_at_the_call(tmp_path, valid_model, no_workers, change,
                                                                       match):
    training_args = small_args(tmp_path, valid_model)
    change(training_args)  # the objects are mutable, and clients set fields after building them
    with pytest.raises(ConfigError, match=match):
        run_training(TorchrunArgs(), training_args)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "data").exists()


def test_torchrun_args_changed_after_construction_are_checked_too(tmp_path, valid_model, no_workers):
    torchrun_args = TorchrunArgs()
    torchrun_args.node_rank = 3
    with pytest.raises(ConfigError, match=r"torchrun_args.node_rank = 3: must be in \[0, nnodes\)"):
        run_training(torchrun_args, small_args(tmp_path, valid_model))


# --- one run per ckpt_output_dir (launch/ownership.py) ----------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from instructpack import locks
with locks.exclusive(Path(sys.argv[1]), locks.holder_note("run_training")):
    print("holding", flush=True)
    time.sleep(120)
"""


def _hold_run_lock(ckpt_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(ckpt_dir / ".instructpack-run.lock")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_run_into_the_same_directory_is_refused_naming_the_first(tmp_path, valid_model, stub_workers):
    (tmp_path / "ckpt").mkdir()
    first = _hold_run_lock(tmp_path / "ckpt")
    try:
        with pytest.raises(DirectoryInUseError, match=rf"{tmp_path / 'ckpt'} is in use by run_training \(host "
                                                      rf"{socket.gethostname()}, pid {first.pid}, started 20"):
            run_training(TorchrunArgs(), small_args(tmp_path, valid_model))
        assert not (tmp_path / "data").exists()  # refused before any work
    finally:
        first.kill()
        first.wait()
    run_training(TorchrunArgs(), small_args(tmp_path, valid_model))  # its lock went with it


def test_a_lock_left_by_a_run_that_died_does_not_block(tmp_path, valid_model, stub_workers):
    (tmp_path / "ckpt").mkdir()
    note = {"host": socket.gethostname(), "pid": 999999999, "started": "2026-01-01 00:00:00", "what": "run_training"}
    (tmp_path / "ckpt" / ".instructpack-run.lock").write_text(json.dumps(note))  # a note, but no lock held
    run_training(TorchrunArgs(), small_args(tmp_path, valid_model))
    assert (tmp_path / "ckpt" / "job.json").is_file()


def test_workers_that_outlived_their_launcher_block_the_next_run(tmp_path, valid_model, stub_workers):
    (tmp_path / "ckpt").mkdir()
    survivor = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                                 "from instructpack.locks import hold_shared_until_exit; "
                                 "hold_shared_until_exit(Path(sys.argv[1])); print('up', flush=True); time.sleep(120)",
                                 str(tmp_path / "ckpt" / ".instructpack-workers.lock")], stdout=subprocess.PIPE,
                                text=True)
    assert survivor.stdout.readline().strip() == "up"
    try:
        with pytest.raises(DirectoryInUseError, match="worker processes of an earlier run that are still alive"):
            run_training(TorchrunArgs(), small_args(tmp_path, valid_model))
    finally:
        survivor.kill()
        survivor.wait()
