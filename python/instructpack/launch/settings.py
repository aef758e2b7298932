"""The settings a run uses: the caller's objects, checked as they are at the call (they are
mutable, and clients such as InstructLab's CLI set fields after building them), then read
the way InstructLab reads them, into copies. The caller's objects are left as they were
(InstructLab writes use_legacy_tmpl's template into the caller's own chat_tmpl_path).

How they are read:
- LoraOptions with rank 0 is no LoRA (InstructLab's CLI always passes one);
- a bool field given as None (InstructLab types them Optional) is off;
- `use_legacy_tmpl` selects InstructLab's legacy Granite template module;
- TRUST_REMOTE_CODE=1 (or true, yes) in the environment turns trust_remote_code on, and
  INSTRUCTLAB_NCCL_TIMEOUT_MS is checked here, before anything starts (environment.py);
- a model_path that is a Hub id ("org/name") is the snapshot in the Hugging Face cache
  (downloaded when online; hub.py).
"""

from __future__ import annotations

import copy
from pathlib import Path

from .. import chat_templates
from ..callbacks import check_callbacks
from ..config import TorchrunArgs, TrainingArgs
from ..environment import collective_timeout_s, trust_remote_code_from_env
from ..hub import resolve_model_path

LEGACY_TEMPLATE = Path(chat_templates.__file__).parent / "ibm_legacy_tmpl.py"
_OPTIONAL_BOOLS = ("mock_data", "disable_flash_attn", "process_data", "keep_last_checkpoint_only")


def effective_settings(t: TorchrunArgs, args: TrainingArgs) -> tuple[TorchrunArgs, TrainingArgs]:
    """Copies of `t` and `args`, checked (ConfigError names the field) and read as above."""
    t = t.model_copy(deep=True)
    t.validate()
    # Callbacks are the caller's own objects: shared, not copied.
    args = copy.deepcopy(args, memo={id(args.callbacks): args.callbacks})
    args.validate()
    if args.lora is not None and not args.lora.enabled:
        args.lora = None
    for name in _OPTIONAL_BOOLS:
        setattr(args, name, bool(getattr(args, name)))
    for options, name in ((args.deepspeed_options, "cpu_offload_optimizer"),
                          (args.deepspeed_options, "cpu_offload_optimizer_pin_memory"),
                          (args.fsdp_options, "cpu_offload_params")):
        setattr(options, name, bool(getattr(options, name)))
    if args.use_legacy_tmpl:
        args.chat_tmpl_path = str(LEGACY_TEMPLATE)
    collective_timeout_s()  # the workers read it; a bad value is reported now, not by every rank
    args.trust_remote_code = bool(args.trust_remote_code or trust_remote_code_from_env())
    args.model_path = resolve_model_path(args.model_path, trust_remote_code=args.trust_remote_code)
    args.callbacks = check_callbacks(args.callbacks) or None
    return t, args
