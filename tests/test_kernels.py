"""Every C++ kernel against its NumPy twin (kernels_ref.py), on random and edge-case inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instructpack import kernels

from support import kernels_ref as ref


def _csr(counts):
    begin = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=begin[1:])
    return begin


@st.composite
def mask_inputs(draw):
    n_samples = draw(st.integers(0, 6))
    starts, ends, tok_counts, s_starts, s_ends, s_counts = [], [], [], [], [], []
    for _ in range(n_samples):
        text_len = draw(st.integers(0, 60))
        # Tokens: monotone offsets with some empty ones (trimmed whitespace) and repeats
        # (several byte tokens of one character).
        n_tok = draw(st.integers(0, 20))
        cuts = sorted(draw(st.lists(st.integers(0, text_len), min_size=n_tok + 1, max_size=n_tok + 1)))
        for a, b in zip(cuts, cuts[1:]):
            starts.append(a)
            ends.append(b)
        tok_counts.append(max(0, len(cuts) - 1))
        points = sorted(set(draw(st.lists(st.integers(0, text_len), max_size=8))))
        spans = [(a, b) for a, b in zip(points[::2], points[1::2]) if a < b]
        s_starts += [a for a, _ in spans]
        s_ends += [b for _, b in spans]
        s_counts.append(len(spans))
    arr = lambda x: np.asarray(x, np.int64)  # noqa: E731
    return arr(starts), arr(ends), _csr(tok_counts), arr(s_starts), arr(s_ends), _csr(s_counts)


@settings(max_examples=300, deadline=None)
@given(mask_inputs())
def test_label_mask_matches_reference(inputs):
    got_mask, got_trained = kernels.label_mask(*inputs)
    want_mask, want_trained = ref.label_mask(*inputs)
    np.testing.assert_array_equal(got_mask, want_mask)
    np.testing.assert_array_equal(got_trained, want_trained)


def test_label_mask_hand_computed():
    # text "Hi there!" ; trained span [3, 9) = "there!"
    starts = np.array([0, 2, 3, 8, 9], np.int64)
    ends = np.array([2, 3, 8, 9, 9], np.int64)  # the last token is empty at the end
    mask, trained = kernels.label_mask(starts, ends, _csr([5]), np.array([3]), np.array([9]), _csr([1]))
    assert mask.tolist() == [0, 0, 1, 1, 0] and trained.tolist() == [2]


@pytest.mark.parametrize("bad", [
    dict(span_starts=[5], span_ends=[5]),  # empty span
    dict(span_starts=[0, 3], span_ends=[4, 6]),  # overlapping
    dict(span_starts=[4, 0], span_ends=[6, 2]),  # unsorted
])
def test_label_mask_rejects_bad_spans(bad):
    with pytest.raises(ValueError, match="span"):
        kernels.label_mask(np.array([0], np.int64), np.array([1], np.int64), _csr([1]),
                           np.array(bad["span_starts"], np.int64), np.array(bad["span_ends"], np.int64),
                           _csr([len(bad["span_starts"])]))


def test_label_mask_rejects_inconsistent_boundaries():
    with pytest.raises(ValueError, match="tok_begin"):
        kernels.label_mask(np.zeros(3, np.int64), np.ones(3, np.int64), np.array([0, 2], np.int64),
                           np.zeros(0, np.int64), np.zeros(0, np.int64), np.array([0], np.int64))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 40), max_size=30), max_size=6), st.integers(1, 40))
def test_token_byte_offsets_matches_reference(samples, vocab):
    rng = np.random.default_rng(len(samples) + vocab)
    byte_len = rng.integers(-1, 5, size=vocab).astype(np.int32)  # -1: unknown length
    ids = np.array([t for s in samples for t in s], np.uint32)  # some ids >= vocab: unknown
    begin = _csr([len(s) for s in samples])
    for got, want in zip(kernels.token_byte_offsets(ids, begin, byte_len),
                         ref.token_byte_offsets(ids, begin, byte_len)):
        np.testing.assert_array_equal(got, want)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_checksum_matches_reference(data):
    # Streaming (pieces of any size) is covered by test_streamed_writer_equals_one_shot,
    # whose header checksum is computed from unaligned appends.
    assert kernels.checksum64(data) == ref.checksum64(data)


def test_checksum_detects_every_single_bit_flip():
    data = bytearray(np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes())
    base = kernels.checksum64(bytes(data))
    for i in range(len(data) * 8):
        data[i // 8] ^= 1 << (i % 8)
        assert kernels.checksum64(bytes(data)) != base
        data[i // 8] ^= 1 << (i % 8)


def _random_shard(rng, n, dtype):
    lengths = rng.integers(0, 40, size=n).astype(np.uint32)
    total = int(lengths.sum())
    tokens = rng.integers(0, np.iinfo(dtype).max, size=total, dtype=dtype)
    mask = rng.integers(0, 2, size=total).astype(np.uint8)
    trained = np.minimum(lengths, rng.integers(0, 40, size=n)).astype(np.uint32)
    lines = np.sort(rng.choice(10 * n + 10, size=n, replace=False)).astype(np.uint64) + 1
    return tokens, mask, lengths, trained, lines


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("n", [0, 1, 7, 300])
def test_shard_file_is_byte_identical_to_reference(tmp_path, dtype, n):
    arrays = _random_shard(np.random.default_rng(n), n, dtype)
    path = tmp_path / "s.bin"
    checksum = kernels.write_shard(str(path), *arrays)
    expected = ref.shard_bytes(*arrays)
    assert path.read_bytes() == expected
    assert checksum == ref.read_shard(expected)["checksum"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin"]  # side files removed


def test_streamed_writer_equals_one_shot(tmp_path):
    rng = np.random.default_rng(1)
    tokens, mask, lengths, trained, lines = _random_shard(rng, 50, np.uint16)
    w = kernels.ShardWriter(str(tmp_path / "streamed.bin"), 2)
    ends = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    for a, b in [(0, 3), (3, 3), (3, 20), (20, 49), (49, 50)]:  # includes an empty append; odd byte counts
        w.append(tokens[ends[a]:ends[b]], mask[ends[a]:ends[b]], lengths[a:b], trained[a:b], lines[a:b])
    w.close()
    assert (tmp_path / "streamed.bin").read_bytes() == ref.shard_bytes(tokens, mask, lengths, trained, lines)


def test_reader_views_and_gather_match_reference(tmp_path):
    rng = np.random.default_rng(2)
    shards, paths = [], []
    for k, (n, dtype) in enumerate([(20, np.uint16), (1, np.uint16), (33, np.uint16)]):
        arrays = _random_shard(rng, n, dtype)
        paths.append(str(tmp_path / f"{k}.bin"))
        kernels.write_shard(paths[-1], *arrays)
        shards.append(ref.read_shard(ref.shard_bytes(*arrays)))
    s = kernels.ShardSet(paths)
    assert s.num_samples == 54
    for i, want in enumerate(shards):
        view = s.shard(i)
        for name in ("tokens", "mask", "offsets", "lengths", "trained", "source_lines"):
            np.testing.assert_array_equal(getattr(view, name), want[name])
        assert not view.tokens.flags.writeable  # a write would fault on the read-only map
        view.verify()
    for ids in ([], [0], [53, 0, 20, 20, 21], rng.integers(0, 54, 200).tolist()):
        for shift in (False, True):
            got = kernels.gather(s, np.array(ids, np.int64), shift)
            for a, b in zip(got, ref.gather(shards, ids, shift)):
                np.testing.assert_array_equal(a, b)
    with pytest.raises(IndexError):
        kernels.gather(s, np.array([54]))
    with pytest.raises(IndexError):
        kernels.gather(s, np.array([-1]))


def test_views_outlive_the_shard_set(tmp_path):
    arrays = _random_shard(np.random.default_rng(3), 10, np.uint16)
    kernels.write_shard(str(tmp_path / "a.bin"), *arrays)
    tokens = kernels.ShardSet([str(tmp_path / "a.bin")]).shard(0).tokens  # the set is dropped here
    import gc

    gc.collect()
    np.testing.assert_array_equal(tokens, arrays[0])


def _written(tmp_path, n=30):
    arrays = _random_shard(np.random.default_rng(4), n, np.uint16)
    path = tmp_path / "c.bin"
    kernels.write_shard(str(path), *arrays)
    return path


def test_truncated_shard_is_refused_naming_the_file(tmp_path):
    path = _written(tmp_path)
    data = path.read_bytes()
    for size in (0, 10, 63, 64, len(data) - 1):
        path.write_bytes(data[:size])
        with pytest.raises(kernels.ShardError, match=f"{path}.*truncated"):
            kernels.Shard(str(path))


@pytest.mark.parametrize("offset, match", [(0, "bad magic"), (8, "version"), (16, "corrupt|truncated|oversized"),
                                           (40, "corrupt shard header")])
def test_corrupt_header_is_refused(tmp_path, offset, match):
    path = _written(tmp_path)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(kernels.ShardError, match=match):
        kernels.Shard(str(path))


def test_corrupt_payload_is_found_by_verify(tmp_path):
    path = _written(tmp_path)
    size = path.stat().st_size
    for offset in (64, size // 2, size - 1):
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))
        shard = kernels.Shard(str(path))  # O(1) open does not read the payload
        with pytest.raises(kernels.ShardError, match=f"{path}.*checksum"):
            shard.verify()
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))


def test_corrupt_index_never_reads_out_of_bounds(tmp_path):
    path = _written(tmp_path)
    shard = kernels.Shard(str(path))
    index_offset = int.from_bytes(path.read_bytes()[48:56], "little")
    del shard
    data = bytearray(path.read_bytes())
    data[index_offset + 8 * 5: index_offset + 8 * 6] = (10**12).to_bytes(8, "little")  # sample 5's offset
    path.write_bytes(bytes(data))
    s = kernels.ShardSet([str(path)])
    with pytest.raises(kernels.ShardError, match="corrupt shard index at sample 5"):
        kernels.gather(s, np.array([5]))


def test_missing_shard_names_the_file(tmp_path):
    with pytest.raises(kernels.ShardError, match="nope.bin: cannot open"):
        kernels.Shard(str(tmp_path / "nope.bin"))


def test_unfinished_shard_has_no_valid_header(tmp_path):
    arrays = _random_shard(np.random.default_rng(5), 5, np.uint16)
    w = kernels.ShardWriter(str(tmp_path / "u.bin"), 2)
    w.append(*arrays)
    with pytest.raises(kernels.ShardError, match="bad magic"):
        kernels.Shard(str(tmp_path / "u.bin"))
    del w
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.bin"]
