"""`python -m instructpack.demo`: builds the bundled example (a tiny tokenizer with a
ChatML template and generated chat data), preprocesses it, prints the summary and plans
an epoch of multipack micro-batches over it."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import DataProcessArgs, data_process, load_dataset
from .data.sampler import MultipackSampler
from .examples import build_tokenizer, generate_conversations, write_jsonl


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m instructpack.demo")
    parser.add_argument("--output", default="demo-output", help="directory for the example and its outputs")
    parser.add_argument("--samples", type=int, default=2000)
    ns = parser.parse_args(argv)
    root = Path(ns.output)
    model = build_tokenizer(root / "tiny-model", template="chatml", vocab_size=2000)
    data = write_jsonl(root / "chat.jsonl", generate_conversations(ns.samples, seed=0))
    print(f"example: {ns.samples} conversations in {data}, tokenizer in {model}")
    result = data_process.main(DataProcessArgs(data_path=str(data), data_output_path=str(root / "data"),
                                               model_path=str(model), max_seq_len=4096, num_cpu_procs=2))
    print(result.summary())
    ds = load_dataset(result.output_path)
    sample = ds[0]
    print(f"sample 0: {len(sample['input_ids'])} tokens, {(sample['labels'] != -100).sum()} trained, "
          f"from line {ds.source_lines[0]}")
    sampler = MultipackSampler(ds.lengths, effective_batch_size=128, max_batch_len=8192, world_size=2,
                               target_counts=ds.target_counts)
    print(f"multipack, 2 ranks, 128 samples per step, 8192 tokens per micro-batch: {sampler.steps_per_epoch} steps; "
          + sampler.plan(0).stats(ds.lengths).summary())


if __name__ == "__main__":
    main()
