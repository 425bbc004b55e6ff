"""alias: which in-place writes a site's one SDPA call would see and the original would not.

    k_scores = q @ k.mT; k[:, :, 0] = 0; out = softmax(k_scores) @ v     ->  refused (CHANGED_IN_PLACE)
    probs /= probs.sum()  (a router's tensor, not one the site reads)   ->  no effect on the site
"""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx

from asam_compile.passes.normalize import may_alias_input


# Note [Tensors changed in place inside the pattern]
# The original reads q, k and the mask where it computes the scores, and v at the value matmul; the one SDPA
# call that replaces it reads all of them at the value matmul. An op that changes one of them in place in
# between (`k.mul_(2)`, `k[:, :, 0] = 0`, `mask.zero_()` after the scores are made) would reach SDPA but not
# the original. So an op that may change a tensor in place, placed after the first read of an SDPA input on
# the way to the value matmul and before the value matmul, refuses the site when the tensor it writes may
# alias one the site reads. Aliasing is tracked through the ops that may return a view of their input
# (views, reshapes, slicing, casts that may return self, in-place ops, which return their input): two
# tensors may alias when they reach the same base through such ops. Every other op makes a new tensor, so a
# write to an unrelated tensor (a MoE router's `probs /= probs.sum()` between a layer's shared mask and its
# attention) no longer refuses the site. Found by tests/test_properties.py; the aliasing by issue 14.

_INPLACE_OPERATORS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul,
}



def may_mutate(node: fx.Node) -> bool:
    """Whether `node` may change one of its inputs in place (x.add_, x[i] = y, x += y, inplace=True, out=)."""
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        if getattr(node.target, "__module__", "") in ("_operator", "operator"):
            return False  # operator.and_ / or_ / not_ are not in place
        name = getattr(node.target, "__name__", "")
    elif node.op == "call_method":
        name = node.target
    else:
        return False
    if name.endswith("_") and not name.endswith("__"):
        return True
    return node.kwargs.get("inplace") is True or node.kwargs.get("out") is not None


def _written(node: fx.Node) -> list[fx.Node]:
    """The tensors a mutating node may write: its first argument, or `out=`."""
    out = node.kwargs.get("out")
    found = [out] if isinstance(out, fx.Node) else [a for a in out if isinstance(a, fx.Node)] if isinstance(out, (tuple, list)) else []
    first = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    if isinstance(first, fx.Node):
        found.append(first)
    return found


def _alias_roots(node: fx.Node, memo: dict[fx.Node, frozenset[fx.Node]]) -> frozenset[fx.Node]:
    """The base tensors `node` may be a view of (itself when it is a new tensor)."""
    if node in memo:
        return memo[node]
    chain = []
    cur = node
    while True:
        if cur in memo:
            roots = memo[cur]
            break
        base = cur.args[0] if cur.args else None
        if isinstance(base, fx.Node) and (may_alias_input(cur) or may_mutate(cur)):
            chain.append(cur)
            cur = base
            continue
        roots = frozenset({cur})
        break
    for n in chain:
        memo[n] = roots
    memo[node] = roots
    return roots


def mutated_inside(sources: list[Any], out: fx.Node, gm: fx.GraphModule, cache: dict[Any, Any] | None) -> fx.Node | None:
    """The first node that may change a tensor aliasing one of `sources` after the pattern first reads one of
    them on the way to `out`, and before `out`; None if there is none."""
    cache = {} if cache is None else cache
    order = cache.get(("order", id(gm)))
    if order is None:
        order = cache[("order", id(gm))] = {n: i for i, n in enumerate(gm.graph.nodes)}
    memo = cache.setdefault(("alias", id(gm)), {})
    srcs = {s for s in sources if isinstance(s, fx.Node)}
    if not srcs:
        return None
    lowest = min(order[s] for s in srcs)
    # ancestors of `out` that come after the earliest source, not looking past a source: the nodes on the way
    # from the sources to out. A read behind a source (another layer reading a shared mask, whose output is
    # this site's q) made that source's value before this site and is not one of this site's reads.
    seen, todo = {out}, [out]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in seen and order[a] >= lowest:
                seen.add(a)
                if a not in srcs:
                    todo.append(a)
    reads = [order[u] for s in srcs for u in s.users if u in seen]
    if not reads:
        return None
    read_roots = frozenset().union(*(_alias_roots(s, memo) for s in srcs))
    start, end = min(reads), order[out]
    nodes = list(gm.graph.nodes)
    for n in nodes[start:end]:
        if may_mutate(n) and any(_alias_roots(w, memo) & read_roots for w in _written(n)):
            return n
    return None
