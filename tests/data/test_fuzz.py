"""Fuzzing the two readers of untrusted bytes: the JSONL reader (decode_line and the whole
preprocessing pipeline) and the dataset reader (manifest.json and the shards). Every bad
input must give the library's own error naming the file (and line), never a crash or a
stray IndexError/KeyError/UnicodeDecodeError. The dataset cases run in a child process,
so that a segfault fails a test instead of killing pytest. Seeded, so runs repeat."""

from __future__ import annotations

import copy
import json
import random
import shutil
import struct
import subprocess
import sys

import pytest

from instructpack import DataProcessArgs, data_process, load_dataset
from instructpack.data.messages import decode_line
from instructpack.demo.example import write_jsonl
from instructpack.errors import InputError, SampleError

from support.samples import tricky_conversations

GOOD = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ka lo mi"},
                     {"role": "assistant", "content": "ne su ta", "reasoning_content": "ri po"}], "unmask": False}
GOOD_LINE = json.dumps(GOOD).encode()
KINDS = {"not_utf8", "malformed_json", "invalid_sample", "chat_template"}


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    """A few random edits: byte flips, deletions, insertions of JSON syntax or bad bytes, cuts."""
    b = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[rng.randrange(len(b))]
        elif op == 2:
            b[rng.randrange(len(b) + 1):0] = rng.choice([b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"\x00",
                                                         b"\xff", b"\xc3", b"1e999", b"-", b"null", b"\\ud800"])
        elif op == 3:
            del b[rng.randrange(len(b) + 1):]
        else:  # a wrong type for some value
            b = bytearray(bytes(b).replace(rng.choice([b'"user"', b'"ne su ta"', b"false", b"[{"]),
                                           rng.choice([b"1", b"null", b"[]", b"{}", b'"x"', b"true"]), 1))
    return bytes(b).replace(b"\n", b" ")


def _random_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(n)).replace(b"\n", b"")


