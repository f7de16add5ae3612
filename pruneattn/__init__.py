"""pruneattn: attention-diversity token pruning for vision transformers, with fused Triton kernels.

Set ``TRITON_INTERPRET=1`` before importing to run the Triton kernels on CPU tensors.

``import pruneattn`` itself is light (no torch): the first use of any public name imports the whole
library (torch, the custom ops ``torch.ops.pruneattn.*``), so ``pruneattn --version`` answers at once.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "AttentionStats": "pruneattn.ops",
    "attention_scores": "pruneattn.ops",
    "attention_stats": "pruneattn.ops",
    "backend_for": "pruneattn.backend",
    "default_layers": "pruneattn.patch",
    "image_tokens": "pruneattn.patch",
    "kept_indices": "pruneattn.patch",
    "num_kept": "pruneattn.validate",
    "overlap_patches": "pruneattn.overlap",
    "patch": "pruneattn.patch",
    "patch_processor": "pruneattn.patch",
    "reference": "pruneattn",
    "select_tokens": "pruneattn.ops",
    "split_qkv": "pruneattn.ops",
    "unpatch": "pruneattn.patch",
    "use_backend": "pruneattn.backend",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from pruneattn import reference
    from pruneattn.backend import backend_for, use_backend
    from pruneattn.ops import AttentionStats, attention_scores, attention_stats, select_tokens, split_qkv
    from pruneattn.overlap import overlap_patches
    from pruneattn.patch import default_layers, image_tokens, kept_indices, patch, patch_processor, unpatch
    from pruneattn.validate import num_kept


def _bind(name: str) -> Any:
    """Import public ``name`` into the package."""
    names = sys.modules[__name__].__dict__
    if name not in names:
        module = _EXPORTS[name]
        names[name] = (importlib.import_module(f"{module}.{name}") if module == __name__
                       else getattr(importlib.import_module(module), name))
    return names[name]


class _Package(types.ModuleType):
    """The package module: its public names are imported on first use."""

    def __getattr__(self, name: str) -> Any:
        if name not in _EXPORTS:
            raise AttributeError(f"module 'pruneattn' has no attribute {name!r}")
        if _EXPORTS[name] == __name__:  # a submodule (the library's own modules import it while loading)
            return _bind(name)
        for each in _EXPORTS:  # the first function used loads them all, custom ops included
            _bind(each)
        return self.__dict__[name]

    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the subpackage pruneattn.patch binds it here as "patch"; the public function keeps the name.
        if name in _EXPORTS and _EXPORTS[name] != __name__ and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_EXPORTS))


sys.modules[__name__].__class__ = _Package
