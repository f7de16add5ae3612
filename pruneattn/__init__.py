"""pruneattn: attention-diversity token pruning for vision transformers, with fused Triton kernels.

Set ``TRITON_INTERPRET=1`` before importing to run the Triton kernels on CPU tensors.
"""
from __future__ import annotations

from pruneattn import reference
from pruneattn.backend import backend_for, use_backend
from pruneattn.ops import AttentionStats, attention_scores, attention_stats, select_tokens, split_qkv
from pruneattn.overlap import overlap_patches
from pruneattn.patch import default_layers, kept_indices, patch, unpatch
from pruneattn.validate import num_kept

__version__ = "0.1.0"

__all__ = [
    "AttentionStats",
    "attention_scores",
    "attention_stats",
    "backend_for",
    "default_layers",
    "kept_indices",
    "num_kept",
    "overlap_patches",
    "patch",
    "reference",
    "select_tokens",
    "split_qkv",
    "unpatch",
    "use_backend",
]