# Pathological lines: (name, line, the SampleError kind decode_line must give, or None
# for a line that is a valid sample).
PATHOLOGICAL = [
    ("deep_array_in_extra_key", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b', "messages": []}', "malformed_json"),
    ("deep_object_in_extra_key", b'{"x": ' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"}", "malformed_json"),
    ("deep_messages", b'{"messages": ' + b"[" * 100_000, "invalid_sample"),
    ("huge_int", b'{"x": 1' + b"0" * 10_000 + b', "messages": [{"role": "user", "content": "a"}]}', None),
    ("huge_float", b'{"x": 1e99999, "messages": [{"role": "user", "content": "a"}]}', None),
    ("messages_not_a_list", b'{"messages": {"role": "user", "content": "a"}}', "invalid_sample"),
    ("role_not_a_string", b'{"messages": [{"role": 7, "content": "a"}]}', "invalid_sample"),
    ("content_null", b'{"messages": [{"role": "user", "content": null}]}', "invalid_sample"),
    ("content_list", b'{"messages": [{"role": "user", "content": ["a"]}]}', "invalid_sample"),
    ("missing_content", b'{"messages": [{"role": "user"}]}', "invalid_sample"),
    ("missing_messages", b'{"conversation": []}', "invalid_sample"),
    ("top_level_array", b'[{"role": "user", "content": "a"}]', "invalid_sample"),
    ("top_level_string", b'"hello"', "invalid_sample"),
    ("unmask_string", b'{"messages": [{"role": "user", "content": "a"}], "unmask": "yes"}', "invalid_sample"),
    ("nul_byte", b'{"messages": [{"role": "user", "content": "a\x00b"}]}', "malformed_json"),
    ("nul_escape", b'{"messages": [{"role": "user", "content": "a\\u0000b"}]}', None),
    ("lone_surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "malformed_json"),
    ("invalid_utf8", b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not_utf8"),
    ("utf16", '{"messages": []}'.encode("utf-16"), "not_utf8"),
    ("bom", b"\xef\xbb\xbf" + GOOD_LINE, None),
    ("crlf", GOOD_LINE + b"\r", None),
    ("extra_fields", json.dumps({**GOOD, "id": 3, "meta": {"a": [1, 2]}}).encode(), None),
    ("only_whitespace", b" \t \r", "malformed_json"),
    ("empty", b"", "malformed_json"),
    ("trailing_garbage", GOOD_LINE + b" x", "malformed_json"),
    ("two_objects", GOOD_LINE + b" " + GOOD_LINE, "malformed_json"),
]


@pytest.mark.parametrize("name, raw, kind", PATHOLOGICAL, ids=[case[0] for case in PATHOLOGICAL])
def test_pathological_line(name, raw, kind):
    if kind is None:
        assert decode_line(raw).messages
    else:
        with pytest.raises(SampleError) as e:
            decode_line(raw)
        assert e.value.kind == kind, str(e.value)


def test_decode_line_gives_a_conversation_or_a_sample_error():
    rng = random.Random(1)
    lines = [_mutate(rng, GOOD_LINE) for _ in range(3000)]
    lines += [_random_bytes(rng, rng.randrange(200)) for _ in range(500)]
    outcomes = {"ok": 0, **{k: 0 for k in KINDS}}
    for raw in lines:
        try:
            conv = decode_line(raw)
        except SampleError as e:
            assert e.kind in KINDS and str(e), (raw[:80], e)
            outcomes[e.kind] += 1
        else:
            assert conv.messages and all(isinstance(m.content, str) for m in conv.messages)
            outcomes["ok"] += 1
    # The mutations reach every branch, so the test exercises what it claims to.
    assert all(outcomes[k] > 0 for k in ("ok", "malformed_json", "invalid_sample", "not_utf8")), outcomes


@pytest.mark.parametrize("raw, kind, words", [
    # Was an uncaught RecursionError, which stopped preprocessing with no file or line.
    (PATHOLOGICAL[0][1], "malformed_json", "nested too deeply"),
    (PATHOLOGICAL[1][1], "malformed_json", "nested too deeply"),
    # Was "malformed JSON: invalid character (byte 0)".
    ('{"messages": []}'.encode("utf-16"), "not_utf8", "the file is UTF-16"),
    # Was "(byte 0)", msgspec's offset inside the string, not the line's.
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not_utf8", "byte 46 of the line"),
    (b" \t ", "malformed_json", "empty line"),
])
def test_decode_line_regressions(raw, kind, words):
    if "of the line" in words:
        assert raw[46:47] == b"\xe9"  # the expectation, counted independently
    with pytest.raises(SampleError, match=words) as e:
        decode_line(raw)
    assert e.value.kind == kind


def _args(tmp_path, model, data, **kw):
    return DataProcessArgs(**{**dict(data_path=str(data), data_output_path=str(tmp_path / "out"),
                                     model_path=str(model), max_seq_len=512, num_cpu_procs=2), **kw})


def test_windows_file_with_byte_order_mark_and_crlf_preprocesses(tmp_path, tokenizer_dirs):
    # Its first line was "malformed JSON: invalid character (byte 0)".
    data = tmp_path / "in.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join([GOOD_LINE] * 5) + b"\r\n")
    result = data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], data), progress=False)
    assert result.manifest.counts.samples == 5 and result.manifest.counts.invalid_lines == 0


def test_preprocessing_fuzzed_jsonl_accounts_for_every_line(tmp_path, tokenizer_dirs):
    rng = random.Random(2)
    lines = [GOOD_LINE] + [line for _, line, _ in PATHOLOGICAL]
    lines += [_mutate(rng, GOOD_LINE) for _ in range(1500)]
    lines += [_random_bytes(rng, rng.randrange(300)) for _ in range(300)]
    lines.append(json.dumps({"messages": [{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "ka " * 200_000}]}).encode())  # 1.2 MB
    data = tmp_path / "in.jsonl"
    data.write_bytes(b"\n".join(lines))  # no newline at the end of the last line
    result = data_process.main(_args(tmp_path, tokenizer_dirs["llama3"], data, skip_invalid_lines=True),
                               progress=False)
    counts = result.manifest.counts
    blank = sum(1 for line in lines if not line.strip())
    assert counts.samples + sum(counts.dropped.values()) + counts.invalid_lines + blank == len(lines)
    assert counts.dropped["too_long"] >= 1
    assert set(counts.invalid_reasons) <= KINDS
    invalid = sum(1 for _, line, kind in PATHOLOGICAL if kind is not None and line.strip())
    assert counts.invalid_lines >= invalid
    # What was kept reads back whole, and comes from lines that are samples.
    dataset = load_dataset(result.output_path, verify=True)
    assert len(dataset) == counts.samples > 1
    assert all(decode_line(lines[line - 1]).messages for line in dataset.source_lines)


