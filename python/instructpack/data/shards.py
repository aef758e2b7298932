"""The on-disk dataset: shard files plus manifest.json. Writing streams chunks into
shards of bounded size; reading memory-maps them through the C++ reader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .. import kernels

FORMAT = "instructpack-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Big enough that a shard is a few hundred MB, small enough to keep offsets and files easy to handle.
DEFAULT_SHARD_TOKENS = 1 << 28


def token_dtype_for(vocab_size: int) -> np.dtype:
    """Token ids are stored as uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class DatasetError(ValueError):
    """A dataset directory that cannot be used; the message names the file and the fix."""


class ShardSequenceWriter:
    """Appends encoded chunks to shard-00000.bin, shard-00001.bin, ... in `directory`,
    starting a new shard when the current one would pass `shard_tokens` tokens."""

    def __init__(self, directory: Path, token_dtype: np.dtype, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        self.directory = Path(directory)
        self.token_bytes = np.dtype(token_dtype).itemsize
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._writer = None

    def append(self, tokens, mask, lengths, trained, source_lines) -> None:
        ends = np.cumsum(lengths, dtype=np.int64)  # token end of each sample in this chunk
        first = 0
        while first < len(lengths):
            used = self._writer.num_tokens if self._writer is not None else 0
            start = int(ends[first - 1]) if first else 0
            last = int(np.searchsorted(ends, start + self.shard_tokens - used, side="right"))
            if last == first:
                if used:  # the next sample does not fit: start a new shard
                    self._finish_shard()
                    continue
                last = first + 1  # one sample above the cap gets a shard of its own
            if self._writer is None:
                self._writer = kernels.ShardWriter(str(self.directory / self._open_name()), self.token_bytes)
            stop = int(ends[last - 1])
            self._writer.append(tokens[start:stop], mask[start:stop], lengths[first:last], trained[first:last],
                                source_lines[first:last])
            first = last

    def _open_name(self) -> str:
        """File name of the shard being written (finished shards are numbered before it)."""
        return f"shard-{len(self.shards):05d}.bin"

    def _finish_shard(self) -> None:
        w = self._writer
        name = self._open_name()
        checksum = w.close()
        self.shards.append({
            "file": name,
            "samples": w.num_samples,
            "tokens": w.num_tokens,
            "bytes": (self.directory / name).stat().st_size,
            "checksum": f"{checksum:016x}",
        })
        self._writer = None

    def close(self) -> list[dict]:
        if self._writer is not None:
            self._finish_shard()
        return self.shards


def write_manifest(directory: Path, manifest: dict) -> None:
    """Written last and fsync'd: a directory with a manifest is a complete dataset."""
    path = Path(directory) / MANIFEST
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found; {directory} is not a preprocessed dataset (run "
                           "instructpack-preprocess, or data_process.main, to make one)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: corrupt manifest ({e}); re-run preprocessing with overwrite") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{path}: not an instructpack manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: format version {manifest.get('format_version')}, this instructpack reads "
                           f"{FORMAT_VERSION}; re-run preprocessing")
    return manifest


class TokenDataset:
    """A preprocessed dataset, memory-mapped. `ds[i]` gives one sample's `input_ids` and
    `labels` (the id where trained, -100 elsewhere; aligned with input_ids, not shifted)."""

    def __init__(self, path: str | Path, verify: bool = False):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        entries = self.manifest.get("shards", [])
        files = []
        for entry in entries:
            f = self.path / entry["file"]
            if not f.is_file():
                raise DatasetError(f"{f}: shard listed in {MANIFEST} is missing; re-run preprocessing")
            if f.stat().st_size != entry["bytes"]:
                raise DatasetError(f"{f}: {f.stat().st_size} bytes, the manifest says {entry['bytes']} "
                                   "(truncated or replaced); re-run preprocessing")
            files.append(str(f))
        self.shards = kernels.ShardSet(files)
        for i, entry in enumerate(entries):
            shard = self.shards.shard(i)
            if (shard.num_samples, shard.num_tokens) != (entry["samples"], entry["tokens"]):
                raise DatasetError(f"{shard.path}: holds {shard.num_samples} samples / {shard.num_tokens} tokens, "
                                   f"the manifest says {entry['samples']} / {entry['tokens']}; re-run preprocessing")
            if verify:
                shard.verify()
                if f"{shard.checksum:016x}" != entry["checksum"]:
                    raise DatasetError(f"{shard.path}: checksum differs from the manifest; re-run preprocessing")
        views = [self.shards.shard(i) for i in range(len(entries))]

        def column(per_shard) -> np.ndarray:
            return np.concatenate([per_shard(v) for v in views]).astype(np.int64) if views else np.zeros(0, np.int64)

        self.lengths = column(lambda v: v.lengths)
        self.trained_counts = column(lambda v: v.trained)
        self.source_lines = column(lambda v: v.source_lines)
        # A sample's first token has nothing before it to predict it from, so a trained
        # first token is not a target of the shifted loss.
        self.target_counts = self.trained_counts - column(_first_token_trained)

    def __len__(self) -> int:
        return len(self.lengths)

    # Data-loader workers that are spawned get the path and map the shards themselves;
    # a memory map cannot travel through pickle, and re-mapping is O(1) per shard.
    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for a dataset of {n} samples")
        input_ids, labels, _, _ = kernels.gather(self.shards, np.array([i % n]))
        return {"input_ids": input_ids, "labels": labels}

    def gather(self, ids, shift_labels: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Samples `ids` concatenated: input_ids, labels, position_ids, cu_seqlens. With
        `shift_labels`, labels[t] is the target of position t (see kernels.gather)."""
        return kernels.gather(self.shards, np.asarray(ids, dtype=np.int64), shift_labels)

    def verify(self) -> None:
        """Full integrity check (reads every byte): checksums and indexes of all shards."""
        TokenDataset(self.path, verify=True)


def _first_token_trained(shard) -> np.ndarray:
    trained = np.zeros(shard.num_samples, np.int64)
    present = shard.lengths > 0
    trained[present] = shard.mask[shard.offsets[present].astype(np.int64)]
    return trained


def load_dataset(path: str | Path, verify: bool = False) -> TokenDataset:
    """Opens a preprocessed dataset directory (O(1) in its size unless `verify`)."""
    return TokenDataset(path, verify=verify)
