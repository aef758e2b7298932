"""The preprocessing pipeline: messages JSONL -> chat template -> tokens -> trained masks ->
token shards. `data_process.main` (the InstructLab entry point) and the
`instructpack-preprocess` command call `preprocess`. Nothing here imports torch.

The pipeline streams: the input is read in chunks, workers (processes) render, tokenize
and mask each chunk, and the results are appended to shards in input order, so memory
does not grow with the input. The dataset is written into its directory beside anything
else there, its manifest last (data/writing.py): an interrupted run never leaves a dataset
that looks whole, and never touches what was there.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import locks
from ..config import DataProcessArgs
from ..errors import (
    ChatTemplateError,
    ConfigError,
    InputError,
    InstructPackError,
    PathExistsError,
    PathNotFoundError,
    WriteError,
)
from ..fileio import lies_inside
from . import encode
from .chat import TokenizerFiles, load_tokenizer_files
from .manifest import (
    FORMAT_VERSION,
    ChatTemplateInfo,
    Counts,
    LengthStats,
    Manifest,
    Settings,
    SourceInfo,
    TokenizerInfo,
)
from .shards import ShardSequenceWriter, token_dtype_for
from .writing import DatasetWrite, dataset_write, existing_manifest

PREPROCESS_LOCK = ".instructpack-preprocess.lock"  # in the output directory while one writes
PREPROCESS_WAIT_S = 2 * 3600.0
CHUNK_LINES = 256
CHUNK_BYTES = 1 << 20
MAX_REPORTED_INVALID = 20


@dataclass
class PreprocessResult:
    output_path: Path
    manifest: Manifest
    reused: bool = False
    invalid_examples: list = field(default_factory=list)

    def summary(self) -> str:
        return format_summary(self.manifest, self.output_path, self.reused)


@dataclass(frozen=True)
class PreprocessPlan:
    """What `preprocess` will do, decided before anything is written: the input (checked),
    the tokenizer and template, and the fingerprint that the output's manifest records (an
    existing output with the same one is reused)."""
    args: DataProcessArgs
    data_path: Path
    output_path: Path
    files: TokenizerFiles
    input_sha256: str
    fingerprint: str
    existing: Manifest | None  # the dataset already in output_path

    @property
    def reusable(self) -> bool:
        return self.existing is not None and self.existing.fingerprint == self.fingerprint and not self.args.overwrite


def plan_preprocessing(args: DataProcessArgs) -> PreprocessPlan:
    """Checks the input, the output directory, the tokenizer and the template; writes nothing."""
    data_path, out = check_paths(args)
    files = load_tokenizer_files(args.model_path, args.chat_tmpl_path)
    with open(data_path, "rb") as f:
        input_sha = hashlib.file_digest(f, "sha256").hexdigest()
    h = hashlib.sha256()
    for part in (FORMAT_VERSION, input_sha, files.fingerprint, files.template_fingerprint, args.max_seq_len,
                 args.min_seq_len, args.skip_invalid_lines):
        h.update(f"{part}\0".encode())
    return PreprocessPlan(args, data_path, out, files, input_sha, h.hexdigest()[:24],
                          existing_manifest(out) if out.is_dir() else None)


def preprocess(args: DataProcessArgs, progress: bool | None = None, shard_tokens: int | None = None
               ) -> PreprocessResult:
    """Preprocesses `args.data_path` into `args.data_output_path`; reuses a matching output.
    With `args.pretraining`, the lines are documents (data/pretraining.py)."""
    if args.pretraining is not None:
        from .pretraining import preprocess_documents

        return preprocess_documents(args, args.pretraining, progress=progress)
    return run_preprocessing(plan_preprocessing(args), progress=progress, shard_tokens=shard_tokens)


def run_preprocessing(plan: PreprocessPlan, progress: bool | None = None, shard_tokens: int | None = None
                      ) -> PreprocessResult:
    """Writes the dataset, or reuses the one there. One preprocessing per directory at a time
    (another run's, another machine's): a second one waits for the first (up to
    INSTRUCTPACK_PREPROCESS_WAIT_S seconds, default 2 hours), then reuses what it made."""
    if plan.reusable:
        return PreprocessResult(plan.output_path, plan.existing, reused=True)
    return write_dataset(plan.output_path, plan.fingerprint, plan.args.overwrite, f"preprocessing of {plan.data_path}",
                         lambda write: _process(plan, write, progress, shard_tokens))


def write_dataset(out: Path, fingerprint: str, overwrite: bool, what: str, make) -> PreprocessResult:
    """Under the directory's preprocessing lock: the dataset already there when its
    fingerprint matches (unless `overwrite`), else `make(write)` -> (manifest, invalid
    examples) written atomically (writing.py). An OSError is a WriteError saying that what
    was there is intact."""
    start = time.perf_counter()
    wait_s = float(os.environ.get("INSTRUCTPACK_PREPROCESS_WAIT_S", PREPROCESS_WAIT_S))
    try:
        with locks.exclusive(out / PREPROCESS_LOCK, locks.holder_note(what), wait_s=wait_s,
                             waiting=f"preprocessing into {out}"):
            existing = existing_manifest(out)  # what a preprocessing we waited for made
            if existing is not None and existing.fingerprint == fingerprint and not overwrite:
                return PreprocessResult(out, existing, reused=True)
            with dataset_write(out) as write:
                manifest, invalid_examples = make(write)
                manifest.fingerprint = fingerprint
                manifest.elapsed_s = round(time.perf_counter() - start, 3)
                write.commit(manifest)
    except OSError as e:
        if isinstance(e, InstructPackError):
            raise
        raise WriteError(f"could not write the dataset into {out}: {e}; what was there is intact. Free space on "
                         "that disk or choose another data_output_path") from e
    finally:
        with contextlib.suppress(OSError):
            out.rmdir()  # only if it is empty: a first preprocessing that failed leaves nothing
    return PreprocessResult(out, manifest, invalid_examples=invalid_examples)


def check_paths(args: DataProcessArgs) -> tuple[Path, Path]:
    """The input file and the output directory, checked: (data_path, data_output_path)."""
    data_path, out = Path(args.data_path), Path(args.data_output_path)
    check_input(data_path, args.data_path)
    if out.exists() and not out.is_dir():
        raise PathExistsError("", ("data_output_path",), "is a file; give a directory path", args.data_output_path)
    if lies_inside(data_path, out):
        raise ConfigError("", ("data_path",), f"lies inside data_output_path ({out}): keep the input outside the "
                          "directory the dataset is written to", args.data_path)
    return data_path, out


def check_input(data_path: Path, given: str) -> None:
    if data_path.is_dir():
        raise PathNotFoundError("", ("data_path",), "is a directory; give a messages-format JSONL file", given)
    if not data_path.is_file():
        raise PathNotFoundError("", ("data_path",), "no such file; give a messages-format JSONL file", given)
    with open(data_path, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip() and len(head) < 1 << 16:  # nothing but whitespace
        raise InputError(str(data_path), None, "the file is empty (no samples); give a messages-format JSONL "
                             "file with one conversation per line")


def _read_chunks(f, first_line: int = 1):
    """Yields (first line number, [raw lines]) chunks of bounded size."""
    lines, size, start = [], 0, first_line
    for raw in f:
        lines.append(raw)
        size += len(raw)
        if len(lines) >= CHUNK_LINES or size >= CHUNK_BYTES:
            yield start, lines
            start += len(lines)
            lines, size = [], 0
    if lines:
        yield start, lines


def _worker_count(requested: int) -> int:
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    return max(1, min(requested, available))


def _encoded_chunks(args: DataProcessArgs, files: TokenizerFiles, f, workers: int):
    """Encoded chunks in input order; with several workers, at most a few chunks are in
    flight, so memory stays bounded whatever the input size."""
    # Built here, before any fork: workers inherit the loaded tokenizer and template code.
    encoder = encode.ChunkEncoder(files, args.max_seq_len, args.min_seq_len)
    if workers == 1:
        for first, lines in _read_chunks(f):
            yield encoder.encode(first, lines)
        return
    # fork: no re-import of the caller's __main__ (scripts without a main guard work).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(workers, initializer=encode.init_worker, initargs=(encoder,)) as pool:
        pending: collections.deque = collections.deque()
        for first, lines in _read_chunks(f):
            pending.append(pool.apply_async(encode.encode_in_worker, (first, lines)))
            if len(pending) >= 2 * workers + 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _process(plan: PreprocessPlan, write: DatasetWrite, progress: bool | None, shard_tokens: int | None
             ) -> tuple[Manifest, list]:
    args, data_path, files = plan.args, plan.data_path, plan.files
    token_dtype = token_dtype_for(files.vocab_size)
    writer = ShardSequenceWriter(write.directory, token_dtype, write.shard_name,
                                 **({"shard_tokens": shard_tokens} if shard_tokens else {}))
    dropped = collections.Counter()
    invalid_reasons = collections.Counter()
    invalid_examples: list = []
    lengths_seen: list[np.ndarray] = []
    lines = tokens = trained_tokens = 0
    bar = _progress_bar(progress)
    with open(data_path, "rb") as f:
        for chunk in _encoded_chunks(args, files, f, _worker_count(args.num_cpu_procs)):
            for line, kind, reason in chunk.invalid:
                if not args.skip_invalid_lines:
                    raise InputError(str(data_path), line, reason + _SKIP_HINT)
                invalid_reasons[kind] += 1
                if len(invalid_examples) < MAX_REPORTED_INVALID:
                    invalid_examples.append(f"{data_path}:{line}: {reason}")
            writer.append(chunk.tokens, chunk.mask, chunk.lengths, chunk.trained, chunk.source_lines)
            dropped.update(chunk.dropped)
            lengths_seen.append(chunk.lengths)
            lines += chunk.lines
            tokens += int(chunk.lengths.sum())
            trained_tokens += int(chunk.trained.sum())
            if bar is not None:
                bar.update(chunk.lines)
    if bar is not None:
        bar.close()
    shards = writer.close()
    lengths = np.concatenate(lengths_seen) if lengths_seen else np.zeros(0, np.uint32)
    samples = int(sum(s.samples for s in shards))
    if samples == 0 and invalid_reasons and set(invalid_reasons) == {"chat_template"}:
        raise ChatTemplateError(f"{files.template_source} rejected every line of {data_path} "
                                f"({invalid_reasons['chat_template']:,} lines; the first: {invalid_examples[0]}): the "
                                "template is at fault, not the data: fix it, or give another with chat_tmpl_path")
    if samples == 0:
        raise InputError(str(data_path), None, f"no sample was kept (dropped: {dict(dropped) or 'none'}, invalid "
                         f"lines: {sum(invalid_reasons.values())}); check max_seq_len and that samples have assistant "
                         "turns")
    manifest = Manifest(
        source=SourceInfo(path=str(data_path.resolve()), lines=lines, sha256=plan.input_sha256),
        tokenizer=TokenizerInfo(path=str(Path(args.model_path).resolve()), fingerprint=files.fingerprint,
                                vocab_size=files.vocab_size, token_dtype=token_dtype.name),
        chat_template=ChatTemplateInfo(path=args.chat_tmpl_path, fingerprint=files.template_fingerprint),
        settings=Settings(max_seq_len=args.max_seq_len, min_seq_len=args.min_seq_len,
                          skip_invalid_lines=args.skip_invalid_lines),
        counts=Counts(samples=samples, tokens=tokens, trained_tokens=trained_tokens,
                      dropped={r: dropped.get(r, 0) for r in encode.DROP_REASONS},
                      invalid_lines=sum(invalid_reasons.values()), invalid_reasons=dict(invalid_reasons)),
        lengths=length_stats(lengths),
        shards=shards,
    )
    return manifest, invalid_examples


_SKIP_HINT = " (fix the line, or set skip_invalid_lines / --skip-invalid-lines to skip bad lines and report them)"


def length_stats(lengths: np.ndarray) -> LengthStats:
    q = np.percentile(lengths, [50, 90, 99])
    return LengthStats(min=int(lengths.min()), mean=round(float(lengths.mean()), 1), p50=int(q[0]), p90=int(q[1]),
                       p99=int(q[2]), max=int(lengths.max()))


def _progress_bar(progress: bool | None):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(desc="preprocessing", unit=" lines", file=sys.stderr)


def format_summary(manifest: Manifest, output_path: Path, reused: bool = False) -> str:
    c = manifest.counts
    d = c.dropped
    made = f"{'reused' if reused else 'wrote'} {output_path} ({len(manifest.shards)} shard(s))"
    if manifest.imported is not None:
        made += f", converted from {manifest.source.path} ({manifest.imported.format})"
    lines = [
        made,
        f"  samples kept     {c.samples:>12,}",
        f"  dropped          {sum(d.values()):>12,}  " + ", ".join(f"{k}: {v:,}" for k, v in d.items()),
        f"  invalid lines    {c.invalid_lines:>12,}"
        + ("  " + ", ".join(f"{k}: {v:,}" for k, v in c.invalid_reasons.items()) if c.invalid_reasons else ""),
        f"  tokens           {c.tokens:>12,}",
        f"  trained tokens   {c.trained_tokens:>12,}  ({c.trained_tokens / max(1, c.tokens):.1%})",
    ]
    if manifest.pretraining is not None:
        p = manifest.pretraining
        lines.append(f"  documents        {p.documents:>12,}  in blocks of {p.block_size:,} tokens")
    if manifest.lengths is not None:
        s = manifest.lengths
        lines.append(f"  length           min {s.min}, p50 {s.p50}, p90 {s.p90}, p99 {s.p99}, max {s.max}, "
                     f"mean {s.mean}")
    if manifest.elapsed_s is not None and not reused:
        secs = manifest.elapsed_s
        lines.append(f"  time             {secs:.2f} s ({c.tokens / max(secs, 1e-9):,.0f} tokens/s)")
    return "\n".join(lines)
