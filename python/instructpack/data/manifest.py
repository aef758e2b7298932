"""manifest.json: what a dataset directory holds, as a typed document.

Preprocessing (or the synthetic writer) writes it last and atomically (data/writing.py): a
directory with a manifest is a complete dataset. `read_manifest` is the one reader: it checks the format,
every field's type and range (the Structs below), and that every shard is named by a plain
file name, so that no manifest can make the reader open a file elsewhere. How the manifest
relates to the shard files themselves (sizes, counts, checksums) is checked by
`shards.TokenDataset` when it opens them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import msgspec

from ..documents import DocumentError, convert_document
from ..errors import DatasetError

FORMAT = "instructpack-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FIX = "re-run preprocessing (with overwrite) to rebuild the dataset"

Count = Annotated[int, msgspec.Meta(ge=0, description="a non-negative integer")]


class ShardEntry(msgspec.Struct, kw_only=True):
    file: str  # a plain file name inside the dataset directory
    samples: Count
    tokens: Count
    bytes: Count
    checksum: Annotated[str, msgspec.Meta(description="a hex string")]  # of the whole file (csrc/shards.h)


class TokenizerInfo(msgspec.Struct, kw_only=True):
    vocab_size: Annotated[int, msgspec.Meta(ge=1, description="a positive integer")]  # ids are < vocab_size
    path: str | None = None
    fingerprint: str | None = None  # data/chat.py tokenizer_identity
    token_dtype: str | None = None


class ChatTemplateInfo(msgspec.Struct, kw_only=True):
    path: str | None  # None: the tokenizer's own template
    fingerprint: str


class SourceInfo(msgspec.Struct, kw_only=True):
    path: str
    lines: Count
    sha256: str


class Settings(msgspec.Struct, kw_only=True):
    max_seq_len: int
    min_seq_len: int | None  # None: InstructLab's rule (data/encode.py)
    skip_invalid_lines: bool


class Counts(msgspec.Struct, kw_only=True):
    samples: Count
    tokens: Count
    trained_tokens: Count
    dropped: dict[str, int]  # reason -> samples (data/encode.py DROP_REASONS)
    invalid_lines: Count
    invalid_reasons: dict[str, int]  # kind -> lines


class LengthStats(msgspec.Struct, kw_only=True):
    min: int
    mean: float
    p50: int
    p90: int
    p99: int
    max: int


class SyntheticInfo(msgspec.Struct, kw_only=True):
    seed: int
    trained: str  # "all" or "runs" (data/synthetic.py)


class PretrainingInfo(msgspec.Struct, kw_only=True):
    block_size: int  # samples are blocks of this many tokens (data/pretraining.py)
    document_column_name: str
    documents: Count


class ImportInfo(msgspec.Struct, kw_only=True):
    format: str  # what the shards were converted from (data/instructlab_jsonl.py)


class Manifest(msgspec.Struct, kw_only=True):
    """Preprocessed datasets fill every field; synthetic ones have `synthetic` instead of
    source, chat template, settings, counts and lengths; imported ones (InstructLab's
    data.jsonl) have `imported` instead of chat template and settings."""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    shards: Annotated[list[ShardEntry], msgspec.Meta(min_length=1, description="a non-empty list of shard entries")]
    tokenizer: TokenizerInfo
    source: SourceInfo | None = None
    chat_template: ChatTemplateInfo | None = None
    settings: Settings | None = None
    counts: Counts | None = None
    lengths: LengthStats | None = None
    fingerprint: str | None = None  # preprocessing's reuse key (data/preprocess.py)
    elapsed_s: float | None = None
    synthetic: SyntheticInfo | None = None
    imported: ImportInfo | None = None
    pretraining: PretrainingInfo | None = None  # samples are blocks of documents


def encode_manifest(manifest: Manifest) -> bytes:
    """The file's bytes; data/writing.py writes them, last and atomically: a directory with
    a manifest is a complete dataset."""
    return msgspec.json.format(msgspec.json.encode(manifest)) + b"\n"


def manifest_error(manifest_path: Path, what: str) -> DatasetError:
    return DatasetError(f"{manifest_path}: {what}; the manifest is damaged or was edited: {FIX}")


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found; {directory} is not a preprocessed dataset (run "
                           "instructpack-preprocess, or data_process.main, to make one)") from None
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a number past int's digit limit, deep nesting
        raise DatasetError(f"{path}: corrupt manifest ({e}); re-run preprocessing with overwrite") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DatasetError(f"{path}: not an instructpack manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: format version {data.get('format_version')}, this instructpack reads "
                           f"{FORMAT_VERSION}; re-run preprocessing")
    try:
        manifest = convert_document(data, Manifest)
    except DocumentError as e:
        raise manifest_error(path, str(e)) from None
    seen = set()
    for i, entry in enumerate(manifest.shards):
        name = entry.file
        if name in ("", ".", "..") or "\0" in name or Path(name).name != name:
            raise manifest_error(path, f"shards[{i}].file is {name!r}, expected the name of a file in {path.parent} "
                                       "(no directories)")
        if name in seen:
            raise manifest_error(path, f"shards[{i}].file {name!r} is listed twice")
        seen.add(name)
    return manifest
