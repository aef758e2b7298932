"""The multipack planner (csrc/packing.cpp) and the sampler over it: invariants as
property tests, the numba twin as oracle, hand-computed plans, settings errors, resume."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instructpack import kernels
from instructpack.data.sampler import MultipackSampler
from instructpack.errors import PlanError

from support import kernels_ref as ref


@st.composite
def plan_settings(draw):
    world_size = draw(st.integers(1, 8))
    n = draw(st.integers(1, 300))
    shape = draw(st.sampled_from(["uniform", "heavy", "equal"]))
    longest = draw(st.integers(1, 500))
    if shape == "equal":
        lengths = np.full(n, longest, np.int64)
    elif shape == "heavy":
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        lengths = np.clip(rng.lognormal(np.log(longest / 8), 1.0, n), 0, longest).astype(np.int64)
    else:
        lengths = np.asarray(draw(st.lists(st.integers(0, longest), min_size=n, max_size=n)), np.int64)
    max_batch_len = draw(st.integers(max(1, int(lengths.max())), max(1, int(lengths.max())) * 6))
    return dict(lengths=lengths, effective_batch_size=draw(st.integers(world_size, 96)), max_batch_len=max_batch_len,
                world_size=world_size, seed=draw(st.integers(0, 2**64 - 1)), epoch=draw(st.integers(0, 5)),
                padded=draw(st.booleans()))


def _plan(s):
    return MultipackSampler(s["lengths"], effective_batch_size=s["effective_batch_size"],
                            max_batch_len=s["max_batch_len"], world_size=s["world_size"], seed=s["seed"],
                            padded=s["padded"]).plan(s["epoch"])


def _bin_cost(lengths, ids, padded):
    if len(ids) == 0:
        return 0
    return int(lengths[ids].max()) * len(ids) if padded else int(lengths[ids].sum())


@settings(max_examples=300, deadline=None)
@given(plan_settings())
def test_plan_invariants(s):
    lengths, W, B, L = s["lengths"], s["world_size"], s["effective_batch_size"], s["max_batch_len"]
    plan = _plan(s)
    n = len(lengths)
    # Every sample exactly once, and the steps are consecutive slices of the epoch's permutation.
    assert sorted(plan.sample_ids.tolist()) == list(range(n))
    assert plan.num_steps == -(-n // B)
    order = kernels.epoch_permutation(n, s["seed"], s["epoch"])
    for step in range(plan.num_steps):
        assert sorted(plan.step_samples(step).tolist()) == sorted(order[step * B:(step + 1) * B].tolist())
        step_tokens = int(lengths[plan.step_samples(step)].sum())
        assert plan.lower_bound[step] == max(1, -(-step_tokens // (W * L)))
        m = plan.micro_batches(step)
        assert m >= plan.lower_bound[step]
        # Every rank has m micro-batches, each within budget; together they are the step.
        seen = []
        for rank, j in itertools.product(range(W), range(m)):
            ids = plan.micro_batch(step, rank, j)
            assert _bin_cost(lengths, ids, s["padded"]) <= L
            seen += ids.tolist()
        assert sorted(seen) == sorted(plan.step_samples(step).tolist())
        with pytest.raises(IndexError):
            plan.micro_batch(step, W, 0)
        with pytest.raises(IndexError):
            plan.micro_batch(step, 0, m)
    # Identical inputs give an identical plan.
    again = _plan(s)
    for a, b in [(plan.sample_ids, again.sample_ids), (plan.bin_begin, again.bin_begin),
                 (plan.step_bin_begin, again.step_bin_begin)]:
        np.testing.assert_array_equal(a, b)


@settings(max_examples=200, deadline=None)
@given(plan_settings())
def test_plan_equals_numba_twin(s):
    args = (s["lengths"], s["effective_batch_size"], s["max_batch_len"], s["world_size"], s["seed"], s["epoch"],
            s["padded"])
    for got, want in zip(kernels.plan_epoch(*args), ref.plan_epoch(*args)):
        np.testing.assert_array_equal(got, want)


def test_plan_equals_numba_twin_on_realistic_lengths():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(570) - 0.5, 1.0, 20_000), 16, 4096).astype(np.int64)
    for batch, cap, world, padded in [(512, 8192, 8, False), (128, 60000, 1, False), (1000, 4096, 3, True)]:
        args = (lengths, batch, cap, world, 7, 2, padded)
        for got, want in zip(kernels.plan_epoch(*args), ref.plan_epoch(*args)):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n", [0, 1, 2, 1000])
def test_permutation_equals_numba_twin(n):
    for seed, epoch in [(0, 0), (42, 1), (2**64 - 1, 7)]:
        got = kernels.epoch_permutation(n, seed, epoch)
        np.testing.assert_array_equal(got, ref.epoch_permutation(n, seed, epoch))
        assert sorted(got.tolist()) == list(range(n))


def test_permutation_is_uniform_and_differs_by_epoch():
    counts = Counter(tuple(kernels.epoch_permutation(4, seed, 0).tolist()) for seed in range(24_000))
    assert len(counts) == 24  # all orders of 4 elements appear ...
    assert max(counts.values()) < 1300 and min(counts.values()) > 700  # ... about 1,000 times each
    a, b = kernels.epoch_permutation(1000, 42, 0), kernels.epoch_permutation(1000, 42, 1)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, kernels.epoch_permutation(1000, 43, 0))


def test_hand_computed_plans_and_stats():
    # Four samples of 5 tokens, two ranks, 10 tokens each: one micro-batch per rank, full.
    s = MultipackSampler(np.full(4, 5), effective_batch_size=4, max_batch_len=10, world_size=2)
    plan = s.plan(0)
    stats = plan.stats(s.lengths)
    assert (plan.num_steps, plan.micro_batches(0)) == (1, 1)
    assert [len(plan.micro_batch(0, r, 0)) for r in range(2)] == [2, 2]
    assert (stats.micro_batches, stats.lower_bound, stats.efficiency, stats.imbalance) == (1, 1, 1.0, 0.0)
    # Three samples of 6 in bins of 10: the token bound says 2, but no two fit together.
    s = MultipackSampler(np.full(3, 6), effective_batch_size=3, max_batch_len=10)
    stats = s.plan(0).stats(s.lengths)
    assert (stats.micro_batches, stats.lower_bound, stats.efficiency) == (3, 2, 0.6)
    # Lengths 9, 1, 1, 1 on two ranks of 10: ranks hold 9 and 3 tokens, so the busy rank
    # costs 9 where a level split costs 6: 50 % imbalance.
    s = MultipackSampler(np.array([9, 1, 1, 1]), effective_batch_size=4, max_batch_len=10, world_size=2)
    plan = s.plan(0)
    assert sorted(sorted(s.lengths[plan.micro_batch(0, r, 0)].tolist()) for r in range(2)) == [[1, 1, 1], [9]]
    assert s.plan(0).stats(s.lengths).imbalance == pytest.approx(0.5)
    # Five samples at effective_batch_size 2: steps of 2, 2 and a last step of 1; with two
    # ranks the last step gives one rank an explicitly empty micro-batch.
    s = MultipackSampler(np.arange(1, 6), effective_batch_size=2, max_batch_len=10, world_size=2)
    plan = s.plan(0)
    assert [len(plan.step_samples(k)) for k in range(plan.num_steps)] == [2, 2, 1]
    assert sorted(len(plan.micro_batch(2, r, 0)) for r in range(2)) == [0, 1]
    assert "micro-batches per rank" in plan.stats(s.lengths).summary()


def test_best_fit_takes_over_when_worst_fit_cannot_reach_the_bound():
    # 20 tokens in bins of 10: worst fit levels the bins at 9 and 9 and then has no room for
    # the last 2; best fit puts 3 beside the 7 and fills both bins exactly.
    lengths = np.array([7, 3, 3, 3, 2, 2])
    s = MultipackSampler(lengths, effective_batch_size=6, max_batch_len=10)
    plan = s.plan(0)
    assert plan.micro_batches(0) == 2
    assert sorted(sorted(lengths[plan.micro_batch(0, 0, j)].tolist()) for j in range(2)) == [[2, 2, 3, 3], [3, 7]]
    for got, want in zip(kernels.plan_epoch(lengths, 6, 10, 1, 42, 0), ref.plan_epoch(lengths, 6, 10, 1, 42, 0)):
        np.testing.assert_array_equal(got, want)


def test_each_epoch_plan_is_logged_with_its_stats(caplog):
    s = MultipackSampler(np.full(4, 5), effective_batch_size=4, max_batch_len=10, world_size=2)
    with caplog.at_level("INFO", logger="instructpack.data.sampler"):
        s.plan(0)
        s.plan(0)  # cached: not planned or logged again
        s.plan(1)
    assert [r.getMessage() for r in caplog.records] == [
        f"epoch {e}: 1 steps, 1 micro-batches per rank (lower bound 1, +0.00%), fill 100.0%, rank imbalance 0.00% "
        "(worst step 0.00%)" for e in (0, 1)]


def test_padded_budget_counts_the_longest_sample_times_the_count():
    lengths = np.array([8, 2, 2, 2, 2])
    s = MultipackSampler(lengths, effective_batch_size=5, max_batch_len=16, padded=True)
    plan = s.plan(0)
    for j in range(plan.micro_batches(0)):
        ids = plan.micro_batch(0, 0, j)
        assert lengths[ids].max() * len(ids) <= 16
    # Packed, all 16 tokens fit one micro-batch; padded, 8 x 5 = 40 does not.
    assert MultipackSampler(lengths, effective_batch_size=5, max_batch_len=16).plan(0).micro_batches(0) == 1
    assert plan.micro_batches(0) == 2


def test_realistic_plan_is_near_the_lower_bound_and_level():
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(np.log(570) - 0.5, 1.0, 30_000), 16, 4096).astype(np.int64)
    s = MultipackSampler(lengths, effective_batch_size=3840, max_batch_len=8192, world_size=8, seed=3)
    stats = s.plan(0).stats(lengths)
    assert stats.micro_batches <= stats.lower_bound * 1.01
    assert stats.efficiency > 0.95
    assert stats.imbalance < 0.02


@pytest.mark.parametrize("kwargs, match", [
    (dict(lengths=[]), "no samples"),
    (dict(effective_batch_size=3, world_size=4), "effective_batch_size .*3.* world size .*4"),
    (dict(lengths=[5, 50, 5], max_batch_len=20), "sample 1 has 50 tokens.*max_batch_len.*at least 50"),
    (dict(rank=2, world_size=2), "rank 2"),
    (dict(max_batch_len=0), "max_batch_len"),
])
def test_bad_settings_name_the_setting(kwargs, match):
    args = dict(lengths=[5, 6, 7], effective_batch_size=4, max_batch_len=20, world_size=1) | kwargs
    with pytest.raises(PlanError, match=match):
        MultipackSampler(np.asarray(args.pop("lengths"), np.int64), **args)


def test_kernel_rejects_bad_settings_too():
    with pytest.raises(ValueError, match="empty"):
        kernels.plan_epoch(np.zeros(0, np.int64), 4, 10, 1, 0, 0)
    with pytest.raises(ValueError, match="max_batch_len"):
        kernels.plan_epoch(np.array([11]), 4, 10, 1, 0, 0)
    with pytest.raises(ValueError, match="world_size"):
        kernels.plan_epoch(np.array([1]), 1, 10, 2, 0, 0)


def _consume(sampler, steps):
    """The refs of the next `steps` steps, advancing the sampler as a step loader does."""
    out = []
    it = iter(sampler)
    while steps:
        ref_ = next(it)
        out.append((ref_.epoch, ref_.step, ref_.index, ref_.sample_ids.tolist()))
        if ref_.last_in_step:
            sampler.advance(ref_.epoch, ref_.step)
            steps -= 1
            if sampler.step == 0:  # epoch finished: a new iteration starts the next one
                it = iter(sampler)
    return out


def test_resume_continues_exactly_where_it_stopped():
    lengths = np.random.default_rng(5).integers(1, 300, 500)
    make = lambda rank: MultipackSampler(lengths, effective_batch_size=64, max_batch_len=1024,  # noqa: E731
                                         world_size=2, rank=rank, seed=9)
    for rank in range(2):
        straight = _consume(make(rank), 20)  # 8 steps per epoch: crosses two epoch ends
        first = make(rank)
        head = _consume(first, 11)
        state = first.state_dict()
        assert (state["epoch"], state["step"]) == (1, 3)
        resumed = make(rank)
        resumed.load_state_dict(state)
        assert head + _consume(resumed, 9) == straight


def test_resume_refuses_a_different_plan():
    s = MultipackSampler(np.ones(100, np.int64), effective_batch_size=10, max_batch_len=10)
    state = s.state_dict()
    other = MultipackSampler(np.ones(100, np.int64), effective_batch_size=20, max_batch_len=10)
    with pytest.raises(PlanError, match="effective_batch_size=10"):
        other.load_state_dict(state)
    # A different world size or max_batch_len keeps the same steps: allowed.
    MultipackSampler(np.ones(100, np.int64), effective_batch_size=10, max_batch_len=5, world_size=2
                     ).load_state_dict(state)


def test_ranks_see_the_same_step_and_counts():
    lengths = np.random.default_rng(6).integers(1, 200, 333)
    refs = [list(MultipackSampler(lengths, effective_batch_size=50, max_batch_len=400, world_size=3, rank=r,
                                  target_counts=lengths - 1)) for r in range(3)]
    assert len({len(r) for r in refs}) == 1  # same number of micro-batches on every rank
    for a, b, c in zip(*refs):
        assert (a.step, a.index, a.count, a.step_targets) == (b.step, b.index, b.count, b.step_targets) == \
            (c.step, c.index, c.count, c.step_targets)
    by_step = {}
    for r in refs:
        for x in r:
            by_step.setdefault(x.step, []).extend(x.sample_ids.tolist())
    for step, ids in by_step.items():
        assert refs[0][[x.step for x in refs[0]].index(step)].step_targets == int((lengths[ids] - 1).sum())
    assert sorted(i for ids in by_step.values() for i in ids) == list(range(333))