# Bad lines and the kind of reason preprocessing reports (blank lines are skipped, not bad).
BAD_IN_PREPROCESSING = [(name, line) for name, line, kind in PATHOLOGICAL if kind is not None and line.strip()] + [
    ("unknown_role", b'{"messages": [{"role": "wizard", "content": "a"}]}')]


@pytest.mark.parametrize("name, line", BAD_IN_PREPROCESSING, ids=[case[0] for case in BAD_IN_PREPROCESSING])
def test_each_bad_line_fails_preprocessing_naming_file_and_line(tmp_path, tokenizer_dirs, name, line):
    data = tmp_path / "in.jsonl"
    data.write_bytes(GOOD_LINE + b"\r\n\n" + line + b"\n" + GOOD_LINE + b"\n")
    with pytest.raises(InputError) as e:
        data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], data, num_cpu_procs=1), progress=False)
    assert (e.value.path, e.value.line) == (str(data), 3)
    assert str(e.value).startswith(f"{data}:3: ") and "skip_invalid_lines" in str(e.value)


# ---------------------------------------------------------------------------------------
# The dataset reader. A child process opens every mutated copy, cheaply and with verify,
# and reads every sample of those that open; it reports one JSON line per case.

_CHILD = r"""
import glob, json, sys
import numpy as np
from instructpack import kernels
from instructpack.data.shards import load_dataset
from instructpack.errors import DatasetError

def attempt(fn):
    try:
        return ["ok", fn()]
    except DatasetError as e:
        return ["DatasetError", str(e)]
    except BaseException as e:  # anything else is a defect; reported so that the next case still runs
        return ["other", f"{type(e).__name__}: {e}"]

def read_all(ds):
    n = len(ds)
    for i in range(n):
        s = ds[i]
        assert len(s["input_ids"]) == ds.lengths[i] == len(s["labels"])
    ids, labels, pos, cu = ds.gather(np.arange(n)[::-1], shift_labels=True)
    assert cu[-1] == len(ids) == ds.lengths.sum() and 0 <= ids.min() and ids.max() < ds.vocab_size
    assert ((labels == -100) | ((labels >= 0) & (labels < ds.vocab_size))).all()
    return None

def raw_reads(case):
    # The C++ reader alone, below the Python checks: every sample of every shard it opens
    # is read, so its own bounds checks face the corrupt indexes too.
    for path in sorted(glob.glob(case + "/shard-*.bin")):
        try:
            shards = kernels.ShardSet([path])
        except kernels.ShardError:
            continue
        for i in range(shards.num_samples):
            try:
                kernels.gather(shards, np.array([i]))
            except kernels.ShardError:
                pass

for case in json.load(open(sys.argv[1])):
    print("start " + case, file=sys.stderr, flush=True)  # the last one names a case that crashed
    opened = attempt(lambda: load_dataset(case))
    result = {"case": case, "open": opened[:1] + [opened[1] if opened[0] != "ok" else None]}
    if opened[0] == "ok":
        result["read"] = attempt(lambda: read_all(opened[1]))
    result["verify"] = attempt(lambda: load_dataset(case, verify=True) and None)
    result["raw"] = attempt(lambda: raw_reads(case))
    print(json.dumps(result), flush=True)
"""


