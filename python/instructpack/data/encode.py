"""Turns a chunk of JSONL lines into token ids and trained masks: decode, render, tokenize
(Rust, batched), mask (C++). Runs in worker processes; returns flat NumPy arrays only."""

from __future__ import annotations

import itertools
import json
import os
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from .. import kernels
from .chat import ChatRenderer, RoleMarkers, TokenizerFiles
from .messages import SampleError, decode_line
from .shards import token_dtype_for

DROP_REASONS = ("too_long", "too_short", "no_trained_tokens", "no_end_of_text")
# InstructLab's length rule (min_seq_len None): at least this many tokens, fewer than max_seq_len.
INSTRUCTLAB_MIN_TOKENS = 20


@dataclass
class EncodedChunk:
    """Kept samples of one chunk, in input order, plus what was dropped or invalid."""

    tokens: np.ndarray  # uint16 or uint32, all kept samples concatenated
    mask: np.ndarray  # uint8 per token
    lengths: np.ndarray  # uint32 per kept sample
    trained: np.ndarray  # uint32 per kept sample
    source_lines: np.ndarray  # uint64, 1-based input line of each kept sample
    dropped: dict = field(default_factory=dict)  # reason -> count
    invalid: list = field(default_factory=list)  # (line, kind, reason), in line order
    lines: int = 0


def byte_length_table(tokenizer) -> np.ndarray | None:
    """Bytes per token id for byte-level BPE tokenizers (GPT-2, Llama-3, Qwen, Granite...),
    where token offsets follow from the ids alone. None when the tokenizer is of another
    kind; then the tokenizer's own (slower to fetch) offsets are used."""
    from tokenizers import pre_tokenizers

    spec = json.loads(tokenizer.to_str())
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        return None
    if '"ByteLevel"' not in json.dumps(spec.get("pre_tokenizer")):
        return None
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    table = np.full(max(vocab.values()) + 1, -1, dtype=np.int32)
    for token, idx in vocab.items():
        if all(c in alphabet for c in token):
            table[idx] = len(token)  # one alphabet character stands for one byte
    for added in spec.get("added_tokens", []):
        # Tokens that swallow neighbouring spaces have no fixed length: leave them unknown.
        if not (added.get("lstrip") or added.get("rstrip")):
            table[added["id"]] = len(added["content"].encode("utf-8"))
        else:
            table[added["id"]] = -1
    return table


