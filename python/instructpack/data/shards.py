"""The on-disk dataset: shard files plus manifest.json. Writing streams chunks into
shards of bounded size; reading memory-maps them through the C++ reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import kernels
from ..fileio import write_synced

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
    write_synced(Path(directory) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found; {directory} is not a preprocessed dataset (run "
                           "instructpack-preprocess, or data_process.main, to make one)") from None
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a number past int's digit limit, deep nesting
        raise DatasetError(f"{path}: corrupt manifest ({e}); re-run preprocessing with overwrite") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{path}: not an instructpack manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: format version {manifest.get('format_version')}, this instructpack reads "
                           f"{FORMAT_VERSION}; re-run preprocessing")
    return manifest


_FIX = "re-run preprocessing (with overwrite) to rebuild the dataset"


def _manifest_error(manifest_path: Path, what: str) -> DatasetError:
    return DatasetError(f"{manifest_path}: {what}; the manifest is damaged or was edited: {_FIX}")


def _count(manifest_path: Path, where: str, value) -> int:
    # bool is an int in Python, and "12" or 1.5 would only fail later, in arithmetic.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _manifest_error(manifest_path, f"{where} is {value!r}, expected a non-negative integer")
    return value


def _shard_entries(manifest: dict, manifest_path: Path) -> list[dict]:
    """The manifest's shard list, every field checked for type and every file name for
    being a plain name, so that no manifest can make the reader open a file elsewhere."""
    entries = manifest.get("shards")
    if not isinstance(entries, list) or not entries:
        raise _manifest_error(manifest_path, f'"shards" is {entries!r}, expected a non-empty list of shard entries')
    seen = set()
    for i, entry in enumerate(entries):
        where = f"shards[{i}]"
        if not isinstance(entry, dict):
            raise _manifest_error(manifest_path, f"{where} is {entry!r}, expected an object")
        missing = [k for k in ("file", "samples", "tokens", "bytes", "checksum") if k not in entry]
        if missing:
            raise _manifest_error(manifest_path, f"{where} lacks {', '.join(missing)}")
        name = entry["file"]
        if not isinstance(name, str) or name in ("", ".", "..") or "\0" in name or Path(name).name != name:
            raise _manifest_error(manifest_path, f"{where}.file is {name!r}, expected the name of a file in "
                                  f"{manifest_path.parent} (no directories)")
        if name in seen:
            raise _manifest_error(manifest_path, f"{where}.file {name!r} is listed twice")
        seen.add(name)
        for key in ("samples", "tokens", "bytes"):
            _count(manifest_path, f"{where}.{key}", entry[key])
        if not isinstance(entry["checksum"], str):
            raise _manifest_error(manifest_path, f"{where}.checksum is {entry['checksum']!r}, expected a hex string")
    return entries


def _check_counts(manifest: dict, entries: list[dict], manifest_path: Path) -> None:
    """The totals preprocessing reports (synthetic datasets have none) against the shards."""
    counts = manifest.get("counts")
    if counts is None:
        return
    for key in ("samples", "tokens"):
        total = sum(e[key] for e in entries)
        value = counts.get(key) if isinstance(counts, dict) else None
        if value != total or isinstance(value, bool):
            raise _manifest_error(manifest_path, f"counts.{key} is {value!r}, the shards hold {total}")


def _vocab_size(manifest: dict, manifest_path: Path) -> int:
    tokenizer = manifest.get("tokenizer")
    value = tokenizer.get("vocab_size") if isinstance(tokenizer, dict) else None
    if _count(manifest_path, "tokenizer.vocab_size", value) == 0:
        raise _manifest_error(manifest_path, "tokenizer.vocab_size is 0")
    return value


def _shard_error(e: Exception) -> DatasetError:
    """The C++ reader's message names the shard and the problem; add the fix."""
    message = str(e)
    return DatasetError(message if "re-run preprocessing" in message else f"{message}; {_FIX}")


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
        entries = _shard_entries(self.manifest, manifest_path)
        self.vocab_size = _vocab_size(self.manifest, manifest_path)
        token_bytes = token_dtype_for(self.vocab_size).itemsize
        files = []
        for entry in entries:
            f = self.path / entry["file"]
            if not f.is_file():
                raise DatasetError(f"{f}: shard listed in {MANIFEST} is missing; {_FIX}")
            if f.resolve().parent != self.path.resolve():  # a link out of the dataset, like "../x" in the manifest
                raise DatasetError(f"{f}: a link to {f.resolve()}, outside the dataset; a dataset's shards are files "
                                   f"inside its directory; {_FIX}")
            if f.stat().st_size != entry["bytes"]:
                raise DatasetError(f"{f}: {f.stat().st_size} bytes, the manifest says {entry['bytes']} "
                                   f"(truncated or replaced); {_FIX}")
            files.append(str(f))
        try:
            self.shards = kernels.ShardSet(files)
        except kernels.ShardError as e:
            raise _shard_error(e) from None
        for i, entry in enumerate(entries):
            shard = self.shards.shard(i)
            if (shard.num_samples, shard.num_tokens) != (entry["samples"], entry["tokens"]):
                raise DatasetError(f"{shard.path}: holds {shard.num_samples} samples / {shard.num_tokens} tokens, "
                                   f"the manifest says {entry['samples']} / {entry['tokens']}; {_FIX}")
            if shard.token_bytes != token_bytes:
                raise DatasetError(f"{shard.path}: {shard.token_bytes}-byte token ids, but a vocabulary of "
                                   f"{self.vocab_size} (tokenizer.vocab_size in {MANIFEST}) has {token_bytes}-byte "
                                   f"ones; {_FIX}")
            _check_index(shard)
            if verify:
                try:
                    shard.verify()
                except kernels.ShardError as e:
                    raise _shard_error(e) from None
                if f"{shard.checksum:016x}" != entry["checksum"]:
                    raise DatasetError(f"{shard.path}: checksum differs from the manifest; {_FIX}")
        _check_counts(self.manifest, entries, manifest_path)
        views = [self.shards.shard(i) for i in range(len(entries))]
        self._shard_files = [entry["file"] for entry in entries]
        self._shard_begin = np.cumsum([0] + [entry["samples"] for entry in entries])

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
                               f"verify=True) checks every shard); {_FIX}")
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
                           f"{shard.lengths[i]}, trained {shard.trained[i]}); {_FIX}")
    total = int(ends[-1]) if len(ends) else 0
    if total != shard.num_tokens:
        raise DatasetError(f"{shard.path}: corrupt shard index (sample lengths add up to {total} tokens, the "
                           f"header says {shard.num_tokens}); {_FIX}")


def _first_token_trained(shard) -> np.ndarray:
    trained = np.zeros(shard.num_samples, np.int64)
    present = shard.lengths > 0
    trained[present] = shard.mask[shard.offsets[present].astype(np.int64)] != 0
    return trained


def load_dataset(path: str | Path, verify: bool = False) -> TokenDataset:
    """Opens a preprocessed dataset directory: O(samples), never reading the tokens, unless
    `verify`. Raises DatasetError naming the file and the problem."""
    return TokenDataset(path, verify=verify)
