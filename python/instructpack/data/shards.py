"""The on-disk dataset: shard files plus manifest.json (manifest.py). Writing streams
chunks into shards of bounded size; reading memory-maps them through the C++ reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import kernels
from ..errors import DatasetError
from .manifest import FIX, MANIFEST, Manifest, ShardEntry, manifest_error, read_manifest

# Big enough that a shard is a few hundred MB, small enough to keep offsets and files easy to handle.
DEFAULT_SHARD_TOKENS = 1 << 28


def token_dtype_for(vocab_size: int) -> np.dtype:
    """Token ids are stored as uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ShardSequenceWriter:
    """Appends encoded chunks to shards in `directory`, starting a new shard when the current
    one would pass `shard_tokens` tokens; `shard_name(i)` names the i-th (writing.py)."""

    def __init__(self, directory: Path, token_dtype: np.dtype, shard_name, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        self.directory = Path(directory)
        self.shard_name = shard_name
        self.token_bytes = np.dtype(token_dtype).itemsize
        self.shard_tokens = shard_tokens
        self.shards: list[ShardEntry] = []
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
        return self.shard_name(len(self.shards))

    def _finish_shard(self) -> None:
        w = self._writer
        name = self._open_name()
        checksum = w.close()
        self.shards.append(ShardEntry(file=name, samples=w.num_samples, tokens=w.num_tokens,
                                      bytes=(self.directory / name).stat().st_size, checksum=f"{checksum:016x}"))
        self._writer = None

    def close(self) -> list[ShardEntry]:
        if self._writer is not None:
            self._finish_shard()
        return self.shards


def _check_counts(manifest: Manifest, manifest_path: Path) -> None:
    """The totals preprocessing reports (synthetic datasets have none) against the shards."""
    if manifest.counts is None:
        return
    for key in ("samples", "tokens"):
        total = sum(getattr(e, key) for e in manifest.shards)
        value = getattr(manifest.counts, key)
        if value != total:
            raise manifest_error(manifest_path, f"counts.{key} is {value!r}, the shards hold {total}")


def _shard_error(e: Exception) -> DatasetError:
    """The C++ reader's message names the shard and the problem; add the fix."""
    message = str(e)
    return DatasetError(message if "re-run preprocessing" in message else f"{message}; {FIX}")


class TokenDataset:
    """A preprocessed dataset, memory-mapped. `ds[i]` gives one sample's `input_ids` and
    `labels` (the id where trained, -100 elsewhere; aligned with input_ids, not shifted).

    Opening checks the manifest, each shard's header and size, and each shard's index
    (O(samples), never reading the tokens), so that reads stay inside the files whatever
    the bytes; `verify` also checks every byte against the checksums. Token ids are checked
    against the vocabulary when read, since corrupt ones would only fail later, on the GPU."""

    def __init__(self, path: str | Path, verify: bool = False):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        manifest_path = self.path / MANIFEST
        entries = self.manifest.shards
        self.vocab_size = self.manifest.tokenizer.vocab_size
        token_bytes = token_dtype_for(self.vocab_size).itemsize
        files = []
        for entry in entries:
            f = self.path / entry.file
            if not f.is_file():
                raise DatasetError(f"{f}: shard listed in {MANIFEST} is missing; {FIX}")
            if f.resolve().parent != self.path.resolve():  # a link out of the dataset, like "../x" in the manifest
                raise DatasetError(f"{f}: a link to {f.resolve()}, outside the dataset; a dataset's shards are files "
                                   f"inside its directory; {FIX}")
            if f.stat().st_size != entry.bytes:
                raise DatasetError(f"{f}: {f.stat().st_size} bytes, the manifest says {entry.bytes} "
                                   f"(truncated or replaced); {FIX}")
            files.append(str(f))
        try:
            self.shards = kernels.ShardSet(files)
        except kernels.ShardError as e:
            raise _shard_error(e) from None
        for i, entry in enumerate(entries):
            shard = self.shards.shard(i)
            if (shard.num_samples, shard.num_tokens) != (entry.samples, entry.tokens):
                raise DatasetError(f"{shard.path}: holds {shard.num_samples} samples / {shard.num_tokens} tokens, "
                                   f"the manifest says {entry.samples} / {entry.tokens}; {FIX}")
            if shard.token_bytes != token_bytes:
                raise DatasetError(f"{shard.path}: {shard.token_bytes}-byte token ids, but a vocabulary of "
                                   f"{self.vocab_size} (tokenizer.vocab_size in {MANIFEST}) has {token_bytes}-byte "
                                   f"ones; {FIX}")
            _check_index(shard)
            if verify:
                try:
                    shard.verify()
                except kernels.ShardError as e:
                    raise _shard_error(e) from None
                if f"{shard.checksum:016x}" != entry.checksum:
                    raise DatasetError(f"{shard.path}: checksum differs from the manifest; {FIX}")
        _check_counts(self.manifest, manifest_path)
        views = [self.shards.shard(i) for i in range(len(entries))]
        self._shard_files = [entry.file for entry in entries]
        self._shard_begin = np.cumsum([0] + [entry.samples for entry in entries])

        def column(per_shard) -> np.ndarray:
            return np.concatenate([per_shard(v) for v in views]).astype(np.int64)

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
        input_ids, labels, _, _ = self.gather([i % n])
        return {"input_ids": input_ids, "labels": labels}

    def gather(self, ids, shift_labels: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Samples `ids` concatenated: input_ids, labels, position_ids, cu_seqlens. With
        `shift_labels`, labels[t] is the target of position t (see kernels.gather)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = kernels.gather(self.shards, ids, shift_labels)
        input_ids, cu_seqlens = out[0], out[3]
        # One pass over the batch: an id outside the vocabulary (corrupt token bytes, which
        # only verify() finds at open) would otherwise fail as an opaque device-side error.
        if len(input_ids) and int(input_ids.max()) >= self.vocab_size:
            t = int(input_ids.argmax())
            sample = int(ids[np.searchsorted(cu_seqlens, t, side="right") - 1])
            shard = self._shard_files[np.searchsorted(self._shard_begin, sample, side="right") - 1]
            raise DatasetError(f"{self.path / shard}: sample {sample} holds token id {input_ids[t]}, outside the "
                               f"vocabulary of {self.vocab_size} ids; the shard is corrupt (load_dataset(path, "
                               f"verify=True) checks every shard); {FIX}")
        return out

    def verify(self) -> None:
        """Full integrity check (reads every byte): checksums and indexes of all shards."""
        TokenDataset(self.path, verify=True)


def _check_index(shard) -> None:
    """O(samples), the index only: offsets contiguous, trained <= length, lengths adding up
    to the shard's tokens. The C++ reader bounds-checks every read anyway; this makes a
    corrupt index fail at open, before its lengths feed the sampler and its offsets index
    the mask below."""
    lengths = shard.lengths.astype(np.uint64)
    ends = np.cumsum(lengths)  # wraps only past 2**64 tokens: the bounds checks on reads still hold
    bad = (shard.offsets != ends - lengths) | (shard.trained > shard.lengths)
    if bad.any():
        i = int(bad.argmax())
        raise DatasetError(f"{shard.path}: corrupt shard index at sample {i} (offset {shard.offsets[i]}, length "
                           f"{shard.lengths[i]}, trained {shard.trained[i]}); {FIX}")
    total = int(ends[-1]) if len(ends) else 0
    if total != shard.num_tokens:
        raise DatasetError(f"{shard.path}: corrupt shard index (sample lengths add up to {total} tokens, the "
                           f"header says {shard.num_tokens}); {FIX}")


def _first_token_trained(shard) -> np.ndarray:
    trained = np.zeros(shard.num_samples, np.int64)
    present = shard.lengths > 0
    trained[present] = shard.mask[shard.offsets[present].astype(np.int64)] != 0
    return trained


def load_dataset(path: str | Path, verify: bool = False) -> TokenDataset:
    """Opens a preprocessed dataset directory: O(samples), never reading the tokens, unless
    `verify`. Raises DatasetError naming the file and the problem."""
    return TokenDataset(path, verify=verify)
