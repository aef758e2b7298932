"""Reference twins of the C++ kernels, in plain NumPy: slow, obvious, and the oracle the
tests compare the kernels against."""

from __future__ import annotations

import struct

import numpy as np

MAGIC = b"IPKSHRD\0"
VERSION = 1
HEADER_BYTES = 64
_PRIME = 0x100000001B3
_SEED = 0xCBF29CE484222325
_MASK64 = (1 << 64) - 1


def label_mask(starts, ends, tok_begin, span_starts, span_ends, span_begin):
    mask = np.zeros(len(starts), dtype=np.uint8)
    trained = np.zeros(len(tok_begin) - 1, dtype=np.int64)
    for s in range(len(tok_begin) - 1):
        spans = list(zip(span_starts[span_begin[s]:span_begin[s + 1]], span_ends[span_begin[s]:span_begin[s + 1]]))
        for t in range(tok_begin[s], tok_begin[s + 1]):
            lo, hi = int(starts[t]), max(int(ends[t]), int(starts[t]) + 1)
            if any(a < hi and lo < b for a, b in spans):
                mask[t] = 1
                trained[s] += 1
    return mask, trained


def token_byte_offsets(ids, tok_begin, byte_len):
    starts = np.zeros(len(ids), np.int64)
    ends = np.zeros(len(ids), np.int64)
    total = np.zeros(len(tok_begin) - 1, np.int64)
    for s in range(len(tok_begin) - 1):
        pos, known = 0, True
        for t in range(tok_begin[s], tok_begin[s + 1]):
            n = int(byte_len[ids[t]]) if ids[t] < len(byte_len) else -1
            known = known and n >= 0
            starts[t] = pos
            pos += max(n, 0)
            ends[t] = pos
        total[s] = pos if known else -1
    return starts, ends, total


def checksum64(data: bytes) -> int:
    data = bytes(data)
    h = _SEED
    padded = data + b"\0" * (-len(data) % 8)
    for (word,) in struct.iter_unpack("<Q", padded):
        h = ((h ^ word) * _PRIME) & _MASK64
    return ((h ^ len(data)) * _PRIME) & _MASK64


def _align8(x: int) -> int:
    return (x + 7) // 8 * 8


def shard_bytes(tokens, mask, lengths, trained, source_lines) -> bytes:
    tokens = np.asarray(tokens)
    token_bytes = tokens.dtype.itemsize
    n, t = len(lengths), len(tokens)
    mask_offset = _align8(HEADER_BYTES + t * token_bytes)
    index_offset = _align8(mask_offset + t)
    body = bytearray(index_offset + 24 * n - HEADER_BYTES)

    def put(offset, data: bytes):
        body[offset - HEADER_BYTES: offset - HEADER_BYTES + len(data)] = data

    put(HEADER_BYTES, tokens.astype(tokens.dtype.newbyteorder("<")).tobytes())
    put(mask_offset, np.asarray(mask, dtype=np.uint8).tobytes())
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype("<u8") if n else np.zeros(0, "<u8")
    put(index_offset, offsets.tobytes())
    put(index_offset + 8 * n, np.asarray(lengths, "<u4").tobytes())
    put(index_offset + 12 * n, np.asarray(trained, "<u4").tobytes())
    put(index_offset + 16 * n, np.asarray(source_lines, "<u8").tobytes())
    header = MAGIC + struct.pack("<IIQQQQQQ", VERSION, token_bytes, n, t, HEADER_BYTES, mask_offset, index_offset,
                                 checksum64(bytes(body)))
    return header + bytes(body)


