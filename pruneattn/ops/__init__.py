"""Public ops: validated, registered as ``torch.library`` custom ops, one file per op.

Each op checks its arguments, then calls its custom op (opaque to ``torch.compile``, so no graph
break), whose implementation is the one :func:`pruneattn.backend.implementation` picks.
"""
from __future__ import annotations

from pruneattn.ops.attention_stats import AttentionStats, attention_scores, attention_stats
from pruneattn.ops.select_tokens import select_per_image, select_tokens, valid_after
from pruneattn.ops.split_qkv import split_qkv

__all__ = ["AttentionStats", "attention_stats", "attention_scores", "select_per_image", "select_tokens", "split_qkv", "valid_after"]
