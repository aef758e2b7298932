"""Typed stub of the C++ extension (csrc/bindings.cpp)."""

import numpy as np

from .errors import DatasetError

class ShardError(DatasetError): ...

def label_mask(starts: np.ndarray, ends: np.ndarray, tok_begin: np.ndarray, span_starts: np.ndarray,
               span_ends: np.ndarray, span_begin: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
def checksum64(data: bytes | np.ndarray) -> int: ...
def token_byte_offsets(ids: np.ndarray, tok_begin: np.ndarray, byte_len: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

class ShardWriter:
    def __init__(self, path: str, token_bytes: int) -> None: ...
    num_samples: int
    num_tokens: int
    token_bytes: int
    def append(self, tokens: np.ndarray, mask: np.ndarray, lengths: np.ndarray, trained: np.ndarray,
               source_lines: np.ndarray) -> None: ...
    def close(self) -> int: ...

class Shard:
    def __init__(self, path: str) -> None: ...
    path: str
    num_samples: int
    num_tokens: int
    token_bytes: int
    checksum: int
    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    trained: np.ndarray
    source_lines: np.ndarray
    def verify(self) -> None: ...

class ShardSet:
    def __init__(self, paths: list[str]) -> None: ...
    num_samples: int
    num_shards: int
    def shard(self, i: int) -> Shard: ...
    def gather(self, ids: np.ndarray, shift_labels: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...

def plan_epoch(lengths: np.ndarray, effective_batch_size: int, max_batch_len: int, world_size: int, seed: int,
               epoch: int, padded: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray: ...
