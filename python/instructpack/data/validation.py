"""The validation split (`validation_split`, `random_seed`): which samples of a dataset are
held out of training to measure the validation loss on. Made once, by the launcher, before
any planning, and stored beside the dataset (validation-<key>.json, the key naming the
dataset's shards, the fraction and the seed), so that a resumed run, or another run with
the same settings, holds out exactly the same samples. No torch here.

The split is a seeded draw of round(fraction x samples) samples (at least one); the
training sampler plans only the others, so a held-out sample is never trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DatasetError
from ..fileio import replace_file
from .manifest import Manifest


@dataclass(frozen=True)
class Split:
    path: Path
    train: np.ndarray  # sample ids, ascending
    validation: np.ndarray


def split_path(dataset_path: str | Path, manifest: Manifest, fraction: float, seed: int) -> Path:
    shards = [(s.file, s.checksum) for s in manifest.shards]
    key = hashlib.sha256(json.dumps([shards, repr(float(fraction)), int(seed)]).encode()).hexdigest()[:16]
    return Path(dataset_path) / f"validation-{key}.json"


def make_split(dataset_path: str | Path, manifest: Manifest, num_samples: int, fraction: float, seed: int) -> Split:
    """The stored split for these settings, made (and stored) when there is none yet."""
    path = split_path(dataset_path, manifest, fraction, seed)
    if path.is_file():
        return read_split(path, num_samples)
    held_out = max(1, round(fraction * num_samples))
    if held_out >= num_samples:
        raise ConfigError("training_args", ("validation_split",), f"holds out {held_out} of the dataset's "
                          f"{num_samples} samples, leaving none to train on; lower it", fraction)
    validation = np.sort(np.random.default_rng(seed).permutation(num_samples)[:held_out])
    replace_file(path, json.dumps({"fraction": fraction, "seed": seed, "num_samples": num_samples,
                                   "validation": validation.tolist()}).encode())
    return _split(path, num_samples, validation)


def read_split(path: Path, num_samples: int) -> Split:
    try:
        data = json.loads(path.read_text())
        validation = np.asarray(data["validation"], dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: unreadable validation split ({e}); delete it to draw the split again") from None
    if data.get("num_samples") != num_samples or (len(validation) and (validation.min() < 0 or
                                                                       validation.max() >= num_samples)):
        raise DatasetError(f"{path}: a validation split of another dataset; delete it to draw the split again")
    return _split(path, num_samples, validation)


def _split(path: Path, num_samples: int, validation: np.ndarray) -> Split:
    keep = np.ones(num_samples, dtype=bool)
    keep[validation] = False
    return Split(path=path, train=np.flatnonzero(keep), validation=validation)
