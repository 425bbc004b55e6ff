"""operands: the q, k and v of a matched site as SDPA operands, whatever the spelling, and the scalars on the way.

    (q * a) @ (k * b).mT, einsum("bhld,bhsd->bhls", ...), bmm of views   ->  Operand(node, steps) for q, k, v
    x / torch.full([], 8.0), x * t (t a 0-dim input)                       ->  a scale factor (a number or a node)
    repeat_kv(k) / k.repeat_interleave(n, 1)                                ->  k before the repeat, for enable_gqa
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Sequence

import torch
import torch.fx as fx

from asam_compile import _compat
from asam_compile.passes.ir import Operand, Rejection, Term, is_call, is_cast, shape_after, val
from asam_compile.report import Reject


# Note [0-dim constants]
# Models build scalars as 0-dim tensors inside the graph: GPT-2's legacy path divides the scores by
# `torch.full([], head_dim ** 0.5, dtype=..., device=...)` and fills with `torch.full([], finfo.min)`,
# DistilBERT fills with `torch.tensor(-inf)`. A 0-dim tensor of a floating dtype does not change the dtype of
# the scores it meets, so it acts as the Python number it holds, rounded to its own dtype: the matcher reads
# it as that number (folded into SDPA's scale, or a fill value), and the rewrite leaves the node to die.


def const_scalar(x: Any, depth: int = 0) -> float | None:
    """The number a 0-dim tensor built from constants holds (Note [0-dim constants]), or None."""
    if not isinstance(x, fx.Node) or depth > 4 or x.op not in ("call_function", "call_method"):
        return None
    v = val(x)
    if not isinstance(v, torch.Tensor) or v.dim() != 0 or not v.dtype.is_floating_point:
        return None
    if is_cast(x) or (x.op == "call_method" and x.target in ("float", "half", "bfloat16", "double", "contiguous", "clone")):
        inner = const_scalar(x.args[0], depth + 1)
        return None if inner is None else float(torch.tensor(inner, dtype=torch.float64).to(v.dtype))
    if x.op != "call_function":
        return None
    if x.target is torch.full and len(x.args) >= 2 and isinstance(x.args[0], (list, tuple)) and not x.args[0]:
        value = x.args[1]
    elif x.target in (torch.tensor, torch.scalar_tensor, torch.as_tensor) and x.args:
        value = x.args[0]
    else:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(torch.tensor(value, dtype=torch.float64).to(v.dtype))


# Note [0-dim runtime scales]
# PyTorch's own attention patterns take the scale as a 0-dim tensor input (`scores.div(inv_scale)` with
# inv_scale a graph input). Such a factor is multiplied into q (or divides it), like a symbolic scale: exact
# up to rounding, and its gradient flows. It cannot be read at compile time, so it is taken only where no
# mask term or fill came before it (it would scale them by an unknown amount), and it has no sign check:
# (q / t) . k is (q . k) / t for any t.


def is_tensor_scalar(x: Any) -> bool:
    """A 0-dim floating tensor that is not a compile-time constant (Note [0-dim runtime scales])."""
    v = val(x)
    return (isinstance(x, fx.Node) and isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype.is_floating_point
            and const_scalar(x) is None)


def fold(x: Any) -> Any:
    """x, or the number it holds where it is a 0-dim constant (Note [0-dim constants])."""
    c = const_scalar(x)
    return x if c is None else c


def is_scalar(x: Any) -> bool:
    if const_scalar(x) is not None:
        return True
    v = val(x)
    return isinstance(v, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(v, bool)


def scalar_hint(x: Any) -> float:
    c = const_scalar(x)
    if c is not None:
        return c
    v = val(x)
    if isinstance(v, (torch.SymInt, torch.SymFloat)):
        hint = _compat.sym_hint(v)
        return float(hint) if hint is not None else float("nan")
    return float(v)


def _peel_scalars(node: Any, factors: list[tuple[Any, bool]]) -> Any:
    """Strip scalar mul/div (and transposes are NOT stripped here) from an operand."""
    while isinstance(node, fx.Node) and (is_call(node, torch.mul) or is_call(node, torch.div)):
        a, b = node.args
        if is_call(node, torch.mul) and (is_scalar(a) or is_tensor_scalar(a)) and isinstance(b, fx.Node):
            a, b = b, a
        if not (isinstance(a, fx.Node) and (is_scalar(b) or is_tensor_scalar(b))) or val(a).dim() == 0:
            break
        factors.append((fold(b), is_call(node, torch.div)))
        node = a
    return node


def _is_last_two_swap(node: Any) -> bool:
    """x.transpose(-2, -1), or x.permute(0, .., n-1, n-2) (the same view): Kᵀ as attention code writes it."""
    is_method = isinstance(node, fx.Node) and node.op == "call_method" and node.target == "permute"
    if is_call(node, torch.permute) or is_method:
        dims = node.kwargs.get("dims", node.args[1:])
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        n = val(node).dim()
        if len(dims) != n or not all(isinstance(d, int) for d in dims) or n < 2:
            return False
        return [d % n for d in dims] == [*range(n - 2), n - 1, n - 2]
    if not is_call(node, torch.transpose):
        return False
    n = val(node).dim()
    return sorted((node.args[1] % n, node.args[2] % n)) == [n - 2, n - 1]


def _key_operand(kt: fx.Node, factors: list[tuple[Any, bool]]) -> Operand:
    """Kᵀ given as `kt`: return K, cancelling a transpose of the last two dims where there is one."""
    node = _peel_scalars(kt, factors)
    if _is_last_two_swap(node):
        base = _peel_scalars(node.args[0], factors)
        return Operand(base)
    return Operand(node, [(torch.transpose, (-2, -1))])


def _parse_einsum(eq: str, ndims: Sequence[int]) -> tuple[list[str], str] | None:
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != len(ndims):
        return None
    letters = [c for c in "ZYXWVUTSRPONM" if c not in eq]
    res = []
    for spec, nd in zip(ins, ndims):
        if "..." in spec:
            n_ell = nd - (len(spec) - 3)
            spec = spec.replace("...", "".join(letters[:n_ell]))
        res.append(spec)
    if "..." in out:
        n_ell = max(nd - (len(s) - 3) for s, nd in zip(lhs.split(","), ndims) if "..." in s)
        out = out.replace("...", "".join(letters[:n_ell]))
    for spec in res + [out]:
        if len(set(spec)) != len(spec):
            return None
    return res, out


def qk_operands(qk: fx.Node, factors: list[tuple[Any, bool]]) -> tuple[Operand, Operand, list[str] | None]:
    """Q and K (each (..., L, E) / (..., S, E)) of the scores node; labels of the scores for einsum."""
    if is_call(qk, torch.matmul) or is_call(qk, torch.baddbmm):
        a, b = qk.args[-2:]
        if val(a).dim() != val(b).dim():
            raise Rejection(Reject.UNSUPPORTED_RANK, "query and key ranks differ")
        q = Operand(_peel_scalars(a, factors))
        return q, _key_operand(b, factors), None
    eq, *ops = qk.args
    if len(ops) != 2:
        raise Rejection(Reject.EINSUM_UNSUPPORTED, eq)
    parsed = _parse_einsum(eq, [val(o).dim() for o in ops])
    if parsed is None:
        raise Rejection(Reject.EINSUM_UNSUPPORTED, eq)
    (la, lb), lo = parsed
    contracted = [c for c in la if c in lb and c not in lo]
    if len(contracted) != 1 or len(lo) < 2:
        raise Rejection(Reject.EINSUM_UNSUPPORTED, eq)
    (e,) = contracted
    ql, kl, batch = lo[-2], lo[-1], lo[:-2]
    if ql in lb and ql not in la and kl in la:  # K written first ("bhsd,bhld->bhls"): the same contraction
        (la, lb), ops = (lb, la), [ops[1], ops[0]]
    if ql not in la or ql in lb or kl not in lb or kl in la or any(c not in la or c not in lb for c in batch):
        raise Rejection(Reject.EINSUM_UNSUPPORTED, eq)
    if set(la) != set(batch + ql + e) or set(lb) != set(batch + kl + e):
        raise Rejection(Reject.EINSUM_UNSUPPORTED, eq)
    q = _permuted(Operand(_peel_scalars(ops[0], factors)), [la.index(c) for c in batch + ql + e])
    k = _permuted(Operand(_peel_scalars(ops[1], factors)), [lb.index(c) for c in batch + kl + e])
    return q, k, list(lo)


def _permuted(op: Operand, perm: list[int]) -> Operand:
    if perm == list(range(len(perm))):
        return op
    return op.then(torch.permute, tuple(perm))


def value_operand(out: fx.Node, probs: fx.Node, score_labels: list[str] | None) -> tuple[Operand, tuple[int, ...] | None]:
    if is_call(out, torch.matmul):
        return Operand(out.args[1]), None
    eq, *ops = out.args
    if len(ops) != 2:
        raise Rejection(Reject.EINSUM_UNSUPPORTED, eq)
    parsed = _parse_einsum(eq, [val(o).dim() for o in ops])
    if parsed is None:
        raise Rejection(Reject.EINSUM_UNSUPPORTED, eq)
    specs, lo = parsed
    pi = 0 if ops[0] is probs else 1
    lp, lv = specs[pi], specs[1 - pi]
    n = len(lp)
    batch, ql, kl = lp[:-2], lp[-2], lp[-1]
    e = [c for c in lv if c not in lp]
    if len(e) != 1 or kl not in lv or kl in lo or set(lv) != set(batch + kl + e[0]) or set(lo) != set(batch + ql + e[0]):
        raise Rejection(Reject.EINSUM_UNSUPPORTED, eq)
    if score_labels is not None and len(score_labels) != n:
        raise Rejection(Reject.EINSUM_UNSUPPORTED, eq)
    v = _permuted(Operand(ops[1 - pi]), [lv.index(c) for c in batch + kl + e[0]])
    natural = batch + ql + e[0]
    perm = tuple(natural.index(c) for c in lo)
    return v, (None if perm == tuple(range(len(perm))) else perm)


def repeat_source(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(k, n_rep) if `node` is k with heads repeated n_rep times in repeat_interleave order (HF repeat_kv)."""
    nv = val(node)
    if nv.dim() != 4:
        return None
    if is_call(node, torch.repeat_interleave) or (node.op == "call_method" and node.target == "repeat_interleave"):
        src, reps = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
        if isinstance(reps, int) and dim is not None and dim % 4 == 1 and isinstance(src, fx.Node):
            return src, reps
        return None
    if node.op == "call_method" and node.target == "reshape" or is_call(node, torch.reshape):
        ex = node.args[0]
        if not (isinstance(ex, fx.Node) and ex.op == "call_method" and ex.target == "expand"):
            return None
        un = ex.args[0]
        src = None
        if isinstance(un, fx.Node) and un.op == "call_method" and un.target == "unsqueeze" and un.args[1] == 2:
            src = un.args[0]
        elif is_call(un, operator.getitem) and isinstance(un.args[1], tuple):
            idx = un.args[1]
            if len(idx) >= 3 and idx[2] is None and all(i == slice(None) for i in idx[:2]) and all(i == slice(None) for i in idx[3:]):
                src = un.args[0]
        if src is None or val(src).dim() != 4:
            return None
        ev = val(ex)
        sv = val(src)
        if ev.dim() != 5 or ev.shape[1] != sv.shape[1] or ev.shape[3:] != sv.shape[2:] or ev.shape[0] != sv.shape[0]:
            return None
        n_rep = ev.shape[2]
        if not isinstance(n_rep, int) or tuple(nv.shape) != (sv.shape[0], sv.shape[1] * n_rep, *sv.shape[2:]):
            return None
        return src, n_rep
    return None


