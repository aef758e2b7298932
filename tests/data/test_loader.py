"""Micro-batch collation and the step loader, checked against per-sample reads of the
dataset (TokenDataset[i]) and against plain NumPy shifting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instructpack.data.collate import collate_packed, collate_padded
from instructpack.data.loader import StepLoader
from instructpack.data.sampler import MicroBatchRef, MultipackSampler
from instructpack.data.shards import load_dataset

from support.samples import preprocess, tricky_conversations


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer_dirs):
    out = preprocess(tmp_path_factory.mktemp("loader"), tokenizer_dirs["chatml"], tricky_conversations(240, seed=11),
                     num_cpu_procs=1)
    return load_dataset(out.output_path)


def _expected(dataset, ids):
    """Per-sample reads, shifted one sample at a time."""
    input_ids, targets, positions = [], [], []
    for i in ids:
        sample = dataset[int(i)]
        input_ids.append(sample["input_ids"])
        targets.append(np.append(sample["labels"][1:], -100))
        positions.append(np.arange(len(sample["input_ids"])))
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))  # noqa: E731
    return cat(input_ids), cat(targets), cat(positions)


def _ref(ids, step_targets=-1):
    return MicroBatchRef(epoch=0, step=0, index=0, count=1, sample_ids=np.asarray(ids, np.int64),
                         step_targets=step_targets)


def test_packed_micro_batch_matches_per_sample_reads(dataset):
    ids = [5, 0, 17, 17 + 1, len(dataset) - 1]
    mb = collate_packed(dataset, _ref(ids, step_targets=123))
    input_ids, targets, positions = _expected(dataset, ids)
    assert mb.input_ids.shape == (1, len(input_ids)) and mb.input_ids.dtype == torch.int64
    np.testing.assert_array_equal(mb.input_ids[0].numpy(), input_ids)
    np.testing.assert_array_equal(mb.shift_labels[0].numpy(), targets)
    np.testing.assert_array_equal(mb.position_ids[0].numpy(), positions)
    lengths = [len(dataset[i]["input_ids"]) for i in ids]
    assert mb.cu_seqlens.dtype == torch.int32
    assert mb.cu_seqlens.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert mb.max_seqlen == max(lengths)
    assert (mb.num_samples, mb.num_tokens, mb.step_targets) == (5, len(input_ids), 123)
    assert mb.num_targets == int((targets != -100).sum())
    assert mb.target_positions.tolist() == [t for t, label in enumerate(targets) if label != -100]
    assert mb.attention_mask is None and not mb.empty


def test_last_token_of_a_sample_never_predicts_the_next_sample(dataset):
    ids = list(range(10))
    mb = collate_packed(dataset, _ref(ids))
    ends = mb.cu_seqlens[1:] - 1
    assert (mb.shift_labels[0, ends] == -100).all()
    # Each sample's first token (a chat header) is never a target of anything before it.
    starts = mb.cu_seqlens[:-1]
    assert (dataset.target_counts[ids] == [int((dataset[i]["labels"][1:] != -100).sum()) for i in ids]).all()
    assert mb.num_targets == int((mb.shift_labels != -100).sum())
    assert (mb.position_ids[0, starts] == 0).all()


def test_empty_micro_batch_is_explicit(dataset):
    mb = collate_packed(dataset, _ref([]))
    assert mb.empty and mb.input_ids.shape == (1, 0) and mb.num_targets == 0 and mb.cu_seqlens.tolist() == [0]
    assert collate_padded(dataset, _ref([]), pad_token_id=0).input_ids.shape == (0, 0)


def test_padded_micro_batch_holds_the_same_tokens(dataset):
    ids = [3, 1, 4, 1 + 100]
    packed = collate_packed(dataset, _ref(ids))
    padded = collate_padded(dataset, _ref(ids), pad_token_id=7)
    lengths = np.diff(packed.cu_seqlens.numpy())
    assert padded.input_ids.shape == (4, lengths.max())
    for row, (a, b) in enumerate(zip(packed.cu_seqlens[:-1].tolist(), packed.cu_seqlens[1:].tolist())):
        n = b - a
        assert padded.input_ids[row, :n].tolist() == packed.input_ids[0, a:b].tolist()
        assert padded.shift_labels[row, :n].tolist() == packed.shift_labels[0, a:b].tolist()
        assert (padded.input_ids[row, n:] == 7).all() and (padded.shift_labels[row, n:] == -100).all()
        assert padded.attention_mask[row].tolist() == [1] * n + [0] * (padded.input_ids.shape[1] - n)
    assert padded.num_targets == packed.num_targets == int((padded.shift_labels != -100).sum())


def _sampler(dataset, **kw):
    args = dict(effective_batch_size=32, max_batch_len=1500, world_size=2, rank=1, seed=3) | kw
    return MultipackSampler(dataset.lengths, **args)


def _steps(loader):
    return [(s.epoch, s.step, s.targets, [(mb.index, mb.count, mb.input_ids.tolist(), mb.shift_labels.tolist())
                                          for mb in s.micro_batches]) for s in loader]


def test_step_loader_yields_the_plan_and_moves_the_sampler(dataset):
    sampler = _sampler(dataset)
    loader = StepLoader(dataset, sampler)
    assert len(loader) == sampler.steps_per_epoch == -(-len(dataset) // 32)
    plan = sampler.plan(0)
    steps = list(loader)
    assert [s.step for s in steps] == list(range(plan.num_steps))
    for s in steps:
        assert len(s.micro_batches) == plan.micro_batches(s.step)
        everyone = plan.step_samples(s.step)
        assert s.targets == int(dataset.target_counts[everyone].sum())
        mine = np.concatenate([plan.micro_batch(s.step, 1, j) for j in range(plan.micro_batches(s.step))])
        assert sum(mb.num_samples for mb in s.micro_batches) == len(mine)
        assert np.concatenate([mb.input_ids[0].numpy() for mb in s.micro_batches]).tolist() == \
            _expected(dataset, mine)[0].tolist()
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["step"] == 0
    # The next iteration is the next epoch, with a different order.
    assert [s.epoch for s in loader] == [1] * plan.num_steps


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_give_the_same_steps(dataset, context):
    alone = _steps(StepLoader(dataset, _sampler(dataset)))
    workers = _steps(StepLoader(dataset, _sampler(dataset), num_workers=2, multiprocessing_context=context))
    assert workers == alone


def test_resume_mid_epoch_through_the_loader(dataset):
    whole = _steps(StepLoader(dataset, _sampler(dataset)))
    first = _sampler(dataset)
    loader = StepLoader(dataset, first)
    head = []
    for step in loader:
        head.append(step.step)
        if step.step == 3:
            break
    resumed = _sampler(dataset)
    resumed.load_state_dict(first.state_dict())
    assert _steps(StepLoader(dataset, resumed)) == whole[4:]


def test_resume_reads_only_the_steps_left(dataset, monkeypatch):
    """Resuming costs O(1) in the steps done: the loader starts at the saved position and
    never builds (or skips through) the micro-batches of earlier steps."""
    import instructpack.data.loader as loader_module

    requested = []
    real = loader_module.collate_packed
    monkeypatch.setattr(loader_module, "collate_packed", lambda ds, ref: requested.append(ref.step) or real(ds, ref))
    sampler = _sampler(dataset)
    sampler.load_state_dict(dict(sampler.state_dict(), step=4))
    steps = list(StepLoader(dataset, sampler))
    assert [s.step for s in steps] == list(range(4, sampler.steps_per_epoch))
    assert sorted(set(requested)) == list(range(4, sampler.steps_per_epoch))
    assert len(requested) == sum(len(s.micro_batches) for s in steps)


def test_iterating_leaves_the_global_random_state_alone(dataset):
    """A pass over a DataLoader draws a worker seed, from torch's global generator unless it
    has its own. A resumed run starts its pass after restoring the random state, so that
    draw would shift every dropout mask after it."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    list(StepLoader(dataset, _sampler(dataset)))
    assert torch.equal(torch.rand(4), expected)