def _run_reader(cases: list[str], tmp_path, child: str = _CHILD) -> dict:
    listing = tmp_path / "cases.json"
    listing.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, "-c", child, str(listing)], capture_output=True, text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
    assert proc.returncode == 0, f"reader process died with status {proc.returncode} at {last}:\n{proc.stderr[-3000:]}"
    results = {r["case"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert sorted(results) == sorted(cases)
    for r in results.values():  # the C++ reader alone raises ShardError and nothing else
        assert r["raw"][0] == "ok", r
    return results


def test_a_crash_in_the_reader_process_fails_the_test(tmp_path):
    with pytest.raises(AssertionError, match="died with status -6 at \\['start x'\\]"):
        _run_reader(["x"], tmp_path, child="import os, sys; print('start x', file=sys.stderr); os.abort()")


@pytest.fixture(scope="module")
def base_dataset(tmp_path_factory, tokenizer_dirs):
    """Several shards (small shard_tokens), so that swaps between shards exist."""
    tmp = tmp_path_factory.mktemp("fuzz-base")
    data = write_jsonl(tmp / "in.jsonl", tricky_conversations(40, seed=3))
    result = data_process.main(_args(tmp, tokenizer_dirs["chatml"], data), progress=False, shard_tokens=1500)
    assert len(result.manifest.shards) >= 3
    return result.output_path


def _sections(data: bytes) -> dict:
    """Byte ranges of a shard's sections, from its header (see csrc/shards.h)."""
    token_bytes, = struct.unpack_from("<I", data, 12)
    n, nt, tokens, mask, index = struct.unpack_from("<5Q", data, 16)
    return {"header": (0, 56), "checksum": (56, 64), "tokens": (tokens, tokens + nt * token_bytes),
            "mask": (mask, mask + nt), "offsets": (index, index + 8 * n), "lengths": (index + 8 * n, index + 12 * n),
            "trained": (index + 12 * n, index + 16 * n), "source_lines": (index + 16 * n, index + 24 * n)}


# Corruptions the cheap open must catch (they decide where reads go); the others (token,
# mask, trained-count and line-number bytes, the stored checksum) only verify can see.
MUST_FAIL_OPEN = {"truncate", "extend", "zero", "empty", "flip-header", "flip-offsets", "flip-lengths"}


def _shard_cases(base, root, rng: random.Random) -> dict:
    """case directory -> (kind, names of the files changed)."""
    shards = sorted(p.name for p in base.glob("shard-*.bin"))
    kinds = (["truncate", "extend", "zero", "empty", "swap", "flips"]
             + [f"flip-{s}" for s in _sections((base / shards[0]).read_bytes())])
    cases = {}
    for k in range(170):
        kind = kinds[k % len(kinds)]
        case = root / f"shard-{k:03d}-{kind}"
        shutil.copytree(base, case)
        name = rng.choice(shards)
        f = case / name
        data = bytearray(f.read_bytes())
        changed = [name]
        if kind == "truncate":
            del data[rng.randrange(len(data)):]
        elif kind == "extend":
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 100)))
        elif kind == "zero":
            data = bytearray(len(data))
        elif kind == "empty":
            data = bytearray()
        elif kind == "swap":
            other = rng.choice([s for s in shards if s != name])
            data = bytearray((case / other).read_bytes())
            (case / other).write_bytes(f.read_bytes())
            changed.append(other)
        elif kind == "flips":  # anywhere, several bytes
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= rng.randint(1, 255)
        else:
            start, end = _sections(bytes(data))[kind.removeprefix("flip-")]
            data[rng.randrange(start, end)] ^= rng.randint(1, 255)
        f.write_bytes(bytes(data))
        if kind in ("truncate", "extend", "empty") and rng.random() < 0.5:
            # The manifest updated to the new size: the shard's own checks must catch it.
            manifest = json.loads((case / "manifest.json").read_text())
            next(e for e in manifest["shards"] if e["file"] == name)["bytes"] = len(data)
            (case / "manifest.json").write_text(json.dumps(manifest))
        cases[str(case)] = (kind, changed)
    return cases


