"""The validation loss in a 2-process run: held-out samples never trained, the split stored
beside the dataset, and the logged loss equal to one process computing the mean loss per
target token of those samples, alone and unpacked, with the checkpoint's weights."""

from __future__ import annotations

import json

import pytest
import torch

from instructpack import ConfigError, TorchrunArgs, load_dataset, run_training
from instructpack.data.collate import IGNORE_INDEX
from instructpack.data.validation import make_split, split_path
from instructpack.train.distributed import World
from instructpack.train.loop import training_sampler
from instructpack.train.metrics import read_metrics
from instructpack.train.plot import _last_record_per_step

from support.launching import small_args

pytestmark = pytest.mark.slow


def single_process_loss(checkpoint, dataset, sample_ids) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    total, targets = 0.0, 0
    with torch.no_grad():
        for i in sample_ids:
            ids = torch.as_tensor(dataset[int(i)]["input_ids"]).long()[None]
            labels = torch.as_tensor(dataset[int(i)]["labels"]).long()[1:]
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX,
                                                       reduction="sum").item()
            targets += int((labels != IGNORE_INDEX).sum())
    return total / targets


def test_validation_loss_over_two_ranks_equals_one_process(tmp_path, model):
    args = small_args(tmp_path, model, num_epochs=2, effective_batch_size=4, validation_split=0.25,
                      validation_frequency=2, checkpoint_at_epoch=True, learning_rate=5e-3)
    run_training(TorchrunArgs(nproc_per_node=2), args)

    dataset = load_dataset(tmp_path / "data")
    (split_file,) = (tmp_path / "data").glob("validation-*.json")  # stored beside the dataset
    assert split_file == split_path(tmp_path / "data", dataset.manifest, 0.25, args.random_seed)
    split = make_split(tmp_path / "data", dataset.manifest, len(dataset), 0.25, args.random_seed)
    assert len(split.validation) == 4 and len(split.train) == 12

    records = read_metrics(tmp_path / "ckpt")
    steps = [r for r in records if "loss" in r]
    validations = [r for r in records if "val_loss" in r]
    assert len(steps) == 6  # 3 steps of 4 training samples per epoch: the held-out ones are not trained
    assert sum(r["samples"] for r in steps) == 2 * len(split.train)
    assert [v["step"] for v in validations] == [2, 4, 6]
    assert validations[-1]["val_samples"] == 4
    assert validations[0]["val_loss"] > validations[-1]["val_loss"]  # it learns what it was not shown
    (final,) = [p for p in (tmp_path / "ckpt" / "hf_format").iterdir() if p.name == "samples_24"]
    expected = single_process_loss(final, dataset, split.validation)
    assert validations[-1]["val_loss"] == pytest.approx(expected, rel=1e-5)
    # The plot (and anything reading the file by step) keeps both lines of a step.
    assert len(_last_record_per_step(records, tmp_path / "ckpt" / "metrics.jsonl")) == len(records)


def test_the_training_plan_never_holds_a_validation_sample(tmp_path, model):
    args = small_args(tmp_path, model, validation_split=0.3, validation_frequency=1)
    from instructpack.launch.dataset import prepare_dataset

    path = prepare_dataset(args, world_size=2)
    dataset = load_dataset(path)
    split = make_split(path, dataset.manifest, len(dataset), 0.3, args.random_seed)
    for rank in (0, 1):
        sampler = training_sampler(args, World(rank, rank, 2, torch.device("cpu")), dataset)
        planned = set()
        for epoch in range(3):
            plan = sampler.plan(epoch)
            ids = plan.sample_ids.tolist()
            assert sorted(ids) == split.train.tolist()  # every training sample once per epoch
            planned.update(ids)
        assert not planned & set(split.validation.tolist())
    again = make_split(path, dataset.manifest, len(dataset), 0.3, args.random_seed)
    assert again.validation.tolist() == split.validation.tolist()
    other = make_split(path, dataset.manifest, len(dataset), 0.3, args.random_seed + 1)
    assert other.path != split.path and json.loads(split.path.read_text())["validation"] == split.validation.tolist()


def test_a_validation_set_smaller_than_the_ranks_is_refused(tmp_path, model):
    with pytest.raises(ConfigError, match="validation_split = 0.01: holds out 1 samples, fewer than the 2 processes"):
        run_training(TorchrunArgs(nproc_per_node=2), small_args(tmp_path, model, validation_split=0.01,
                                                                validation_frequency=1))
