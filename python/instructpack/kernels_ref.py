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


def gather(shards: list[dict], ids):
    """shards: read_shard() dicts in dataset order; ids: global sample numbers."""
    locations = [(s, i) for s, shard in enumerate(shards) for i in range(len(shard["lengths"]))]
    input_ids, labels, positions, cu = [], [], [], [0]
    for g in ids:
        s, i = locations[g]
        shard = shards[s]
        off, n = int(shard["offsets"][i]), int(shard["lengths"][i])
        toks = shard["tokens"][off:off + n].astype(np.int64)
        input_ids.append(toks)
        labels.append(np.where(shard["mask"][off:off + n] == 1, toks, -100))
        positions.append(np.arange(n, dtype=np.int64))
        cu.append(cu[-1] + n)
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
    return cat(input_ids), cat(labels), cat(positions), np.asarray(cu, dtype=np.int32)
