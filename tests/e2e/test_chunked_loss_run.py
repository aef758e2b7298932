"""The chunked output-layer loss under the sharded backends, in 2-process runs: a run whose
micro-batches are chunked (a tiny chunk forced through INSTRUCTPACK_LOSS_CHUNK_LOGITS)
takes the same steps as the same run computing every target's logits at once."""

from __future__ import annotations

import pytest

from instructpack import TorchrunArgs, run_training
from instructpack.train.metrics import read_metrics

from support.launching import small_args

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_chunked_and_plain_losses_train_alike(backend, tmp_path, model, monkeypatch):
    curves = {}
    for name, chunk_logits in (("plain", None), ("chunked", "2000")):
        if chunk_logits is None:
            monkeypatch.delenv("INSTRUCTPACK_LOSS_CHUNK_LOGITS", raising=False)
        else:
            monkeypatch.setenv("INSTRUCTPACK_LOSS_CHUNK_LOGITS", chunk_logits)  # a few tokens per chunk
        args = small_args(tmp_path, model, num_epochs=2, distributed_backend=backend,
                          ckpt_output_dir=str(tmp_path / f"ckpt-{name}"), checkpoint_at_epoch=False)
        run_training(TorchrunArgs(nproc_per_node=2), args)
        curves[name] = read_metrics(tmp_path / f"ckpt-{name}")
        log = (tmp_path / f"ckpt-{name}" / "training.log").read_text()
        assert "output layer loss: in chunks of 3 tokens" in log or name == "plain"
    assert len(curves["plain"]) == len(curves["chunked"]) >= 4
    for p, c in zip(curves["plain"], curves["chunked"]):
        assert c["loss"] == pytest.approx(p["loss"], rel=1e-5)
        assert c["grad_norm"] == pytest.approx(p["grad_norm"], rel=1e-4)
