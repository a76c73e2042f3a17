"""Checkpoint loading: single-file detection, key maps and export (see DESIGN rule 5)."""
from .detect import detect_single_file
from .export import save_single_file
from .keymaps import (Rename, UnknownCheckpointError, apply_op, canonical_clip_keys, ldm_to_ours,
                      modernize_vae_keys, unused_keys)

__all__ = ["Rename", "UnknownCheckpointError", "apply_op", "canonical_clip_keys", "detect_single_file",
           "ldm_to_ours", "modernize_vae_keys", "save_single_file", "unused_keys"]