def read_shard(data: bytes) -> dict:
    if len(data) < HEADER_BYTES or data[:8] != MAGIC:
        raise ValueError("not a shard")
    version, token_bytes, n, t, tok_off, mask_off, index_off, checksum = struct.unpack_from("<IIQQQQQQ", data, 8)
    if version != VERSION or len(data) != index_off + 24 * n:
        raise ValueError("bad shard")
    dtype = "<u2" if token_bytes == 2 else "<u4"
    return {
        "tokens": np.frombuffer(data, dtype, t, tok_off),
        "mask": np.frombuffer(data, np.uint8, t, mask_off),
        "offsets": np.frombuffer(data, "<u8", n, index_off),
        "lengths": np.frombuffer(data, "<u4", n, index_off + 8 * n),
        "trained": np.frombuffer(data, "<u4", n, index_off + 12 * n),
        "source_lines": np.frombuffer(data, "<u8", n, index_off + 16 * n),
        "checksum": checksum,
    }


def gather(shards: list[dict], ids, shift_labels: bool = False):
    """shards: read_shard() dicts in dataset order; ids: global sample numbers."""
    locations = [(s, i) for s, shard in enumerate(shards) for i in range(len(shard["lengths"]))]
    input_ids, labels, positions, cu = [], [], [], [0]
    for g in ids:
        s, i = locations[g]
        shard = shards[s]
        off, n = int(shard["offsets"][i]), int(shard["lengths"][i])
        toks = shard["tokens"][off:off + n].astype(np.int64)
        input_ids.append(toks)
        unshifted = np.where(shard["mask"][off:off + n] == 1, toks, -100)
        labels.append(np.append(unshifted[1:], -100)[:n] if shift_labels else unshifted)
        positions.append(np.arange(n, dtype=np.int64))
        cu.append(cu[-1] + n)
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
    return cat(input_ids), cat(labels), cat(positions), np.asarray(cu, dtype=np.int32)


# --- Multipack planner: a numba twin of csrc/packing.cpp, decision for decision. ---------
# numba is imported here only, so the library itself never pays its import or JIT time.
import numba  # noqa: E402

_U = np.uint64


@numba.njit(cache=True)
def _splitmix_next(state):
    state[0] += _U(0x9E3779B97F4A7C15)
    z = state[0]
    z = (z ^ (z >> _U(30))) * _U(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U(27))) * _U(0x94D049BB133111EB)
    return z ^ (z >> _U(31))


@numba.njit(cache=True)
def _below(state, n):
    threshold = (_U(0) - n) % n
    while True:
        r = _splitmix_next(state)
        if r >= threshold:
            return r % n


@numba.njit(cache=True)
def _permutation(n, seed, epoch):
    order = np.arange(n)
    state = np.empty(1, np.uint64)
    state[0] = seed
    state[0] = _splitmix_next(state) ^ (epoch * _U(0xD1B54A32D192ED03))
    for i in range(n - 1, 0, -1):
        j = _below(state, _U(i) + _U(1))
        order[i], order[j] = order[j], order[i]
    return order


@numba.njit(cache=True)
def _load_after(load, count, first, length, padded):
    if not padded:
        return load + length
    return (length if count == 0 else first) * (count + 1)


@numba.njit(cache=True)
def _worst_fit(lens, num_bins, cap, padded, load, count, first, bin_of):
    load[:num_bins] = 0
    count[:num_bins] = 0
    first[:num_bins] = 0
    heap = np.arange(num_bins)
    for i in range(len(lens)):
        top = heap[0]
        after = _load_after(load[top], count[top], first[top], lens[i], padded)
        if after > cap:
            return False
        load[top] = after
        if count[top] == 0:
            first[top] = lens[i]
        count[top] += 1
        bin_of[i] = top
        at = 0
        while True:
            left, right, smallest = 2 * at + 1, 2 * at + 2, at
            for child in (left, right):
                if child < num_bins:
                    a, b = heap[child], heap[smallest]
                    if load[a] < load[b] or (load[a] == load[b] and a < b):
                        smallest = child
            if smallest == at:
                break
            heap[at], heap[smallest] = heap[smallest], heap[at]
            at = smallest
    return True