class ChunkEncoder:
    """`min_seq_len` None keeps what InstructLab keeps (INSTRUCTLAB_MIN_TOKENS <= tokens <
    max_seq_len); a number keeps min_seq_len <= tokens <= max_seq_len."""

    def __init__(self, files: TokenizerFiles, max_seq_len: int, min_seq_len: int | None):
        from tokenizers import normalizers

        self.tokenizer = files.tokenizer()
        self.role_markers = files.role_markers
        self.renderer = ChatRenderer(files.chat_template, files.special_tokens, files.template_source)
        self.byte_len = byte_length_table(self.tokenizer)
        self.nfc = isinstance(self.tokenizer.normalizer, normalizers.NFC)
        self.token_dtype = token_dtype_for(files.vocab_size)
        self.max_seq_len = max_seq_len
        self.min_seq_len = min_seq_len
        # No token covers more characters than its longest vocabulary string, so a sample
        # with more content than this is too long whatever the tokenizer makes of it, and is
        # dropped without rendering or tokenizing it (a 50 MB line would take minutes and GBs).
        # The factor 4 leaves room for normalizers that shorten text (NFC composing accents).
        longest = max(len(t) for t in self.tokenizer.get_vocab(with_added_tokens=True))
        self.certainly_too_long_chars = 4 * max_seq_len * max(longest, 1)

    def encode(self, first_line: int, raw_lines: list[bytes]) -> EncodedChunk:
        texts, spans, line_numbers, invalid, unmask = [], [], [], [], []
        too_long_unread = 0
        for number, raw in enumerate(raw_lines, start=first_line):
            if not raw.strip():
                continue  # blank lines (a trailing newline, say) are not samples
            try:
                conversation = decode_line(raw)
                if _content_chars(conversation) > self.certainly_too_long_chars:
                    too_long_unread += 1
                    continue
                if self.role_markers is None:
                    text, trained_spans = self.renderer.render_with_spans(conversation)
                else:  # labels come from the tokens (role_marker_mask)
                    text, trained_spans = self.renderer.render(conversation.as_dicts()), []
            except SampleError as e:
                invalid.append((number, e.kind, str(e)))
                continue
            texts.append(text)
            unmask.append(conversation.unmask)
            spans.append(trained_spans)
            line_numbers.append(number)

        # Byte-level tokenizers need no offsets from the tokenizer (the ids give them), so
        # skip computing them; a sample that still needs them is re-encoded on its own.
        encode_batch = self.tokenizer.encode_batch_fast if self.byte_len is not None else self.tokenizer.encode_batch
        encodings = encode_batch(texts, add_special_tokens=False) if texts else []
        ids_lists = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, ids_lists), dtype=np.int64, count=len(ids_lists))
        tok_begin = np.zeros(len(ids_lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=tok_begin[1:])
        ids = np.fromiter(itertools.chain.from_iterable(ids_lists), dtype=np.uint32, count=int(tok_begin[-1]))

        if self.role_markers is None:
            starts, ends, span_starts, span_ends, span_begin = self._offsets_and_spans(ids, tok_begin, texts, spans,
                                                                                      encodings)
            mask, trained = kernels.label_mask(starts, ends, tok_begin, span_starts, span_ends, span_begin)
        else:
            mask, trained = role_marker_masks(ids, tok_begin, unmask, self.role_markers)

        # One reason per dropped sample; later assignments take precedence.
        reason = np.full(len(texts), -1, dtype=np.int8)
        if self.min_seq_len is None:
            reason[lengths < INSTRUCTLAB_MIN_TOKENS] = DROP_REASONS.index("too_short")
        elif self.min_seq_len > 0:
            reason[lengths < self.min_seq_len] = DROP_REASONS.index("too_short")
        if self.role_markers is not None:  # InstructLab's rule for modules: end-of-text in the last 3 tokens
            reason[~_ends_with_eos(ids, tok_begin, self.role_markers.eos)] = DROP_REASONS.index("no_end_of_text")
        reason[trained == 0] = DROP_REASONS.index("no_trained_tokens")
        too_long = lengths >= self.max_seq_len if self.min_seq_len is None else lengths > self.max_seq_len
        reason[too_long] = DROP_REASONS.index("too_long")
        keep = reason < 0
        keep_tokens = np.repeat(keep, lengths)
        dropped = {r: int((reason == i).sum()) for i, r in enumerate(DROP_REASONS) if (reason == i).any()}
        if too_long_unread:
            dropped["too_long"] = dropped.get("too_long", 0) + too_long_unread
        return EncodedChunk(
            tokens=ids[keep_tokens].astype(self.token_dtype),
            mask=mask[keep_tokens],
            lengths=lengths[keep].astype(np.uint32),
            trained=trained[keep].astype(np.uint32),
            source_lines=np.asarray(line_numbers, dtype=np.uint64)[keep],
            dropped=dropped,
            invalid=invalid,
            lines=len(raw_lines),
        )

    def _spans_in_bytes(self, text: str, spans: list, total_bytes: int) -> list | None:
        """The character spans in bytes, if the ids' byte offsets account for the text
        exactly; None if they do not."""
        if total_bytes < 0:
            return None
        if text.isascii():
            return spans if total_bytes == len(text) else None
        if self.nfc and not unicodedata.is_normalized("NFC", text):
            return None  # the normalizer would change the text, and the bytes with it
        if total_bytes != len(text.encode("utf-8")):
            return None
        return [(len(text[:a].encode("utf-8")), len(text[:b].encode("utf-8"))) for a, b in spans]

    def _offsets_and_spans(self, ids, tok_begin, texts, spans, encodings):
        """Token offsets and trained spans in one unit per sample: bytes where the ids give
        the offsets (byte-level BPE), else characters from the tokenizer's own offsets."""
        n = len(texts)
        if self.byte_len is not None:
            starts, ends, total = kernels.token_byte_offsets(ids, tok_begin, self.byte_len)
        else:
            starts = np.zeros(len(ids), np.int64)
            ends = np.zeros(len(ids), np.int64)
            total = np.full(n, -1, np.int64)
        span_starts, span_ends, span_counts = [], [], []
        for s in range(n):
            sample_spans = self._spans_in_bytes(texts[s], spans[s], int(total[s]))
            if sample_spans is None:
                # The ids do not account for the text (another tokenizer kind, a normalizer
                # at work): use the tokenizer's character offsets for this sample.
                encoding = encodings[s] if self.byte_len is None else self.tokenizer.encode(
                    texts[s], add_special_tokens=False)
                offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
                starts[tok_begin[s]:tok_begin[s + 1]] = offsets[:, 0]
                ends[tok_begin[s]:tok_begin[s + 1]] = offsets[:, 1]
                sample_spans = spans[s]
            span_starts.extend(a for a, _ in sample_spans)
            span_ends.extend(b for _, b in sample_spans)
            span_counts.append(len(sample_spans))
        span_begin = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(span_counts, out=span_begin[1:])
        return (starts, ends, np.asarray(span_starts, np.int64), np.asarray(span_ends, np.int64), span_begin)


def role_marker_masks(ids: np.ndarray, tok_begin: np.ndarray, unmask: list[bool],
                      markers: RoleMarkers) -> tuple[np.ndarray, np.ndarray]:
    """InstructLab's labels for template modules (its `unmask_message_content`): scanning
    each sample's tokens, a role marker (the longest that matches; its tokens are never
    trained) starts a stretch that is trained up to the next marker when the marker is the
    assistant's, or, with "unmask", any but the system's. Returns (mask per token, trained
    tokens per sample)."""
    sequences = [(name, np.asarray(seq, dtype=ids.dtype)) for name, seq in
                 (("user", markers.user), ("assistant", markers.assistant), ("system", markers.system),
                  ("tool_response", markers.tool_response)) if seq]
    mask = np.zeros(len(ids), dtype=np.uint8)
    trained = np.zeros(len(tok_begin) - 1, dtype=np.int64)
    for s in range(len(tok_begin) - 1):
        begin, end = int(tok_begin[s]), int(tok_begin[s + 1])
        sample = ids[begin:end]
        # Per position, the longest marker that starts there (markers are rare: the scan
        # below visits only them).
        longest = np.zeros(len(sample), dtype=np.int64)
        kind = np.full(len(sample), -1, dtype=np.int64)
        for k, (_, seq) in enumerate(sequences):
            if len(seq) > len(sample):
                continue
            windows = np.lib.stride_tricks.sliding_window_view(sample, len(seq))
            at = np.flatnonzero((windows == seq).all(axis=1))
            longer = at[len(seq) > longest[at]]
            longest[longer], kind[longer] = len(seq), k
        training, pos = False, 0
        for at in np.flatnonzero(longest):
            if at < pos:
                continue  # inside the marker just passed
            if training:
                mask[begin + pos:begin + at] = 1
            name = sequences[kind[at]][0]
            training = name == "assistant" or (unmask[s] and name != "system")
            pos = int(at + longest[at])
        if training:
            mask[begin + pos:end] = 1
        trained[s] = int(mask[begin:end].sum())
    return mask, trained


def _ends_with_eos(ids: np.ndarray, tok_begin: np.ndarray, eos: int) -> np.ndarray:
    """Per sample: is `eos` among its last 3 tokens (InstructLab's check_valid_sample)?"""
    out = np.zeros(len(tok_begin) - 1, dtype=bool)
    for s in range(len(out)):
        out[s] = eos in ids[max(int(tok_begin[s]), int(tok_begin[s + 1]) - 3):int(tok_begin[s + 1])]
    return out


def _content_chars(conversation) -> int:
    return sum(len(m.content) + len(m.reasoning_content or "") for m in conversation.messages)


# Worker-process state: the encoder the pool initializer installs in each process.
_encoder: ChunkEncoder | None = None


def init_worker(encoder: ChunkEncoder) -> None:
    """With fork, `encoder` is the parent's, inherited without pickling or re-importing."""
    # Parallelism comes from the processes; Rust threads inside each would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _encoder
    _encoder = encoder


def encode_in_worker(first_line: int, raw_lines: list[bytes]) -> EncodedChunk:
    assert _encoder is not None, "init_worker was not run"
    return _encoder.encode(first_line, raw_lines)
