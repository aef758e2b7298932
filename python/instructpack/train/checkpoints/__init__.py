"""Checkpoints: when they are due and where they go (schedule.py), Hugging Face exports
(hf.py, with the LoRA merge in lora_export.py), full training states for exact resume
(full_state.py; which one a run may resume: identity.py, torch-free), DeepSpeed-native ones
(native.py), and how several ranks write one checkpoint and fail together (collective.py)."""
