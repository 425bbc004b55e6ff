"""Shared test helpers: graph inspection, float64 references and error measures."""

from __future__ import annotations

import copy
import operator
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
SOFTMAX_FUNCTIONS = (torch.softmax, F.softmax, torch.nn.functional.softmax, torch.special.softmax)
MATMUL_FUNCTIONS = (torch.matmul, operator.matmul, torch.bmm, torch.einsum)
MATMUL_METHODS = ("matmul", "bmm", "__matmul__")
# Ops that do not change which values a softmax output carries: a matmul behind them still "consumes" it.
_PASS_THROUGH_FUNCTIONS = (F.dropout, torch.dropout, torch.nn.functional.dropout)
_PASS_THROUGH_METHODS = ("to", "type", "type_as", "float", "half", "bfloat16", "double", "contiguous", "clone")


# --------------------------------------------------------------------------------------------- graph checks


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def is_softmax(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in SOFTMAX_FUNCTIONS
    if node.op == "call_method":
        return node.target == "softmax"
    return False


def is_matmul(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in MATMUL_FUNCTIONS
    if node.op == "call_method":
        return node.target in MATMUL_METHODS
    return False


def _is_pass_through(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _PASS_THROUGH_FUNCTIONS
    if node.op == "call_method":
        return node.target in _PASS_THROUGH_METHODS
    return False


def count_sdpa(gms: fx.GraphModule | Iterable[fx.GraphModule]) -> int:
    return sum(1 for gm in _as_list(gms) for n in gm.graph.nodes if is_sdpa(n))


def count_softmax(gms: fx.GraphModule | Iterable[fx.GraphModule]) -> int:
    return sum(1 for gm in _as_list(gms) for n in gm.graph.nodes if is_softmax(n))


def softmax_matmul_sites(gms: fx.GraphModule | Iterable[fx.GraphModule]) -> list[str]:
    """Softmax nodes whose output reaches a matmul-like op directly or through casts/dropout only."""
    sites = []
    for gm in _as_list(gms):
        for node in gm.graph.nodes:
            if is_softmax(node) and _reaches_matmul(node):
                sites.append(node.name)
    return sites


def _reaches_matmul(node: fx.Node) -> bool:
    frontier, seen = [node], set()
    while frontier:
        n = frontier.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            if is_matmul(user):
                return True
            if _is_pass_through(user):
                frontier.append(user)
    return False


def sdpa_nodes(gms: fx.GraphModule | Iterable[fx.GraphModule]) -> list[fx.Node]:
    return [n for gm in _as_list(gms) for n in gm.graph.nodes if is_sdpa(n)]


_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def sdpa_arg(node: fx.Node, name: str) -> Any:
    """An argument of an SDPA call node by name, positional or keyword, with SDPA's default."""
    i = _SDPA_PARAMS.index(name)
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, _SDPA_DEFAULTS.get(name))


def _as_list(gms: fx.GraphModule | Iterable[fx.GraphModule]) -> list[fx.GraphModule]:
    return [gms] if isinstance(gms, fx.GraphModule) else list(gms)


def candidate_summary(cands: Sequence[Any]) -> str:
    """One line per candidate, for assertion messages."""
    return "\n".join(
        f"  {c.site} [{c.module}] {c.status} target={c.target} reject={c.reject} info={c.info} {c.detail}"
        for c in cands
    )


# --------------------------------------------------------------------------------------------- numerics


def flat_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a (possibly nested) model output, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flat_tensors(v)]
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return flat_tensors(out.to_tuple())
    return []


def to_double(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(to_double(v) for v in x)
    if isinstance(x, dict):
        return {k: to_double(v) for k, v in x.items()}
    return x


def double_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).double()


def max_abs_err(out: Any, ref: Any) -> float:
    """Max |out - ref| over all output tensors (compared in float64). Non-finite positions must agree."""
    outs, refs = flat_tensors(out), flat_tensors(ref)
    assert len(outs) == len(refs), f"{len(outs)} outputs vs {len(refs)} reference outputs"
    err = 0.0
    for o, r in zip(outs, refs):
        assert o.shape == r.shape, f"shape {tuple(o.shape)} vs reference {tuple(r.shape)}"
        o, r = o.detach().double(), r.detach().double()
        finite = torch.isfinite(r)
        assert torch.equal(torch.isfinite(o), finite), "non-finite values differ from the reference"
        if finite.any():
            err = max(err, (o[finite] - r[finite]).abs().max().item())
    return err


def assert_close_to_ref(out: Any, ref: Any, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    for o, r in zip(flat_tensors(out), flat_tensors(ref)):
        torch.testing.assert_close(o.detach().double(), r.detach().double(), atol=atol, rtol=rtol)


def assert_no_worse(err_new: float, err_eager: float, what: str, factor: float = 4.0, slack: float = 1e-6) -> None:
    """The rewritten program may be worse than the original in the same dtype only by a small factor."""
    assert err_new <= factor * err_eager + slack, (
        f"{what}: error vs float64 reference {err_new:.3g} > {factor} * eager float32 error "
        f"{err_eager:.3g} + {slack:g}"
    )


def output_weights(out: Any, seed: int = 1234) -> list[torch.Tensor]:
    """Random (never zero) cotangents for each output tensor, so that backward sees every element."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.5 for t in flat_tensors(out)]


def input_grads(
    fn: Callable[..., Any], inputs: Sequence[Any], argnums: Sequence[int], weights: list[torch.Tensor] | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run fn on inputs with requires_grad on `argnums`; return (grads, weights used)."""
    inputs = [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs]
    for i in argnums:
        inputs[i].requires_grad_(True)
    out = fn(*inputs)
    outs = flat_tensors(out)
    if weights is None:
        weights = output_weights(out)
    loss = sum((o * w.to(o.device, o.dtype)).sum() for o, w in zip(outs, weights) if o.requires_grad)
    grads = torch.autograd.grad(loss, [inputs[i] for i in argnums])
    return list(grads), weights


def compile_capture(model, inputs, fullgraph=True, dynamic=None, **options):
    """torch.compile(model, backend="asam", options=options), run once under asam_compile.capture()."""
    import asam_compile

    compiled = torch.compile(model, backend="asam", options=options, fullgraph=fullgraph, dynamic=dynamic)
    with asam_compile.capture() as cap:
        out = compiled(*inputs)
    return out, cap


def exception_chain(exc: BaseException) -> list[BaseException]:
    """exc and every exception it wraps (__cause__, __context__, Dynamo's inner_exception)."""
    chain, todo = [], [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is c for c in chain):
            continue
        chain.append(e)
        todo += [e.__cause__, e.__context__, getattr(e, "inner_exception", None)]
    return chain