def test_dataset_pickles_as_its_path(dataset):
    import pickle

    again = pickle.loads(pickle.dumps(dataset))
    assert len(pickle.dumps(dataset)) < 1000  # the path, not the mapped tokens
    np.testing.assert_array_equal(again.lengths, dataset.lengths)
    np.testing.assert_array_equal(again.gather([1, 2])[0], dataset.gather([1, 2])[0])


def test_to_moves_every_tensor_and_keeps_the_counts(dataset):
    mb = collate_padded(dataset, _ref([1, 2, 3], step_targets=9), pad_token_id=0)
    moved = mb.to("meta")
    for name in ("input_ids", "position_ids", "shift_labels", "cu_seqlens", "attention_mask"):
        assert getattr(moved, name).device.type == "meta" and getattr(mb, name).device.type == "cpu"
        assert getattr(moved, name).shape == getattr(mb, name).shape
    assert (moved.num_samples, moved.num_tokens, moved.num_targets, moved.step_targets, moved.max_seqlen) == \
        (mb.num_samples, mb.num_tokens, mb.num_targets, mb.step_targets, mb.max_seqlen)
    packed = collate_packed(dataset, _ref([1, 2, 3], step_targets=9)).to("meta")
    assert packed.target_positions.device.type == "meta"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_pinned_loading(dataset):
    steps = list(StepLoader(dataset, _sampler(dataset), num_workers=1, pin_memory=True))
    mb = steps[0].micro_batches[0]
    assert mb.input_ids.is_pinned() and mb.shift_labels.is_pinned()
    assert mb.to("cuda", non_blocking=True).input_ids.is_cuda
