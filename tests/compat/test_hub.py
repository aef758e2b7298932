"""model_path as a Hugging Face Hub id ("org/name"), as InstructLab accepts it: resolved to
the snapshot in the Hugging Face cache. Offline (HF_HUB_OFFLINE=1) only the cache is used;
the cache here is built by the test in the cache's own layout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from huggingface_hub import constants

from instructpack import PathNotFoundError, run_training

from support.launching import small_args

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, valid_model, monkeypatch):
    """A cache holding the tiny model as the Hub model acme/tiny-llama; offline."""
    cache = tmp_path / "hf-cache"
    repo = cache / "models--acme--tiny-llama"
    shutil.copytree(valid_model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_hub_id_trains_the_cached_snapshot_offline(tmp_path, hub_cache, recorded_launch, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "acme/tiny-llama" is no local directory here
    run_training(training_args=small_args(tmp_path, "acme/tiny-llama"))
    (_, job), = recorded_launch
    assert job.training_args.model_path == str(hub_cache / "models--acme--tiny-llama" / "snapshots" / COMMIT)


def test_a_hub_id_missing_from_the_cache_offline_says_so(tmp_path, hub_cache, recorded_launch, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PathNotFoundError, match="HF_HUB_OFFLINE is set") as e:
        run_training(training_args=small_args(tmp_path, "acme/other-model"))
    assert "training_args.model_path = 'acme/other-model'" in str(e.value)
    assert not recorded_launch


def test_the_preprocessing_command_resolves_a_hub_id_from_the_environment(tmp_path, hub_cache):
    data = small_args(tmp_path, "unused").data_path
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    proc = subprocess.run([sys.executable, "-c", "import sys; from instructpack.cli import preprocess_main; "
                           "sys.exit(preprocess_main())", "--data-path", data, "--data-output-path",
                           str(tmp_path / "out"), "--model-path", "acme/tiny-llama", "--max-seq-len", "512"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "samples kept" in proc.stdout and (tmp_path / "out" / "manifest.json").is_file()