def test_corrupted_shards_fail_with_dataset_errors_or_read_in_bounds(base_dataset, tmp_path):
    cases = _shard_cases(base_dataset, tmp_path, random.Random(4))
    results = _run_reader(list(cases) + [str(base_dataset)], tmp_path)
    clean = results.pop(str(base_dataset))
    assert clean["open"][0] == clean["read"][0] == clean["verify"][0] == "ok", clean

    opened = 0
    for case, r in results.items():
        kind, changed = cases[case]
        names = lambda message, changed=changed: any(name in message for name in changed)
        # verify reads every byte: every corruption is found, in a named file.
        assert r["verify"][0] == "DatasetError" and names(r["verify"][1]), (kind, r)
        if r["open"][0] == "ok":
            opened += 1
            assert kind not in MUST_FAIL_OPEN, (kind, r)
            # Corrupt tokens read as ids in bounds, or fail naming the shard (an id past the vocabulary).
            assert r["read"][0] == "ok" or (r["read"][0] == "DatasetError" and names(r["read"][1])), (kind, r)
        else:
            assert r["open"][0] == "DatasetError" and names(r["open"][1]), (kind, r)
    assert 0 < opened < len(cases)  # both paths were taken


def _manifest_cases(base, root, rng: random.Random) -> dict:
    """case directory -> (description, words one of which the open (or, after "verify:",
    the verify) message must contain; for random edits, the path of the edited value)."""
    manifest = json.loads((base / "manifest.json").read_text())
    shards = manifest["shards"]
    outside = root / "outside.bin"  # a valid shard, listed with its true sizes, outside the dataset
    shutil.copy(base / shards[1]["file"], outside)

    def edit(fn):
        m = copy.deepcopy(manifest)
        fn(m)
        return json.dumps(m).encode()

    def setter(*path, value):
        def fn(m):
            for key in path[:-1]:
                m = m[key]
            m[path[-1]] = value
        return fn

    def deleter(*path):
        def fn(m):
            for key in path[:-1]:
                m = m[key]
            del m[path[-1]]
        return fn

    def swap_files(m):
        m["shards"][0]["file"], m["shards"][1]["file"] = m["shards"][1]["file"], m["shards"][0]["file"]

    s0, s1 = shards[0]["file"], shards[1]["file"]
    edits = {
        "bytes+1": (edit(setter("shards", 0, "bytes", value=shards[0]["bytes"] + 1)), [s0, "manifest says"]),
        "samples+1": (edit(setter("shards", 1, "samples", value=shards[1]["samples"] + 1)), [s1, "manifest says"]),
        "tokens-1": (edit(setter("shards", 0, "tokens", value=shards[0]["tokens"] - 1)), [s0, "manifest says"]),
        "counts.samples": (edit(setter("counts", "samples", value=1)), ["counts.samples"]),
        "counts.tokens": (edit(setter("counts", "tokens", value="12")), ["counts.tokens"]),
        "dotdot": (edit(setter("shards", 1, "file", value="../../etc/passwd")), ["shards[1].file"]),
        "absolute": (edit(setter("shards", 1, "file", value="/etc/passwd")), ["shards[1].file"]),
        "outside": (edit(setter("shards", 1, "file", value="../outside.bin")), ["shards[1].file"]),
        "nul": (edit(setter("shards", 1, "file", value="shard\x00.bin")), ["shards[1].file"]),
        "dot": (edit(setter("shards", 1, "file", value=".")), ["shards[1].file"]),
        "listed_twice": (edit(setter("shards", 1, "file", value=s0)), ["listed twice"]),
        "swapped_files": (edit(swap_files), [s0, s1]),
        "samples_string": (edit(setter("shards", 0, "samples", value="12")), ["shards[0].samples"]),
        "bytes_negative": (edit(setter("shards", 0, "bytes", value=-1)), ["shards[0].bytes"]),
        "tokens_float": (edit(setter("shards", 0, "tokens", value=1.5)), ["shards[0].tokens"]),
        "samples_bool": (edit(setter("shards", 0, "samples", value=True)), ["shards[0].samples"]),
        "bytes_huge": (edit(setter("shards", 0, "bytes", value=2**70)), [s0, "manifest says"]),
        "no_checksum": (edit(deleter("shards", 0, "checksum")), ["shards[0] lacks checksum"]),
        "no_file": (edit(deleter("shards", 2, "file")), ["shards[2] lacks file"]),
        "no_shards": (edit(deleter("shards")), ['"shards"']),
        "shards_object": (edit(setter("shards", value={"file": s0})), ['"shards"']),
        "shards_empty": (edit(setter("shards", value=[])), ['"shards"']),
        "entry_string": (edit(setter("shards", 0, value=s0)), ["shards[0]"]),
        "vocab_string": (edit(setter("tokenizer", "vocab_size", value="600")), ["tokenizer.vocab_size"]),
        "vocab_wider": (edit(setter("tokenizer", "vocab_size", value=2**20)), ["tokenizer.vocab_size in"]),
        "no_tokenizer": (edit(deleter("tokenizer")), ["tokenizer.vocab_size"]),
        "format_version": (edit(setter("format_version", value=2)), ["format version 2"]),
        "no_format": (edit(deleter("format")), ["not an instructpack manifest"]),
        "not_an_object": (b"[1, 2]", ["not an instructpack manifest"]),
        "truncated_json": (edit(lambda m: None)[:100], ["corrupt manifest"]),
        "not_utf8": (b'{"format": "\xff"}', ["corrupt manifest"]),
        "int_past_digit_limit": (b'{"format": 1' + b"0" * 5000 + b"}", ["corrupt manifest"]),
        "deep": (b"[" * 100_000 + b"]" * 100_000, ["corrupt manifest"]),
        "empty_file": (b"", ["corrupt manifest"]),
        "checksum_changed": (edit(setter("shards", 0, "checksum", value="0" * 16)), ["verify:", s0, "checksum"]),
        "checksum_int": (edit(setter("shards", 0, "checksum", value=5)), ["shards[0].checksum"]),
    }
    # Random edits: any value replaced by a wrong one or deleted. Fields the reader uses
    # must fail at open; the others (source, settings, lengths...) may pass.
    paths = []

    def walk(node, path):
        paths.append(path)
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, child in children:
            walk(child, path + (key,))

    walk(manifest, ())
    bad_values = [None, "12", -1, 1.5, True, [], {}, 2**70, "../../etc/passwd", "/etc/passwd", ""]
    for k in range(60):
        path = rng.choice(paths[1:])
        if rng.random() < 0.3:
            data = edit(deleter(*path))
        else:
            data = edit(setter(*path, value=rng.choice(bad_values)))
        edits[f"random-{k:02d}-{'.'.join(map(str, path))}"] = (data, path)

    cases = {}
    for name, (data, words) in edits.items():
        case = root / f"manifest-{name}"
        shutil.copytree(base, case)
        (case / "manifest.json").write_bytes(data)
        cases[str(case)] = (name, words)
    return cases


