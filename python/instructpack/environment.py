"""The environment variables InstructLab's users set, read as InstructLab reads them. No
torch here: the launcher checks them before starting anything, the workers read them again.

- TRUST_REMOTE_CODE=1 (or true, yes): trust the model's own code (transformers'
  trust_remote_code), as if TrainingArgs.trust_remote_code were set.
- INSTRUCTLAB_NCCL_TIMEOUT_MS: how long a collective may wait for the other ranks, in
  milliseconds (a positive integer); unset, the default of 30 minutes.
"""

from __future__ import annotations

import os

from .errors import ConfigError

DEFAULT_COLLECTIVE_TIMEOUT_S = 30 * 60.0


def trust_remote_code_from_env() -> bool:
    return os.environ.get("TRUST_REMOTE_CODE", "").strip().lower() in ("1", "true", "yes")


def collective_timeout_s() -> float:
    """Seconds a collective waits (INSTRUCTLAB_NCCL_TIMEOUT_MS); ConfigError when it is set
    to anything but a positive integer."""
    given = os.environ.get("INSTRUCTLAB_NCCL_TIMEOUT_MS")
    if given is None:
        return DEFAULT_COLLECTIVE_TIMEOUT_S
    try:
        ms = int(given)
    except ValueError:
        ms = 0
    if ms <= 0:
        raise ConfigError("environment", ("INSTRUCTLAB_NCCL_TIMEOUT_MS",), "must be a positive integer "
                          "(milliseconds a collective may wait for the other ranks); unset it for 30 minutes",
                          given)
    return ms / 1000.0