@numba.njit(cache=True)
def _best_fit_by_rank(lens, world_size, m, cap, padded, load, count, first, bin_of):
    load[:world_size * m] = 0
    count[:world_size * m] = 0
    first[:world_size * m] = 0
    rank_load = np.zeros(world_size, np.int64)
    for i in range(len(lens)):
        best_rank, best_bin = -1, -1
        for r in range(world_size):
            if best_rank >= 0 and rank_load[r] >= rank_load[best_rank]:
                continue
            fit, fit_load = -1, 0
            for b in range(r * m, (r + 1) * m):
                after = _load_after(load[b], count[b], first[b], lens[i], padded)
                if after <= cap and (fit < 0 or after > fit_load):
                    fit, fit_load = b, after
            if fit >= 0:
                best_rank, best_bin = r, fit
        if best_bin < 0:
            return False
        after = _load_after(load[best_bin], count[best_bin], first[best_bin], lens[i], padded)
        rank_load[best_rank] += after - load[best_bin]
        load[best_bin] = after
        if count[best_bin] == 0:
            first[best_bin] = lens[i]
        count[best_bin] += 1
        bin_of[i] = best_bin
    return True


@numba.njit(cache=True)
def _plan(lengths, batch, cap, world_size, seed, epoch, padded):
    n_all = len(lengths)
    order = _permutation(n_all, seed, epoch)
    sample_ids = np.empty(n_all, np.int64)
    bin_begin = [0]
    step_bin_begin = [0]
    lower_bounds = []
    bins_cap = 1
    load = np.zeros(bins_cap, np.int64)
    count = np.zeros(bins_cap, np.int64)
    first = np.zeros(bins_cap, np.int64)
    base = 0
    for start in range(0, n_all, batch):
        ids = order[start:min(start + batch, n_all)]
        n = len(ids)
        ids = ids[np.argsort(-lengths[ids], kind="mergesort")]
        lens = lengths[ids]
        tokens = lens.sum()
        lower = max(1, (tokens + world_size * cap - 1) // (world_size * cap))
        bin_of = np.empty(n, np.int64)
        m = lower
        while True:
            if world_size * m > bins_cap:
                bins_cap = world_size * m
                load = np.zeros(bins_cap, np.int64)
                count = np.zeros(bins_cap, np.int64)
                first = np.zeros(bins_cap, np.int64)
            if _worst_fit(lens, world_size * m, cap, padded, load, count, first, bin_of):
                break
            if _best_fit_by_rank(lens, world_size, m, cap, padded, load, count, first, bin_of):
                break
            m += 1
        num_bins = world_size * m
        bin_order = np.empty(num_bins, np.int64)
        for r in range(world_size):
            bin_order[r * m:(r + 1) * m] = r * m + np.argsort(-load[r * m:(r + 1) * m], kind="mergesort")
        slot_of_bin = np.empty(num_bins, np.int64)
        slot_of_bin[bin_order] = np.arange(num_bins)
        fill = np.zeros(num_bins + 1, np.int64)
        for s in range(num_bins):
            fill[s + 1] = fill[s] + count[bin_order[s]]
            bin_begin.append(base + fill[s + 1])
        for i in range(n):
            slot = slot_of_bin[bin_of[i]]
            sample_ids[base + fill[slot]] = ids[i]
            fill[slot] += 1
        base += n
        step_bin_begin.append(step_bin_begin[-1] + num_bins)
        lower_bounds.append(lower)
    return sample_ids, np.array(bin_begin), np.array(step_bin_begin), np.array(lower_bounds)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return _permutation(num_samples, _U(seed), _U(epoch))


def plan_epoch(lengths, effective_batch_size: int, max_batch_len: int, world_size: int, seed: int, epoch: int,
               padded: bool = False):
    """(sample_ids, bin_begin, step_bin_begin, lower_bound), equal to kernels.plan_epoch."""
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if len(lengths) == 0 or world_size < 1 or effective_batch_size < world_size or max_batch_len < 1:
        raise ValueError("settings that cannot be planned")
    if lengths.min() < 0 or lengths.max() > max_batch_len:
        raise ValueError("a sample is longer than max_batch_len")
    return _plan(lengths, effective_batch_size, max_batch_len, world_size, _U(seed), _U(epoch), padded)