# ---------------------------------------------------------------------------------------------------
# masks


def into_layout(
    canon: fx.Node, q: Operand, k: Operand, v: Operand, out: fx.Node, scores: Any, labels: list[str] | None
) -> tuple[Operand, Operand, Operand, tuple[int, ...] | None]:
    """Note [Views of the scores]: q, k, v and the mask terms reshaped into `canon`'s layout; the shape the
    output is reshaped back to (None where it is already that layout)."""
    if labels is not None or not is_call(out, torch.matmul):
        raise Rejection(Reject.EINSUM_UNSUPPORTED, "an einsum with views of the scores between the matmuls")
    lead = tuple(val(canon).shape[:-2])
    n = math.prod(lead)

    def to_lead(op: Operand, what: str) -> Operand:
        shape = shape_after(op)
        if shape is None or any(not isinstance(d, int) for d in shape) or math.prod(shape[:-2]) != n:
            raise Rejection(Reject.SHAPE_MISMATCH, f"{what} {shape} does not regroup into the scores' leading dims {lead}")
        return op if tuple(shape[:-2]) == lead else op.then(torch.reshape, (*lead, *shape[-2:]))

    for items in (scores.terms, scores.fills):
        for i, item in enumerate(items):
            at = item.at
            node = item.node if isinstance(item, Term) else item.mask
            mv = val(node)
            if at is None or tuple(at[:-2]) == lead:
                continue
            if not isinstance(mv, torch.Tensor) or mv.dim() > len(at) or math.prod(at[:-2]) != n:
                raise Rejection(Reject.MASK_NOT_BROADCASTABLE, f"{node.name} is applied to the scores in layout {at}")
            padded = (1,) * (len(at) - mv.dim()) + tuple(mv.shape)
            last2 = padded[-2:]
            items[i] = dataclasses.replace(item, steps=[(torch.reshape, (padded,)), (torch.Tensor.expand, ((*at[:-2], *last2),)),
                                                        (torch.reshape, ((*lead, *last2),))])
    ov = val(out)
    return to_lead(q, "query"), to_lead(k, "key"), to_lead(v, "value"), (
        None if tuple(ov.shape[:-2]) == lead else tuple(ov.shape))
