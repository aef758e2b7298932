"""The environment variables InstructLab's users set act as in InstructLab:
TRUST_REMOTE_CODE=1 trusts the model's code, INSTRUCTLAB_NCCL_TIMEOUT_MS sets how long
collectives wait (a positive integer of milliseconds; anything else is refused)."""

from __future__ import annotations

import datetime

import pytest

from instructpack import ConfigError, run_training

from support.launching import small_args


@pytest.mark.parametrize("value, trusted", [("1", True), ("true", True), ("0", False), (None, False)])
def test_trust_remote_code_from_the_environment(value, trusted, tmp_path, model, recorded_launch, monkeypatch):
    if value is None:
        monkeypatch.delenv("TRUST_REMOTE_CODE", raising=False)
    else:
        monkeypatch.setenv("TRUST_REMOTE_CODE", value)
    args = small_args(tmp_path, model)
    run_training(training_args=args)
    (_, job), = recorded_launch
    assert job.training_args.trust_remote_code is trusted and args.trust_remote_code is False


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5"])
def test_a_bad_collective_timeout_is_refused_before_anything_starts(value, tmp_path, model, recorded_launch,
                                                                    monkeypatch):
    monkeypatch.setenv("INSTRUCTLAB_NCCL_TIMEOUT_MS", value)
    with pytest.raises(ConfigError, match=f"INSTRUCTLAB_NCCL_TIMEOUT_MS = '{value}': must be a positive integer"):
        run_training(training_args=small_args(tmp_path, model))
    assert not recorded_launch and not (tmp_path / "data").exists()


def test_the_workers_process_group_waits_as_long_as_asked(monkeypatch):
    import torch.distributed as dist

    from instructpack.train import distributed

    given = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: given.update(kw))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("INSTRUCTLAB_NCCL_TIMEOUT_MS", "90000")
    distributed.init_distributed()
    assert given["timeout"] == datetime.timedelta(seconds=90)
    monkeypatch.delenv("INSTRUCTLAB_NCCL_TIMEOUT_MS")
    distributed.init_distributed()
    assert given["timeout"] == datetime.timedelta(minutes=30)
