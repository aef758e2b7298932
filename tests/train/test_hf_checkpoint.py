"""When checkpoints are due, and that a checkpoint directory is replaced atomically."""

from __future__ import annotations

import pytest
import torch

from instructpack import TrainingArgs
from instructpack.train.backends import Backend
from instructpack.train.checkpoints.hf import save_hf_checkpoint
from instructpack.train.checkpoints.schedule import CheckpointSchedule, checkpoint_dir
from instructpack.train.distributed import World

WORLD = World(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def args(**kw) -> TrainingArgs:
    base = dict(model_path="m", data_path="d", ckpt_output_dir="c", data_output_dir="o", max_seq_len=8,
                max_batch_len=8, effective_batch_size=64, learning_rate=1e-3)
    return TrainingArgs(**{**base, **kw})


@pytest.mark.parametrize("save_samples, every", [(0, None), (-5, None), (1, 1), (20, 1), (64, 1), (100, 2),
                                                  (128, 2), (150, 2), (170, 3), (6400, 100)])
def test_save_samples_rounds_to_whole_steps(save_samples, every):
    assert CheckpointSchedule.from_args(args(save_samples=save_samples)).every_steps == every


def test_due():
    s = CheckpointSchedule(every_steps=3, at_epoch_end=False)
    assert [g for g in range(1, 10) if s.due(g, epoch_end=False, last_step=False)] == [3, 6, 9]
    assert s.due(4, epoch_end=True, last_step=False) is False
    assert s.due(4, epoch_end=False, last_step=True) is True  # the end always saves
    e = CheckpointSchedule(every_steps=None, at_epoch_end=True)
    assert e.due(5, epoch_end=True, last_step=False) and not e.due(4, epoch_end=False, last_step=False)


def test_checkpoint_dir_names(tmp_path):
    assert checkpoint_dir(tmp_path, 1234, False) == tmp_path / "hf_format" / "samples_1234"
    assert checkpoint_dir(tmp_path, 1234, True) == tmp_path / "hf_format" / "last_epoch"


class TinyModel(torch.nn.Module):
    """Just what save_hf_checkpoint uses of a transformers model."""

    def __init__(self, value: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((2,), value))
        self.config = type("Config", (), {"use_cache": False})()

    def save_pretrained(self, directory, state_dict, safe_serialization):
        assert self.config.use_cache is True and safe_serialization
        (directory / "weights.txt").write_text(str(state_dict["w"].tolist()))
        (directory / "config.json").write_text('{"dtype": "float32"}')


class Tokenizer:
    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_pretrained(self, directory):
        if self.fail:
            raise OSError("disk full")
        (directory / "tokenizer.json").write_text("{}")


def test_last_epoch_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "hf_format" / "last_epoch"
    model = TinyModel(1.0)
    save_hf_checkpoint(Backend(model, None), Tokenizer(), target, WORLD)
    assert (target / "weights.txt").read_text() == "[1.0, 1.0]" and model.config.use_cache is False

    with pytest.raises(OSError, match="disk full"):  # a failed write leaves the previous one intact
        save_hf_checkpoint(Backend(TinyModel(2.0), None), Tokenizer(fail=True), target, WORLD)
    assert (target / "weights.txt").read_text() == "[1.0, 1.0]"

    save_hf_checkpoint(Backend(TinyModel(3.0), None), Tokenizer(), target, WORLD)
    assert (target / "weights.txt").read_text() == "[3.0, 3.0]"
    assert sorted(p.name for p in target.parent.iterdir()) == ["last_epoch"]  # no temporaries left


def test_deepspeed_native_schedule_only_for_deepspeed_with_save_samples():
    assert CheckpointSchedule.deepspeed_native(args(distributed_backend="deepspeed")) is None
    assert CheckpointSchedule.deepspeed_native(args(deepspeed_options={"save_samples": 128})) is None  # fsdp
    s = CheckpointSchedule.deepspeed_native(args(distributed_backend="deepspeed",
                                                 deepspeed_options={"save_samples": 128}))
    assert s == CheckpointSchedule(every_steps=2, at_epoch_end=False)


def test_weights_saved_in_the_training_dtype_with_a_config_that_says_so(tmp_path):
    """fp32 master weights (FSDP2 and DDP on GPUs) are saved in bf16, the dtype the model
    computes in; config.json must say bfloat16 too (save_pretrained would write the live
    model's float32), so dtype="auto" loads what the file holds. Tied weights once."""
    import json

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from instructpack.train.checkpoints.hf import _save_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    state = {k: v.clone() for k, v in model.state_dict().items()}  # gathered: tied weights are separate copies
    _save_model(model, state, tmp_path, torch.bfloat16)

    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert "lm_head.weight" not in f.keys()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert loaded.dtype == torch.bfloat16 and model.dtype == torch.float32
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.to(torch.bfloat16))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied again
