"""Was a preprocessed dataset made with this model's tokenizer? Token ids only mean something to
the tokenizer that made them: a dataset tokenized for another model trains without any
error, on what is to this model noise. Checked by the launcher before workers start, so
nothing here imports torch."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DatasetError
from .chat import load_tokenizer_files, tokenizer_identity
from .manifest import MANIFEST, read_manifest


def check_dataset_matches_model(dataset_path: str | Path, model_path: str | Path,
                                chat_tmpl_path: str | Path | None = None) -> None:
    """Raises DatasetError if the dataset at `dataset_path` was tokenized with another
    tokenizer than `model_path`'s, or (when `chat_tmpl_path` is given) rendered with
    another chat template. A synthetic dataset only needs its ids to fit the model."""
    manifest = read_manifest(dataset_path)
    where = Path(dataset_path) / MANIFEST
    made_with = manifest.tokenizer
    if manifest.synthetic is not None:
        _check_synthetic(where, made_with.vocab_size, model_path)
        return

    fix = (f"re-run preprocessing with this model's tokenizer (process_data=True, or instructpack-preprocess "
           f"--model-path {model_path}), or point data_output_dir at a dataset made for {model_path}")
    # With a template file, one read gives both fingerprints; without one, the model's own
    # template does not matter (and it may have none): only the token ids must agree.
    tokenizer = tokenizer_identity(model_path) if chat_tmpl_path is None else \
        load_tokenizer_files(model_path, chat_tmpl_path)
    if (made_with.fingerprint, made_with.vocab_size) != (tokenizer.fingerprint, tokenizer.vocab_size):
        raise DatasetError(
            f"{where}: this dataset was tokenized with the tokenizer of {made_with.path} (fingerprint "
            f"{made_with.fingerprint}, {made_with.vocab_size} ids), not the one of the model "
            f"{model_path} (fingerprint {tokenizer.fingerprint}, {tokenizer.vocab_size} ids): its token ids would "
            f"mean other text to this model; {fix}")
    if chat_tmpl_path is not None and manifest.imported is None:  # InstructLab's data.jsonl records no template
        rendered_with = manifest.chat_template
        fingerprint = rendered_with.fingerprint if rendered_with is not None else None
        if fingerprint != tokenizer.template_fingerprint:
            # The manifest's path is None when the data used the model's own template.
            made = (rendered_with.path if rendered_with is not None else None) or \
                f"the chat template of {made_with.path}"
            raise DatasetError(
                f"{where}: this dataset was rendered with {made} (fingerprint {fingerprint}), "
                f"not with chat_tmpl_path {chat_tmpl_path} (fingerprint {tokenizer.template_fingerprint}); re-run "
                "preprocessing with this template (process_data=True), or point data_output_dir at a dataset "
                "rendered with it")


def _check_synthetic(where: Path, vocab_size: int, model_path: str | Path) -> None:
    """Random ids must be ids the model can embed: its embedding rows (config.json), which
    training grows to the tokenizer's size when that is larger."""
    sizes = []
    config = Path(model_path) / "config.json"
    if config.is_file():
        size = json.loads(config.read_text(encoding="utf-8")).get("vocab_size")
        if isinstance(size, int) and not isinstance(size, bool):
            sizes.append(size)
    if (Path(model_path) / "tokenizer.json").is_file() or not sizes:
        sizes.append(tokenizer_identity(model_path).vocab_size)
    if vocab_size > max(sizes):
        raise DatasetError(f"{where}: a synthetic dataset of vocab_size {vocab_size!r}, more than the {max(sizes)} "
                           f"ids the model {model_path} can embed; delete {where.parent} so that a new one is "
                           "generated for this model, or point data_output_dir elsewhere")
