"""Damaged datasets, one fault per test: each must give a DatasetError that names the file
and the problem. And datasets that do not belong to the model: made with another tokenizer
or chat template (instructpack.data.tokenizer_check)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from instructpack import DataProcessArgs, DatasetError, data_process, kernels, load_dataset
from instructpack.data.chat import load_tokenizer_files
from instructpack.data.synthetic import write_synthetic_dataset
from instructpack.data.tokenizer_check import check_dataset_matches_model
from instructpack.demo.example import CHAT_TEMPLATES, build_tokenizer, write_jsonl

from support.samples import preprocess, tricky_conversations


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tokenizer_dirs):
    tmp = tmp_path_factory.mktemp("faults")
    data = write_jsonl(tmp / "in.jsonl", tricky_conversations(24, seed=7))
    args = DataProcessArgs(data_path=str(data), data_output_path=str(tmp / "out"),
                           model_path=str(tokenizer_dirs["chatml"]), max_seq_len=4096, num_cpu_procs=1)
    out = data_process.main(args, progress=False, shard_tokens=2000).output_path
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) >= 2
    load_dataset(out, verify=True)
    return out


@pytest.fixture
def ds(pristine, tmp_path):
    """A fresh copy to damage, its shards renamed shard-00000.bin, shard-00001.bin, ... (any
    plain file name the manifest lists is read) so that the tests can name them."""
    ds = shutil.copytree(pristine, tmp_path / "ds")
    manifest = json.loads((ds / "manifest.json").read_text())
    for i, entry in enumerate(manifest["shards"]):
        (ds / entry["file"]).rename(ds / f"shard-{i:05d}.bin")
        entry["file"] = f"shard-{i:05d}.bin"
    (ds / "manifest.json").write_text(json.dumps(manifest))
    return ds


def _header(path) -> dict:
    token_bytes, = struct.unpack_from("<I", path.read_bytes(), 12)
    n, nt, tokens, mask, index = struct.unpack_from("<5Q", path.read_bytes(), 16)
    return dict(token_bytes=token_bytes, samples=n, tokens=nt, tokens_at=tokens, mask_at=mask, index_at=index)


def _patch(path, offset: int, data: bytes) -> None:
    b = bytearray(path.read_bytes())
    b[offset:offset + len(data)] = data
    path.write_bytes(bytes(b))


def _edit_manifest(ds, fn) -> None:
    manifest = json.loads((ds / "manifest.json").read_text())
    fn(manifest)
    (ds / "manifest.json").write_text(json.dumps(manifest))


def _sync_manifest_size(ds, name: str) -> None:
    """Records a damaged shard's new size, so that the shard's own checks must catch it."""
    size = (ds / name).stat().st_size
    _edit_manifest(ds, lambda m: next(e for e in m["shards"] if e["file"] == name).update(bytes=size))


def _open_fails(ds, pattern: str, verify: bool = False) -> str:
    with pytest.raises(DatasetError, match=pattern) as e:
        load_dataset(ds, verify=verify)
    return str(e.value)


# --- the shard files ---------------------------------------------------------------------

def test_truncated_shard(ds):
    shard = ds / "shard-00001.bin"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:size // 2])
    message = _open_fails(ds, rf"shard-00001.bin: {size // 2} bytes, the manifest says {size} \(truncated")
    assert "re-run preprocessing" in message


def test_truncated_shard_whose_manifest_entry_was_updated(ds):
    shard = ds / "shard-00001.bin"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:size - 8])
    _sync_manifest_size(ds, "shard-00001.bin")
    _open_fails(ds, rf"shard-00001.bin: truncated shard: {size - 8} bytes, header says {size}; re-run preprocessing")


def test_shard_cut_inside_its_header(ds):
    (ds / "shard-00000.bin").write_bytes((ds / "shard-00000.bin").read_bytes()[:10])
    _sync_manifest_size(ds, "shard-00000.bin")
    _open_fails(ds, r"shard-00000.bin: truncated shard \(10 bytes, smaller than the header\)")


def test_shard_with_junk_appended(ds):
    shard = ds / "shard-00000.bin"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes() + b"junk" * 4)
    _open_fails(ds, rf"shard-00000.bin: {size + 16} bytes, the manifest says {size}")
    _sync_manifest_size(ds, "shard-00000.bin")
    _open_fails(ds, rf"shard-00000.bin: oversized shard: {size + 16} bytes, header says {size}")


def test_zeroed_shard(ds):
    shard = ds / "shard-00001.bin"
    shard.write_bytes(bytes(shard.stat().st_size))
    _open_fails(ds, r"shard-00001.bin: not an instructpack shard \(bad magic\)")


def test_shard_header_with_wrong_section_offsets(ds):
    shard = ds / "shard-00000.bin"
    _patch(shard, 40, struct.pack("<Q", _header(shard)["mask_at"] + 8))
    _open_fails(ds, r"shard-00000.bin: corrupt shard header \(section offsets\)")


def test_shard_header_of_another_format_version(ds):
    _patch(ds / "shard-00000.bin", 8, struct.pack("<I", 7))
    _open_fails(ds, r"shard-00000.bin: shard format version 7, this build reads 1; re-run preprocessing")


def test_corrupt_sample_offset_fails_at_open(ds):
    shard = ds / "shard-00001.bin"
    _patch(shard, _header(shard)["index_at"] + 8 * 2, struct.pack("<Q", 10**12))
    _open_fails(ds, r"shard-00001.bin: corrupt shard index at sample 2 \(offset 1000000000000,")


def test_corrupt_sample_length_fails_at_open(ds):
    shard = ds / "shard-00001.bin"
    h = _header(shard)
    last = h["samples"] - 1  # the last sample: no later offset shows it, only the total
    at = h["index_at"] + 8 * h["samples"] + 4 * last
    length, = struct.unpack_from("<I", shard.read_bytes(), at)
    _patch(shard, at, struct.pack("<I", length + 1))
    _open_fails(ds, rf"shard-00001.bin: corrupt shard index \(sample lengths add up to {h['tokens'] + 1} tokens, "
                    rf"the header says {h['tokens']}\)")


def test_trained_count_above_the_sample_length_fails_at_open(ds):
    shard = ds / "shard-00000.bin"
    h = _header(shard)
    _patch(shard, h["index_at"] + 12 * h["samples"] + 4 * 1, struct.pack("<I", 2**31))
    _open_fails(ds, r"shard-00000.bin: corrupt shard index at sample 1 \(.*trained 2147483648\)")


def test_corrupt_token_is_found_when_read_and_by_verify(ds, tokenizer_dirs):
    shard = ds / "shard-00001.bin"
    h = _header(shard)
    assert h["token_bytes"] == 2
    _patch(shard, h["tokens_at"] + 2 * 3, struct.pack("<H", 0xFFFF))  # token 3 of sample 0: an id past 600
    dataset = load_dataset(ds)  # the cheap open does not read tokens
    first = json.loads((ds / "manifest.json").read_text())["shards"][0]["samples"]
    with pytest.raises(DatasetError, match=rf"shard-00001.bin: sample {first} holds token id 65535, outside the "
                                           r"vocabulary of 600 ids; the shard is corrupt"):
        dataset[first]
    with pytest.raises(DatasetError, match="shard-00001.bin"):
        dataset.gather(np.arange(len(dataset)))
    assert len(dataset[first - 1]["input_ids"]) == dataset.lengths[first - 1]  # other samples still read
    _open_fails(ds, r"shard-00001.bin: corrupt shard \(checksum mismatch\); re-run preprocessing", verify=True)


def test_corrupt_trained_mask_is_found_by_verify(ds):
    shard = ds / "shard-00000.bin"
    b = bytearray(shard.read_bytes())
    b[_header(shard)["mask_at"] + 5] ^= 1
    shard.write_bytes(bytes(b))
    dataset = load_dataset(ds)
    assert len(dataset[0]["labels"]) == dataset.lengths[0]  # wrong labels, read in bounds
    _open_fails(ds, r"shard-00000.bin: corrupt shard \(checksum mismatch\)", verify=True)


def test_shards_swapped(ds):
    a, b = ds / "shard-00000.bin", ds / "shard-00001.bin"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    assert len(data_a) != len(data_b)
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    _open_fails(ds, rf"shard-00000.bin: {len(data_b)} bytes, the manifest says {len(data_a)}")


def test_shard_rewritten_with_other_tokens_fails_verify(ds):
    shard = ds / "shard-00000.bin"
    s = kernels.Shard(str(shard))
    tokens = s.tokens.copy()
    tokens[0] = (tokens[0] + 1) % 600
    arrays = [s.mask.copy(), s.lengths.copy(), s.trained.copy(), s.source_lines.copy()]
    del s
    kernels.write_shard(str(shard), tokens, *arrays)  # valid in itself, same size and counts
    load_dataset(ds)
    _open_fails(ds, r"shard-00000.bin: checksum differs from the manifest", verify=True)


# --- manifest.json against the shards ----------------------------------------------------

def test_manifest_sample_count_differs_from_the_shard(ds):
    _edit_manifest(ds, lambda m: m["shards"][1].update(samples=m["shards"][1]["samples"] + 1))
    h = _header(ds / "shard-00001.bin")
    _open_fails(ds, rf"shard-00001.bin: holds {h['samples']} samples / {h['tokens']} tokens, the manifest says "
                    rf"{h['samples'] + 1} / {h['tokens']}")


def test_manifest_total_counts_differ_from_the_shards(ds):
    _edit_manifest(ds, lambda m: m["counts"].update(tokens=m["counts"]["tokens"] - 1))
    total = sum(_header(p)["tokens"] for p in ds.glob("shard-*.bin"))
    _open_fails(ds, rf"manifest.json: counts.tokens is {total - 1}, the shards hold {total}; the manifest is damaged")


def test_manifest_entry_missing_a_key(ds):
    _edit_manifest(ds, lambda m: m["shards"][1].pop("bytes"))
    _open_fails(ds, r"manifest.json: shards\[1\] lacks bytes")


@pytest.mark.parametrize("key, value", [("samples", "12"), ("bytes", 4.0), ("tokens", -5), ("samples", None),
                                        ("bytes", True)])
def test_manifest_entry_with_a_wrong_type_or_a_negative_number(ds, key, value):
    _edit_manifest(ds, lambda m: m["shards"][0].update({key: value}))
    _open_fails(ds, rf"manifest.json: shards\[0\].{key} is {value!r}, expected a non-negative integer")


@pytest.mark.parametrize("name", ["../outside.bin", "{outside}", "sub/shard-00000.bin", "..", ""])
def test_manifest_names_only_files_inside_the_dataset(ds, name):
    outside = ds.parent / "outside.bin"  # a valid shard, listed with its true sizes and checksum
    shutil.copy(ds / "shard-00000.bin", outside)
    (ds / "sub").mkdir()
    shutil.copy(ds / "shard-00000.bin", ds / "sub" / "shard-00000.bin")
    name = name.format(outside=outside)
    _edit_manifest(ds, lambda m: m["shards"][0].update(file=name))
    _open_fails(ds, rf"manifest.json: shards\[0\].file is {name!r}, expected the name of a file in {ds} "
                    r"\(no directories\)")


def test_a_shard_linked_from_outside_the_dataset_is_refused(ds):
    outside = ds.parent / "elsewhere.bin"  # a valid shard: the link itself is the fault
    shutil.move(ds / "shard-00000.bin", outside)
    (ds / "shard-00000.bin").symlink_to(outside)
    _open_fails(ds, rf"shard-00000.bin: a link to {outside}, outside the dataset")


def test_manifest_listing_no_shards(ds):
    _edit_manifest(ds, lambda m: m.update(shards=[]))
    _open_fails(ds, r'manifest.json: "shards" is \[\], expected a non-empty list')


def test_manifest_vocabulary_too_large_for_the_stored_ids(ds):
    _edit_manifest(ds, lambda m: m["tokenizer"].update(vocab_size=70_000))
    _open_fails(ds, r"shard-00000.bin: 2-byte token ids, but a vocabulary of 70000 \(tokenizer.vocab_size in "
                    r"manifest.json\) has 4-byte ones")


def test_manifest_nested_too_deeply(ds):
    (ds / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    _open_fails(ds, r"manifest.json: corrupt manifest \(maximum recursion depth")


# --- a dataset made for another model ----------------------------------------------------

def test_same_tokenizer_passes_also_from_a_copy_elsewhere(pristine, tokenizer_dirs, tmp_path):
    check_dataset_matches_model(pristine, tokenizer_dirs["chatml"])
    copy = shutil.copytree(tokenizer_dirs["chatml"], tmp_path / "model")
    check_dataset_matches_model(pristine, copy, copy / "chat_template.jinja")


def test_dataset_of_another_tokenizer_is_refused_naming_both(pristine, tokenizer_dirs):
    made_with = json.loads((pristine / "manifest.json").read_text())["tokenizer"]["path"]
    assert made_with == str(tokenizer_dirs["chatml"].resolve())
    with pytest.raises(DatasetError) as e:
        check_dataset_matches_model(pristine, tokenizer_dirs["llama3"])
    message = str(e.value)
    assert message.startswith(f"{pristine / 'manifest.json'}: ")
    assert f"tokenized with the tokenizer of {made_with}" in message
    assert f"not the one of the model {tokenizer_dirs['llama3']}" in message
    assert "re-run preprocessing with this model's tokenizer" in message and "data_output_dir" in message


def test_dataset_of_a_tokenizer_with_another_vocabulary_size_is_refused(pristine, tmp_path):
    other = build_tokenizer(tmp_path / "big", template="chatml", vocab_size=700, corpus_words=20_000)
    with pytest.raises(DatasetError, match=r"tokenizer of .*chatml \(fingerprint \w+, 600 ids\), not the one of the "
                                           rf"model {other} \(fingerprint \w+, 7\d\d ids\)"):
        check_dataset_matches_model(pristine, other)


def test_dataset_rendered_with_another_chat_template_is_refused(pristine, tokenizer_dirs, tmp_path):
    template = tmp_path / "llama3.jinja"
    template.write_text(CHAT_TEMPLATES["llama3"])
    with pytest.raises(DatasetError, match=rf"rendered with the chat template of .*chatml \(fingerprint \w+\), not "
                                           rf"with chat_tmpl_path {template} \(fingerprint \w+\); re-run "
                                           "preprocessing with this template"):
        check_dataset_matches_model(pristine, tokenizer_dirs["chatml"], template)
    same = tmp_path / "chatml.jinja"
    same.write_text(CHAT_TEMPLATES["chatml"])
    check_dataset_matches_model(pristine, tokenizer_dirs["chatml"], same)


def test_dataset_rendered_with_a_template_file_names_that_file(tokenizer_dirs, tmp_path):
    template = tmp_path / "granite.jinja"
    template.write_text(CHAT_TEMPLATES["granite"])
    out = preprocess(tmp_path, tokenizer_dirs["chatml"], tricky_conversations(4), chat_tmpl_path=str(template))
    check_dataset_matches_model(out.output_path, tokenizer_dirs["chatml"], template)
    with pytest.raises(DatasetError, match=f"rendered with {template} "):
        check_dataset_matches_model(out.output_path, tokenizer_dirs["chatml"], tokenizer_dirs["chatml"] /
                                    "chat_template.jinja")


def test_model_without_a_chat_template_checks_only_the_tokenizer(pristine, tokenizer_dirs, tmp_path):
    for style in ("chatml", "llama3"):
        model = shutil.copytree(tokenizer_dirs[style], tmp_path / style)
        (model / "chat_template.jinja").unlink()
        with pytest.raises(ValueError, match="has no chat template"):
            load_tokenizer_files(model)  # the premise: preprocessing could not use this model alone
    check_dataset_matches_model(pristine, tmp_path / "chatml")
    with pytest.raises(DatasetError, match="tokenized with the tokenizer of"):
        check_dataset_matches_model(pristine, tmp_path / "llama3")


def test_synthetic_dataset_needs_ids_the_model_can_embed(tokenizer_dirs, tmp_path):
    fits = write_synthetic_dataset(tmp_path / "fits", np.full(4, 16), 600).path
    check_dataset_matches_model(fits, tokenizer_dirs["chatml"])  # no fingerprint to compare
    too_many = write_synthetic_dataset(tmp_path / "big", np.full(4, 16), 1000).path
    with pytest.raises(DatasetError, match=rf"{too_many / 'manifest.json'}: a synthetic dataset of vocab_size 1000, "
                                           rf"more than the 600 ids the model {tokenizer_dirs['chatml']} can embed"):
        check_dataset_matches_model(too_many, tokenizer_dirs["chatml"])
    # Mock data is made with the model's embedding size (config.json), often above the tokenizer's.
    model = shutil.copytree(tokenizer_dirs["chatml"], tmp_path / "model")
    (model / "config.json").write_text(json.dumps({"vocab_size": 1024}))
    check_dataset_matches_model(too_many, model)


def test_manifest_without_a_tokenizer_fingerprint_is_refused(ds, tokenizer_dirs):
    _edit_manifest(ds, lambda m: m["tokenizer"].pop("fingerprint"))
    with pytest.raises(DatasetError, match=r"manifest.json: this dataset was tokenized .*fingerprint None"):
        check_dataset_matches_model(ds, tokenizer_dirs["chatml"])


def test_the_check_does_not_import_torch(pristine, tokenizer_dirs):
    code = ("import sys; from instructpack.data.tokenizer_check import check_dataset_matches_model as check; "
            "assert 'torch' not in sys.modules, 'imported'; "
            "check(sys.argv[1], sys.argv[2], sys.argv[3]); assert 'torch' not in sys.modules, 'called'")
    proc = subprocess.run([sys.executable, "-c", code, str(pristine), str(tokenizer_dirs["chatml"]),
                           str(tokenizer_dirs["chatml"] / "chat_template.jinja")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
