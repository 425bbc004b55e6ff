"""normalize: rewrite the many spellings of the ops attention is made of into one canonical call each.

    a @ b, a.matmul(b), torch.bmm(a, b)          ->  torch.matmul(a, b)
    x.softmax(-1), F.softmax(x, dim=-1, dtype=d)  ->  torch.softmax(x, -1, dtype=d)
    x.mT, x.transpose(2, 3), x.swapaxes(...)      ->  torch.transpose(x, i, j)
    x.float(), x.type_as(y), x.to(dtype=d)        ->  x.to(d)

Every rewrite maps an op to the identical op (same kernel, same rounding), so this pass never changes
numbers; it only shrinks what the matcher has to recognise.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx

from asam_compile import _compat
from asam_compile.passes import PassContext, StageResult

log = logging.getLogger(__name__)

F = torch.nn.functional

MATMULS = {operator.matmul, torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm}
SOFTMAXES = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax}
LOG_SOFTMAXES = {F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax}
EINSUMS = {torch.einsum, torch.functional.einsum}
MULS = {operator.mul, torch.mul, torch.Tensor.mul}
DIVS = {operator.truediv, torch.div, torch.true_divide, torch.Tensor.div, torch.Tensor.true_divide}
ADDS = {operator.add, torch.add, torch.Tensor.add}
SUBS = {operator.sub, torch.sub, torch.Tensor.sub}
TRANSPOSES = {torch.transpose, torch.swapaxes, torch.swapdims, torch.Tensor.transpose}
MASKED_FILLS = {torch.masked_fill, torch.Tensor.masked_fill}
WHERES = {torch.where}
BADDBMMS = {torch.baddbmm, torch.Tensor.baddbmm}
DTYPE_METHODS = {
    "float": torch.float32,
    "double": torch.float64,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Ops whose result may share storage with their first argument.
VIEW_NAMES = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "expand", "expand_as", "unsqueeze",
    "squeeze", "contiguous", "narrow", "select", "unflatten", "flatten", "split", "split_with_sizes", "chunk",
    "unbind", "t", "detach", "as_strided", "to", "type", "type_as", "float", "half", "bfloat16", "double",
    "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal", "unfold", "real", "imag", "getitem", "broadcast_to",
    "tensor_split", "hsplit", "vsplit", "dsplit", "view_as_real", "view_as_complex", "alias", "squeeze_", "unsqueeze_",
    "T", "mT", "H", "mH", "data", "align_as", "rename", "numpy_T",
})

_METHOD_TO_FN = {
    "matmul": torch.matmul,
    "bmm": torch.matmul,
    "__matmul__": torch.matmul,
    "softmax": torch.softmax,
    "log_softmax": torch.log_softmax,
    "transpose": torch.transpose,
    "swapaxes": torch.transpose,
    "swapdims": torch.transpose,
    "mul": torch.mul,
    "div": torch.div,
    "true_divide": torch.div,
    "add": torch.add,
    "sub": torch.sub,
    "masked_fill": torch.masked_fill,
    "baddbmm": torch.baddbmm,
}


def _is_tensor(x: Any) -> bool:
    return isinstance(_compat.example_value(x), torch.Tensor)


def _ndim(x: Any) -> int:
    return _compat.example_value(x).dim()


def canonical(node: fx.Node) -> tuple[Any, tuple, dict] | None:
    """The canonical (target, args, kwargs) of a call_function node equal to `node`, or None."""
    if node.op == "call_method":
        name = node.target
        if name in ("expand_as", "view_as", "reshape_as") and len(node.args) == 2 and not node.kwargs:
            # Note [Shape-only reads]: x.expand_as(scores) reads only the size of scores
            other = _compat.example_value(node.args[1])
            if _is_tensor(node.args[0]) and isinstance(other, torch.Tensor) and all(isinstance(d, int) for d in other.shape):
                return name.removesuffix("_as"), (node.args[0], *other.shape), {}
            return None
        if name in DTYPE_METHODS and len(node.args) == 1 and not node.kwargs:
            return "to", (node.args[0], DTYPE_METHODS[name]), {}
        if name in ("type", "to", "type_as"):
            return _canonical_cast(node)
        fn = _METHOD_TO_FN.get(name)
        if fn is None:
            return None
        return _canonical_call(fn, node.args, dict(node.kwargs), node)
    if node.op == "call_function":
        if node.target is getattr and len(node.args) == 2 and node.args[1] == "mT" and _is_tensor(node.args[0]):
            return torch.transpose, (node.args[0], -2, -1), {}
        return _canonical_call(node.target, node.args, dict(node.kwargs), node)
    return None


# Note [Shape-only reads]
# DistilBERT (and PyTorch's _sfdp_pattern_15/17/20) builds its mask as `(m == 0).view(...).expand_as(scores)`:
# that reads only the scores' size, but as a second user of the scores it would keep them alive and stop the
# matcher (the scores "escape"). With static sizes, x.expand_as(y) is x.expand(*y.shape) (likewise view_as,
# reshape_as): the same op, and the scores keep one reader.


def _canonical_cast(node: fx.Node) -> tuple[Any, tuple, dict] | None:
    x, *rest = node.args
    kwargs = dict(node.kwargs)
    val = _compat.example_value(node)
    if not isinstance(val, torch.Tensor) or not _is_tensor(x):
        return None
    if node.target == "type_as":
        return "to", (x, val.dtype), {}
    # x.to(dtype) / x.to(dtype=...) / x.type(dtype): only pure dtype casts on the same device
    allowed = {"dtype", "copy", "non_blocking"} if node.target == "to" else {"dtype"}
    if set(kwargs) - allowed or kwargs.get("copy"):
        return None
    if len(rest) > 1 or (rest and not isinstance(rest[0], torch.dtype)):
        return None
    if _compat.example_value(x).device != val.device:
        return None
    return "to", (x, val.dtype), {}


def _canonical_call(fn: Any, args: tuple, kwargs: dict, node: fx.Node) -> tuple[Any, tuple, dict] | None:
    if fn in MATMULS:
        a, b = args
        if not (_is_tensor(a) and _is_tensor(b)):
            return None
        return torch.matmul, (a, b), {}
    if fn in SOFTMAXES or fn in LOG_SOFTMAXES:
        target = torch.softmax if fn in SOFTMAXES else torch.log_softmax
        x = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        dtype = kwargs.get("dtype", args[3] if fn in (F.softmax, F.log_softmax) and len(args) > 3 else None)
        if fn in (torch.softmax, torch.log_softmax, torch.Tensor.softmax, torch.Tensor.log_softmax):
            dtype = kwargs.get("dtype", args[2] if len(args) > 2 else None)
        if dim is None or not isinstance(dim, int):
            return None
        return target, (x, dim), ({"dtype": dtype} if dtype is not None else {})
    if fn in EINSUMS:
        eq, *ops = args
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        if kwargs or not isinstance(eq, str):
            return None
        return torch.einsum, (eq, *ops), {}
    if fn in TRANSPOSES:
        x, d0, d1 = (list(args) + [kwargs.get("dim0"), kwargs.get("dim1")])[:3]
        if not (_is_tensor(x) and isinstance(d0, int) and isinstance(d1, int)):
            return None
        n = _ndim(x)
        return torch.transpose, (x, d0 % n, d1 % n), {}
    if fn in MULS or fn in DIVS or fn in ADDS or fn in SUBS:
        if len(args) != 2 or not _is_tensor(node):
            return None
        if fn in DIVS and kwargs.get("rounding_mode") is not None:
            return None
        if fn in (ADDS | SUBS) and kwargs.get("alpha", 1) != 1:
            return None
        if set(kwargs) - {"alpha", "rounding_mode"}:
            return None
        target = torch.mul if fn in MULS else torch.div if fn in DIVS else torch.add if fn in ADDS else torch.sub
        return target, tuple(args), {}
    if fn in BADDBMMS:  # (input, batch1, batch2, *, beta, alpha), number coefficients only
        x, b1, b2 = (list(args) + [kwargs.get("batch1"), kwargs.get("batch2")])[:3]
        if set(kwargs) - {"batch1", "batch2", "beta", "alpha"} or not all(_is_tensor(t) for t in (x, b1, b2)):
            return None
        coef = {n: kwargs[n] for n in ("beta", "alpha") if n in kwargs}
        if any(isinstance(c, bool) or not isinstance(c, (int, float)) for c in coef.values()):
            return None
        return torch.baddbmm, (x, b1, b2), coef
    if fn in MASKED_FILLS:
        x, mask, value = (list(args) + [kwargs.get("mask"), kwargs.get("value")])[:3]
        return torch.masked_fill, (x, mask, value), {}
    return None


# Note [In-place arithmetic on a fresh tensor]
# Falcon scales its scores in place (`scores /= math.sqrt(d)`), older code masks them in place
# (`scores.masked_fill_(m, -inf)`). Where the tensor written is new (made by an op that is not a view, so
# nothing else can share its storage) and no view of it was taken before the write, the in-place op is the
# out-of-place one whose result every later reader of the tensor (a view, a cast, another write) reads
# instead: the same kernel, the same numbers, and the matcher sees one spelling (XLM's `s.masked_fill_(m,
# -inf)` then `softmax(s.float())`).
_INPLACE_TO_FN = {
    operator.itruediv: torch.div, operator.imul: torch.mul, operator.iadd: torch.add, operator.isub: torch.sub,
    "div_": torch.div, "mul_": torch.mul, "add_": torch.add, "sub_": torch.sub, "masked_fill_": torch.masked_fill,
    torch.Tensor.div_: torch.div, torch.Tensor.mul_: torch.mul, torch.Tensor.add_: torch.add,
    torch.Tensor.sub_: torch.sub, torch.Tensor.masked_fill_: torch.masked_fill,
}


def _out_of_place(node: fx.Node, order: dict[fx.Node, int]) -> Any:
    """The out-of-place function equal to in-place `node` (Note [In-place arithmetic on a fresh tensor]), or None."""
    if node.op not in ("call_function", "call_method") or node.kwargs or not node.args:
        return None
    try:
        fn = _INPLACE_TO_FN.get(node.target)
    except TypeError:  # an unhashable target
        return None
    x = node.args[0]
    if fn is None or not isinstance(x, fx.Node) or x.op not in ("call_function", "call_method") or not _is_tensor(x):
        return None
    if may_alias_input(x):
        return None  # x may share storage with another tensor
    xv = _compat.example_value(x)
    for a in node.args[1:]:
        av = _compat.example_value(a) if isinstance(a, fx.Node) else None
        if isinstance(av, torch.Tensor) and av.dim() > 0 and torch.promote_types(xv.dtype, av.dtype) != xv.dtype:
            return None  # in place keeps x's dtype; out of place would promote
    if any(u is not node and order[u] < order[node] and (may_alias_input(u) or u.target in _INPLACE_TO_FN)
           for u in x.users):
        return None  # a view of x taken before (or an earlier write to it) would see the write
    # readers after the write, views and later writes included, read the out-of-place result instead
    return fn


def may_alias_input(node: fx.Node) -> bool:
    """Whether `node`'s result may share storage with its first input: a view, or an in-place op (which
    returns its input)."""
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target is getattr or node.kwargs.get("inplace") is True or node.kwargs.get("out") is not None:
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "") if node.op == "call_function" else ""
    if getattr(node.target, "__module__", "") in ("_operator", "operator"):
        return name == "getitem" or (name.startswith("i") and name not in ("is_", "is_not", "index", "invert", "inv"))
    return name in VIEW_NAMES or (name.endswith("_") and not name.endswith("__"))


def run(gm: fx.GraphModule, ctx: PassContext) -> StageResult:
    """Rewrite every recognised spelling in place. Counts the nodes changed."""
    changed = 0
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        fn = _out_of_place(node, order)
        if fn is None:
            continue
        x = node.args[0]
        for u in list(x.users):
            if u is not node and order[u] > order[node]:
                u.replace_input_with(x, node)
        node.op, node.target = "call_function", fn
        changed += 1
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        try:
            canon = canonical(node)
        except (ValueError, TypeError, IndexError):
            canon = None
        if canon is None:
            continue
        target, args, kwargs = canon
        op = "call_method" if isinstance(target, str) else "call_function"
        if (node.op, node.target, tuple(node.args), dict(node.kwargs)) == (op, target, args, kwargs):
            continue
        node.op, node.target, node.args, node.kwargs = op, target, args, kwargs
        changed += 1
    log.debug("normalize: %d nodes canonicalised", changed)
    return StageResult(gm, changed > 0, changed)
