"""What the lifter (passes/lift.py) reads from the FX graph around a mask: op names, symbolic sizes (Note [Symbolic
sizes] in lift.py), where a value comes from (placeholders, module attributes, in-place writes, run-time inputs),
and which tensors are small enough to be read by index (Notes [Small constants], [Masks read at run time])."""

from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx as fx

from asam_compile import _compat

Tensor = torch.Tensor

_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.iand, operator.ior, operator.ixor}


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    if isinstance(t, str):
        return t
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", None) or str(t)
    if mod == "_operator":
        return f"operator.{name}"
    if type(t).__name__ in ("OpOverload", "OpOverloadPacket"):
        return str(t)  # aten.cumsum.default
    if mod.startswith("torch"):
        return f"torch.{name}"
    return name


def _is_symbolic(x: Any) -> bool:
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    if isinstance(x, Tensor):
        return any(isinstance(d, torch.SymInt) for d in x.shape)
    if isinstance(x, (tuple, list)):
        return any(_is_symbolic(y) for y in x)
    return False


_SYM_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool)


def _symbols_in(x: Any) -> list[Any]:
    """The SymInts / SymFloats / SymBools in a (nested) argument."""
    if isinstance(x, _SYM_TYPES):
        return [x]
    if isinstance(x, (tuple, list)):
        return [s for y in x for s in _symbols_in(y)]
    if isinstance(x, dict):
        return [s for y in x.values() for s in _symbols_in(y)]
    if isinstance(x, slice):
        return _symbols_in((x.start, x.stop, x.step))
    return []


def _sym_str(x: Any) -> str:
    try:
        return str(_compat.sym_expr(x))
    except Exception:  # noqa: BLE001
        return str(x)


def _is_backed(x: Any) -> bool:
    try:
        return _compat.sym_hint(x) is not None
    except Exception:  # noqa: BLE001
        return False


def _is_size_like(x: Any) -> bool:
    """A python constant, or sizes in Dynamo's terms: SymInts and tuples (torch.Size) of them."""
    if isinstance(x, _SYM_TYPES):
        return True
    if isinstance(x, (tuple, list)):
        return all(_is_size_like(y) for y in x)
    return _is_python_constant(x)


def _hint_shape(shape: Sequence[Any]) -> tuple[int, ...]:
    """The example's sizes: a SymInt's hint (its value in the example Dynamo traced)."""
    return tuple(int(_compat.sym_hint(d)) if isinstance(d, torch.SymInt) else int(d) for d in shape)


def _standin(k: int) -> int:
    """The k-th stand-in for a size symbol: distinct primes far from usual sizes, small enough that a 4-D
    meta tensor of them does not overflow int64. See Note [Symbolic sizes]."""
    import sympy

    return int(sympy.nextprime(1000 * (k + 7)))


def _is_python_constant(x: Any) -> bool:
    if isinstance(x, (bool, int, float, str, torch.dtype, torch.device, torch.Size, type(None), type(Ellipsis))):
        return True
    if isinstance(x, (tuple, list)):
        return all(_is_python_constant(y) for y in x)
    return False


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _placeholder_source(node: fx.Node) -> str:
    return _compat.placeholder_source(node) or ""


def _placeholder_kind(node: fx.Node) -> str:
    """"buffer", "parameter" or "input": where Dynamo got this graph input from."""
    source = _placeholder_source(node)
    if "._buffers[" in source:
        return "buffer"
    if "._parameters[" in source:
        return "parameter"
    return "input"


def _mutation(node: fx.Node) -> fx.Node | None:
    """A user of `node` that changes it in place, if any: its lifted value would then be stale."""
    for u in node.users:
        if u.op == "call_method" and isinstance(u.target, str) and u.target.endswith("_") and not u.target.startswith("__"):
            if u.args and u.args[0] is node:
                return u
        if u.op == "call_function" and u.target in _INPLACE_FUNCTIONS and u.args and u.args[0] is node:
            return u
        if u.op == "call_function" and "out" in u.kwargs and u.kwargs["out"] is node:
            return u
        name = getattr(u.target, "__name__", "")
        inplace_fn = name.endswith("_") and not name.startswith("_") and getattr(u.target, "__module__", "") != "_operator"
        if u.op == "call_function" and inplace_fn and u.args and u.args[0] is node:  # torch.Tensor.add_
            return u
    return None


def _runtime_inputs(node: fx.Node, values_only: bool = False) -> list[str]:
    """Names of graph inputs (not buffers) whose values `node` may read. values_only: not counting inputs
    read only through a size query (`.shape`, `.size()`: Dynamo guards those)."""
    seen, stack, found = set(), [node], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if values_only and n is not node and _is_size_query(n):
            continue
        if n.op == "placeholder" and isinstance(_compat.example_value(n), Tensor) and _placeholder_kind(n) != "buffer":
            found.append(n.name)
        stack.extend(n.all_input_nodes)
    return sorted(found)


# Note [Small constants]
# Per-token vectors that a mask indexes (HF's packed_sequence_mask, segment ids made from aranges) are
# often computed with ops that are not index arithmetic (cumsum, diff). When such a tensor is a vector
# (one dim of size > 1, at most _SMALL_CONSTANT elements: O(L), never L x S; batch 1, so HF's (B, L)
# vectors qualify only for B = 1), has a static shape, and reads no tensor values
# but buffers' (only sizes of inputs), it is the same on every call: it is evaluated once at compile time
# and read by index, exactly like a buffer. Its graph node still computes it at run time and is passed to
# Flex (a Capture, Note [Captured tensors in Flex]); the block mask built at compile time from the
# evaluated value is valid because the value cannot change while the shapes do not (Dynamo guards them).
_SMALL_CONSTANT = 1 << 20

# Note [Masks read at run time]
# A mask that reads the values of a runtime input (HF's padding mask `attention_mask[b, kv]`, the document
# ids HF computes from caller-given position_ids) cannot become a block mask at compile time. With
# lift(..., runtime=True) such values are lifted as captured tensors read by index, like buffers: a
# runtime graph input used as a tensor, and any node computed from runtime inputs by ops that are not
# index arithmetic (cumsum, diff), provided the value is small (at most _SMALL_CONSTANT elements, static
# shape: per-token vectors such as (B, L), never an L x S tensor made at compile time). Their `tensor` is the
# example's value (for the cost model's density and the name only); the rewritten graph passes the traced
# value to an in-graph block-mask build (asam_compile.kernels.runtime.block_mask_tensors_call) on every call.


def _is_small(ev: Any) -> bool:
    """A tensor that may be evaluated at compile time and read by index (Notes [Small constants], [Masks read
    at run time]): not complex, static shape, at most _SMALL_CONSTANT elements."""
    return (isinstance(ev, Tensor) and not ev.is_complex() and not any(_is_symbolic(d) for d in ev.shape)
            and ev.numel() <= _SMALL_CONSTANT)


def ancestors(*nodes: fx.Node) -> set[fx.Node]:
    """The nodes and every node they are computed from."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _is_size_query(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in ("size", "dim", "numel"):
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in ("shape", "ndim", "dtype", "device", "is_cuda", "layout")
    return _is_size_like(_compat.example_value(node)) and node.op != "placeholder"
