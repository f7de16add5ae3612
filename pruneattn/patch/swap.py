"""Swapping a module's class in place (as ToMe does): restorable, and picklable in a fresh process.

A swapped class is ``type(name, (mixin, original), {})``: it adds behaviour, no parameters, so the
``state_dict`` is the original's. The original class is always the swapped class's last base, so
nothing needs storing to undo a swap. Instances pickle as "make the (mixin, original) class again,
then load the state", so ``torch.save(model)`` of a patched model (a user's subclass included) loads
wherever pruneattn is importable, without the swapped class existing beforehand.
"""
from __future__ import annotations

from torch import nn

_DERIVED: dict[tuple[type, type], type] = {}


class Swapped:
    """Base of every mixin that pruneattn swaps into a module's class."""

    def __reduce_ex__(self, protocol: int):
        reduced = super().__reduce_ex__(protocol)
        mixin, original = type(self).__bases__
        return (_new_instance, (mixin, original), *reduced[2:])

    def __prepare_scriptable__(self):
        """``torch.jit.script`` asks this first: refuse with the ways that do work."""
        raise TypeError(
            f"pruneattn: a patched {type(self).__bases__[-1].__name__} cannot be compiled by torch.jit.script "
            "(its pruning step is Python with data-dependent token counts); use torch.jit.trace, "
            "torch.compile or torch.export instead"
        )


def _new_instance(mixin: type, original: type) -> nn.Module:
    cls = derived_class(mixin, original)
    return cls.__new__(cls)


def derived_class(mixin: type, original: type) -> type:
    """The class ``(mixin, original)``, made once per pair (so that ``isinstance`` and compile caches hold)."""
    key = (mixin, original)
    if key not in _DERIVED:
        # A mixin with ``keeps_name`` keeps the original's name and module: transformers saves the name in
        # configs, and treats a model whose class lives outside ``transformers.`` as custom code (its
        # ``init_weights`` and ``from_pretrained`` then skip the model's own initialization of submodules).
        if getattr(mixin, "keeps_name", False):
            name, module = original.__name__, original.__module__
        else:
            name, module = f"Pruned{original.__name__}", mixin.__module__
        _DERIVED[key] = type(name, (mixin, original), {"__module__": module, "__qualname__": name})
    return _DERIVED[key]


def is_swapped(module: nn.Module) -> bool:
    return isinstance(module, Swapped)


def original_class(module: nn.Module) -> type:
    """The class ``module`` had before pruneattn swapped it (its own class if it was not swapped)."""
    return type(module).__bases__[-1] if is_swapped(module) else type(module)


def swap(module: nn.Module, mixin: type) -> None:
    """Give ``module`` the class ``(mixin, its original class)``; a swapped module is swapped again from
    its original class."""
    module.__class__ = derived_class(mixin, original_class(module))


def restore(module: nn.Module) -> None:
    """Give ``module`` back its original class (nothing if it was not swapped)."""
    module.__class__ = original_class(module)
