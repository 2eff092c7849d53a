"""The methods a model gets from hf_pruning (``model.prune_``, ``model.apply_plan_``, ``model.save_pretrained``,
``model.push_to_hub``), kept in one table that the modules defining them fill.

``api`` registers ``prune_`` and ``apply_plan_``; ``publish`` registers ``save_pretrained`` and ``push_to_hub``
when it is imported (the package's ``__init__`` imports both, so the table is full before any model is bound).
The table lets ``api`` bind the saving methods without importing ``publish``, which sits above it.
"""

from __future__ import annotations

import types
from collections.abc import Callable

from torch import nn

#: set in a model's ``__dict__`` by :func:`bind`: the class-level methods below serve this model
_BOUND = "_hf_pruning_bound"

#: name -> function (model first) of every method :func:`bind` gives a model, in registration order
MODEL_METHODS: dict[str, Callable] = {}


def model_method(func: Callable) -> Callable:
    """Register ``func(model, ...)`` as a method that :func:`bind` gives models (under ``func.__name__``)."""
    MODEL_METHODS[func.__name__] = func
    return func


class _ModelMethod:
    """A method :func:`bind` adds to a model's class (a non-data descriptor).

    On a model that ``bind`` marked it is ``func`` bound to that model; on any other instance, and on the class
    itself (``type(model).save_pretrained``), it is whatever the class had before: its own attribute or the
    inherited one (transformers' ``save_pretrained``), or no attribute at all.

    Why on the class: a ``types.MethodType`` stored on its own instance is a reference cycle (model -> method ->
    model), so ``del model`` would free nothing until the garbage collector runs (a replaced model's GPU memory
    stays in a loop); a weak reference instead would break ``from_pretrained(path).prune_(config)``, where
    nothing else holds the model while the method runs.
    """

    def __init__(self, func, owner: type, own=None):
        self.func, self.owner, self.own = func, owner, own
        self.name = func.__name__

    def _previous(self, obj, cls: type):
        """What the attribute was without this descriptor."""
        attr = self.own
        if attr is None:
            mro = cls.__mro__
            attr = next((k.__dict__[self.name] for k in mro[mro.index(self.owner) + 1:] if self.name in k.__dict__),
                        None)
        if attr is None:
            raise AttributeError(f"{cls.__name__!r} object has no attribute {self.name!r}")
        return attr.__get__(obj, cls) if hasattr(attr, "__get__") else attr

    def __get__(self, obj, cls=None):
        cls = type(obj) if cls is None else cls
        if obj is not None and obj.__dict__.get(_BOUND, False):
            return types.MethodType(self.func, obj)
        return self._previous(obj, cls)


def bind(model: nn.Module) -> nn.Module:
    """Give a model every method of :data:`MODEL_METHODS`: ``model.prune_(...)``, ``model.apply_plan_(...)``, an
    atomic ``save_pretrained`` that writes a model card, and a ``push_to_hub`` that uploads the same files in one
    commit. Returns the model.

    The methods live on the model's class and serve only models marked here (see :class:`_ModelMethod`): the
    model holds no reference to itself, so ``del model`` frees it without the garbage collector.
    """
    cls = type(model)
    for func in MODEL_METHODS.values():
        current = cls.__dict__.get(func.__name__)
        if not (isinstance(current, _ModelMethod) and current.func is func):
            setattr(cls, func.__name__, _ModelMethod(func, cls, own=current))
        old = model.__dict__.get(func.__name__)
        if isinstance(old, types.MethodType) and old.__func__ is func:  # bound per instance by an older version
            del model.__dict__[func.__name__]
    model.__dict__[_BOUND] = True
    return model
