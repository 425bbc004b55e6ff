"""asam_compile.sparse: opt chosen modules (or module classes) into the ASAM adaptive sparse mode.

    @asam_compile.sparse(coverage=0.95)            # every instance of the class
    class MyAttention(nn.Module): ...

    asam_compile.sparse(model.model.layers[8:])    # these instances only
    torch.compile(model, backend="asam")            # marked sites go sparse, the others stay exact

Marking changes nothing in eager mode. An attention site goes sparse when a marked module is on its
nn_module_stack (the innermost mark's settings win, over the backend's options).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import torch

from asam_compile.config import SPARSE_FIELDS, _validate

_MARK = "__asam_sparse__"


def sparse(target: Any = None, /, **settings: Any) -> Any:
    """Mark modules or module classes for adaptive sparse attention; returns `target`.

    `target`: an nn.Module class (decorator use, with or without arguments), an nn.Module instance, or an
    iterable of modules (a ModuleList or a slice of one: each element is marked). Settings are fields of
    asam_compile.SparseSettings (block_size, coverage, max_density, min_seq_len, window, sinks, dense_fallback,
    estimator); those not given come from the backend's `sparse` option. `enabled=False` removes a mark.
    """
    enabled = settings.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise TypeError(f"asam_compile.sparse: enabled={enabled!r} is not allowed; expected True or False")
    marks = _checked(settings)
    if target is None:  # @sparse(...) with arguments
        return functools.partial(_mark, marks=marks, enabled=enabled)
    return _mark(target, marks=marks, enabled=enabled)


def _checked(settings: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(settings) - set(SPARSE_FIELDS))
    if unknown:
        raise ValueError(
            f"asam_compile.sparse: unknown setting(s) {unknown}; allowed are {sorted(SPARSE_FIELDS)} and enabled"
        )
    for key, value in settings.items():
        _validate(key, value)
    return dict(settings)


def _mark(target: Any, *, marks: dict[str, Any], enabled: bool) -> Any:
    if isinstance(target, type):
        if not issubclass(target, torch.nn.Module):
            raise TypeError(f"asam_compile.sparse: {target.__qualname__} is a class but not an nn.Module subclass")
        if enabled:
            setattr(target, _MARK, dict(marks))
        elif _MARK in vars(target):
            delattr(target, _MARK)
        return target
    if isinstance(target, torch.nn.Module) and not isinstance(target, (torch.nn.ModuleList, torch.nn.Sequential)):
        _mark_instance(target, marks, enabled)
        return target
    if isinstance(target, (torch.nn.ModuleList, torch.nn.Sequential, list, tuple)):
        items = list(target)
        bad = [type(m).__name__ for m in items if not isinstance(m, torch.nn.Module)]
        if bad:
            raise TypeError(f"asam_compile.sparse: expected modules, got {bad[0]} in {type(target).__name__}")
        for m in items:
            _mark_instance(m, marks, enabled)
        return target
    raise TypeError(
        f"asam_compile.sparse: expected an nn.Module, a module class or a list of modules, got "
        f"{type(target).__name__}"
    )


# Note [Marking instances]
# Dynamo records, for every node, the stack of modules it was called from as (path, type(module)). A
# mark must therefore be visible on the type: a marked instance gets its own subclass of its class, with
# the same name and no new behaviour, holding the settings. Its class changing also fails Dynamo's guards
# on the module, so a model compiled before marking recompiles. Pickling and deepcopy keep the mark
# (__reduce_ex__ rebuilds the marked subclass from the original class and the settings).


@functools.lru_cache(maxsize=None)
def _marked_class(base: type, frozen: tuple[tuple[str, Any], ...]) -> type:
    return type(
        base.__name__,
        (base,),
        {
            _MARK: dict(frozen),
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__reduce_ex__": _reduce_marked,
            "_asam_base": base,
        },
    )


def _new_marked(base: type, frozen: tuple[tuple[str, Any], ...]) -> Any:
    cls = _marked_class(base, frozen)
    return cls.__new__(cls)


def _reduce_marked(self: Any, protocol: int) -> Any:
    cls = type(self)
    state = self.__getstate__() if hasattr(self, "__getstate__") else self.__dict__
    return _new_marked, (cls._asam_base, tuple(sorted(vars(cls)[_MARK].items()))), state


def _mark_instance(module: torch.nn.Module, marks: dict[str, Any], enabled: bool) -> None:
    base = getattr(type(module), "_asam_base", type(module))
    if enabled:
        module.__class__ = _marked_class(base, tuple(sorted(marks.items())))
    else:
        module.__class__ = base


def settings_for(module_types: Iterable[type]) -> dict[str, Any] | None:
    """The sparse settings of the innermost marked module type in an nn_module_stack (outermost first)."""
    found = None
    for cls in module_types:
        mark = getattr(cls, _MARK, None) if isinstance(cls, type) else None
        if mark is not None:
            found = mark
    return found
