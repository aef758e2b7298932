"""Small settings and data for tests of the launcher."""

from __future__ import annotations

from instructpack import TrainingArgs
from instructpack.demo.example import generate_fact_conversations, write_jsonl


def small_args(tmp_path, model, **kw) -> TrainingArgs:
    """16 short conversations in tmp_path/chat.jsonl, checkpoints in ckpt/, the dataset in data/."""
    data = tmp_path / "chat.jsonl"
    if not data.exists():
        write_jsonl(data, generate_fact_conversations(16, seed=0))
    base = dict(model_path=str(model), data_path=str(data), ckpt_output_dir=str(tmp_path / "ckpt"),
                data_output_dir=str(tmp_path / "data"), max_seq_len=512, max_batch_len=1024,
                effective_batch_size=4, learning_rate=1e-3, data_process_num_cpu_procs=1)
    return TrainingArgs(**{**base, **kw})