def _random_edit_must_fail(path: tuple) -> str | None:
    """The stage by which a random edit must have failed: the reader checks the format, the
    vocabulary size and every shard entry (a changed checksum string only at verify);
    the rest of the manifest (source, settings, statistics) is information."""
    if path[0] in ("format", "format_version") or path[:2] in (("tokenizer",), ("tokenizer", "vocab_size")):
        return "open"
    if path[0] == "shards":
        return "verify"
    return None


def test_bad_manifests_fail_with_dataset_errors_naming_the_problem(base_dataset, tmp_path):
    cases = _manifest_cases(base_dataset, tmp_path, random.Random(5))
    results = _run_reader(list(cases), tmp_path)
    for case, r in results.items():
        name, words = cases[case]
        assert r["open"][0] in ("ok", "DatasetError") and r["verify"][0] in ("ok", "DatasetError"), (name, r)
        assert r.get("read", ["ok"])[0] in ("ok", "DatasetError"), (name, r)
        if isinstance(words, tuple):  # a random edit
            stage = _random_edit_must_fail(words)
            if stage is not None:  # verify fails too when open does
                assert r[stage][0] == "DatasetError" and "manifest" in r[stage][1], (name, r)
            continue
        stage, words = ("verify", words[1:]) if words[0] == "verify:" else ("open", words)
        assert r[stage][0] == "DatasetError", (name, r)
        message = r[stage][1]
        assert "manifest" in message and any(w in message for w in words), (name, message)
        if stage == "verify":
            assert r["open"][0] == "ok" and r["read"][0] == "ok", (name, r)
