"""Offline fixtures: tiny tokenizers (built in memory, one per chat-template style) and a
tiny model directory. Helpers that tests import live in support/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from instructpack.demo.example import build_tiny_model, build_tokenizer

from support.samples import TEMPLATE_STYLES


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tokenizers")
    return {style: build_tokenizer(root / style, template=style, vocab_size=600, corpus_words=20_000)
            for style in TEMPLATE_STYLES}


@pytest.fixture(scope="session")
def valid_model(tokenizer_dirs, tmp_path_factory) -> Path:
    """A tiny Llama saved with the chatml tokenizer: a valid model directory."""
    return build_tiny_model(tmp_path_factory.mktemp("valid") / "model", tokenizer_dirs["chatml"])


@pytest.fixture
def model(valid_model, tmp_path) -> Path:
    """A copy of the valid model directory, for a test to break or tamper with."""
    return Path(shutil.copytree(valid_model, tmp_path / "model"))
