"""flex_plan: turn a site's mask into a FlexAttention plan: a lifted mask_mod (and score_mod), its block mask
built at compile time or in the graph on every call, and the cost model's choice of kernel.

    keep(b, h, q, kv) lifted from the mask's index arithmetic   ->  FlexPlan(kernel, mask_key, density, tables)
    soft-capped scores (Gemma 2)                                 ->  the score_mod c * tanh(score / c)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import torch
import torch.fx as fx

from asam_compile.config import AsamConfig
from asam_compile.passes.ir import LARGE_NEGATIVE, FlexPlan, Rejection, as_4d, size_hint, val
from asam_compile.report import Reject

log = logging.getLogger(__name__)


# Note [Captured tensors in Flex]
# lift() can read module buffers and tensor constants (a tril buffer, ALiBi slopes). At compile time
# build_block_mask runs the lifted functions on the real tensors. When Inductor traces our runtime flex
# call, FlexAttention traces mask_mod/score_mod on fake tensors, where a captured real tensor fails
# ("Please convert all Tensors to FakeTensors", torch 2.13). So the nodes that make those tensors are
# passed to the flex call as extra graph arguments, and the call rebinds each lift.Capture to its traced
# value while FlexAttention traces; the closures then capture graph values, which Flex supports.


def lift_cached(mask_nodes: list[fx.Node], gm: fx.GraphModule, example_inputs: Sequence[Any], cache: dict[Any, Any]) -> list[Any] | str:
    """The lifted index functions of the mask nodes, or the reason (a string) why they cannot be lifted.
    Lifted once per graph: layers share one mask node."""
    from asam_compile.passes.lift import NotLiftable, lift

    key = ("lift", tuple(mask_nodes))
    if key not in cache:
        try:
            cache[key] = lift(mask_nodes, gm, example_inputs)
        except NotLiftable as e:
            log.debug("mask %s not lifted: %s", [n.name for n in mask_nodes], e)
            cache[key] = f"mask not liftable: {e}"
    return cache[key]


def _site_unavailable(config: AsamConfig, dropout_p: float, qv: Any) -> str | None:
    """Why Flex cannot run this site whatever its mask (dropout, flex='never', 2-D), or None."""
    if dropout_p:
        return "Flex has no attention dropout"
    if config.flex == "never":
        return "flex='never'"
    if qv.dim() == 2:
        return "Flex is used for 3-D and 4-D attention only"
    return None


def guarded_plan(
    softmax: fx.Node, config: AsamConfig, dropout_p: float, qv: Any, planner: Any, *args: Any
) -> FlexPlan | str:
    """planner(*args), where Flex can run at all (a string says why not); a planner that raises leaves the site
    on its dense mask (strict re-raises). `qv`: the scores' example value."""
    why = _site_unavailable(config, dropout_p, qv)
    if why is not None:
        return why
    try:
        return planner(*args)
    except Exception as e:  # noqa: BLE001 - Flex is an optimisation: the dense mask stays exact
        if config.strict:
            raise
        log.warning("asam_compile: Flex planning failed for %s (%s: %s); kept a dense mask",
                    softmax.name, type(e).__name__, e)
        return f"Flex planning failed: {type(e).__name__}: {e}"


def plan_flex(
    softmax: fx.Node, scores: Any, mask_nodes: list[fx.Node], gm: fx.GraphModule,
    example_inputs: Sequence[Any], config: AsamConfig, qv: Any, sv: Any, cache: dict[Any, Any], biased: bool = False,
) -> FlexPlan | str:
    """Lift a compile-time mask into a mask_mod, build its BlockMask and ask the cost model. Returns the
    plan, or the reason (a string) why the site keeps a dense mask."""
    from asam_compile.kernels import cost
    from asam_compile.kernels.block_mask import build_block_mask
    from asam_compile.passes.mask_names import name_mask

    qv = as_4d(qv)  # a 3-D (N, L, E) site runs as (1, N, L, E): its N is Flex's head dim
    dynamic = any(isinstance(d, torch.SymInt) for d in (*qv.shape, *sv.shape))
    lifted = lift_cached(mask_nodes, gm, example_inputs, cache)
    if isinstance(lifted, str):
        return lifted
    key = ("flex", tuple(mask_nodes), tuple((t.factor, t.negate) for t in scores.terms),
           tuple((fl.value, fl.mask_is_keep) for fl in scores.fills))
    if key not in cache:
        cache[key] = _lifted_keep(scores, lifted)
    keep_fn, axes = cache[key]
    if dynamic:
        return _plan_dynamic_flex(softmax, scores, lifted, keep_fn, axes, key, gm, config, qv, sv, biased)
    B, H, L, S = (int(d) for d in qv.shape)
    E = int(sv.shape[-1])
    Bm, Hm = (B if "b" in axes else 1), (H if "h" in axes else 1)
    device = sv.device
    name = name_mask(keep_fn, L, S)
    mask_key = f"{name}_{abs(hash((id(gm), key))) % 10**8}"
    keep_fn.__name__ = name
    block_mask, density = build_block_mask(keep_fn, Bm, Hm, L, S, device, block_size=config.flex_block_size, key=(mask_key, Bm, Hm, L, S, str(device)))
    kernel, reason = cost.choose_kernel(B=B, H=H, L=L, S=S, E=E, density=density, device_type=device.type,
                                        requires_grad=bool(val(softmax).requires_grad), policy=config.flex)
    captures, score_key, _ = _register(mask_key, keep_fn, scores, lifted, biased, in_graph=False)
    if score_key and biased:
        reason += "; additive bias as a score_mod"
    tensors = (block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    return FlexPlan(kernel, reason, name, mask_key, density, config.flex_block_size, (L, S), tensors, score_key,
                    tuple(c.node for c in captures), (Bm, Hm))


# Note [Runtime masks as in-graph block masks]
# A mask that reads runtime inputs (padding, document ids from caller-given position_ids) is lifted with
# runtime captures (Note [Masks read at run time] in passes/lift.py). Its block mask is built inside the
# graph on every call (asam_compile.kernels.runtime.block_mask_tensors_call, once per mask per graph, shared by the
# layers), from the traced values: one fused pass over the (B', H', L, S) mask elements, never stored, then
# a sort of the (B', H', L/128, S/128) block table. The same build says which query rows have no key
# left; those get the original's result (Note [Fully masked rows] in passes/plan.py), as on the dense path, because padding
# makes such rows at run time (left padding) and we cannot know at compile time.
# Density for the cost model comes from the example call's values (the first call); the kernel choice is
# then fixed for the graph. Additive terms are left out of the score (kept positions add 0) only where the
# graph proves each term is 0 or a removed-key value whatever the runtime values are (a `where` or
# `masked_fill` of constants: HF's masks); otherwise a score_mod adds them, which is exact for any values.
# Static shapes only (Note [Flex under dynamic shapes] in passes/plan.py); 3-D sites run as 4-D ones with a batch of 1.

_BUILD_ELEMENTS_PER_S = 2.0e11  # in-graph block-mask build, mask elements per second (H100, est.)


def _exclusion_only(node: Any, depth: int = 0) -> bool:
    """Every value of `node` is 0 or at most LARGE_NEGATIVE whatever the runtime inputs: constants put
    through where / masked_fill and shape or dtype ops."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return node == 0 or node <= LARGE_NEGATIVE
    if not isinstance(node, fx.Node) or depth > 64:
        return False
    if node.op not in ("call_function", "call_method"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    args = node.args
    if name == "where" and len(args) == 3:
        return _exclusion_only(args[1], depth + 1) and _exclusion_only(args[2], depth + 1)
    if name == "masked_fill" and len(args) == 3:
        return _exclusion_only(args[0], depth + 1) and _exclusion_only(args[2], depth + 1)
    if name in ("tensor", "scalar_tensor", "full") and args:
        value = args[0] if name != "full" else (args[1] if len(args) > 1 else node.kwargs.get("fill_value"))
        return not isinstance(value, fx.Node) and _exclusion_only(value, depth + 1)
    if name in ("zeros", "zeros_like", "new_zeros"):
        return True
    if name in ("to", "type", "float", "half", "bfloat16", "double", "expand", "expand_as", "broadcast_to",
                "view", "reshape", "unsqueeze", "squeeze", "contiguous", "clone", "getitem", "permute",
                "transpose", "repeat", "narrow", "slice", "select"):
        return bool(args) and _exclusion_only(args[0], depth + 1)
    return False


def plan_runtime_flex(
    softmax: fx.Node, scores: Any, mask_nodes: list[fx.Node], gm: fx.GraphModule,
    example_inputs: Sequence[Any], config: AsamConfig, qv: Any, sv: Any,
) -> FlexPlan | str:
    """Note [Runtime masks as in-graph block masks]: the plan for a mask that reads runtime inputs, or the
    reason (a string) why it keeps a dense mask."""
    from asam_compile.passes.lift import NotLiftable, lift
    from asam_compile.passes.mask_names import name_mask

    qv = as_4d(qv)
    if any(isinstance(d, torch.SymInt) for d in (*qv.shape, *sv.shape)):
        return "Flex under dynamic shapes is not built yet (Note [Flex under dynamic shapes] in passes/plan.py)"
    try:
        lifted = lift(mask_nodes, gm, example_inputs, runtime=True)
    except NotLiftable as e:
        return f"mask not liftable: {e}"
    captures = lifted[0].captures if lifted else ()
    read = sorted({c.node.name for c in captures if c.runtime and c.node is not None})
    if not read:
        return "mask reads runtime inputs the lifter did not capture"
    keep_fn, axes = _lifted_keep(scores, lifted)
    biased = bool(scores.terms) and not all(_exclusion_only(t.node) for t in scores.terms)
    L, S = int(qv.shape[2]), int(qv.shape[3])
    short = [n.removeprefix("l_").removeprefix("kwargs_").removeprefix("args_").strip("_") for n in read]
    name = f"{name_mask(keep_fn, L, S).replace('lifted_mask', 'mask')}_with_{'_'.join(short)}"
    mask_key = f"{name}_{abs(hash((id(gm), tuple(mask_nodes)))) % 10**8}"
    return _in_graph_plan(softmax, scores, lifted, keep_fn, axes, name, mask_key, qv, sv, config, biased,
                          f"block mask built in the graph from {', '.join(read)}")


def _register(
    mask_key: str, keep_fn: Any, scores: Any, lifted: list[Any], biased: bool, in_graph: bool
) -> tuple[tuple[Any, ...], str | None, str | None]:
    """Register a plan's functions with the runtime under `mask_key`: the mask_mod and its captures, the
    score_mod of an additive bias (Note [Index-built score biases]) and, for a block mask built in the graph
    from an additive mask, the "all -inf" rows function. Returns (captures, score_key, neginf_key)."""
    from asam_compile.kernels import runtime

    runtime.register_mask_mod(mask_key, keep_fn)
    captures = lifted[0].captures if lifted else ()
    runtime.register_captures(mask_key, captures)
    score_key = None
    if biased or scores.softcap is not None:
        score_key = runtime.register_score_mod(f"bias_{mask_key}", _lifted_bias(scores, lifted, biased))
    neginf_key = None
    if in_graph and scores.terms and not scores.fills:  # Note [Fully masked rows] in passes/plan.py: all -inf gives NaN
        neginf_key = runtime.register_mask_mod(f"neginf_{mask_key}", _lifted_neginf(scores, lifted))
    return captures, score_key, neginf_key


def _lifted_neginf(scores: Any, lifted: list[Any]) -> Any:
    """(b, h, q, kv) -> the additive terms sum to -inf there (the original's softmax row gives NaN if all do)."""
    terms = list(zip(scores.terms, lifted[: len(scores.terms)]))

    def neginf_mask(b: Any, h: Any, q: Any, kv: Any) -> Any:
        add = None
        for t, lf in terms:
            v = lf.fn(b, h, q, kv).to(torch.float32) * t.factor
            v = -v if t.negate else v
            add = v if add is None else add + v
        return torch.isneginf(add)

    return neginf_mask


def _in_graph_plan(
    softmax: fx.Node, scores: Any, lifted: list[Any], keep_fn: Any, axes: frozenset[str], name: str,
    mask_key: str, qv: Any, sv: Any, config: AsamConfig, biased: bool, where: str,
) -> FlexPlan:
    """A plan whose block mask is built in the graph on every call (runtime masks, dynamic shapes). The cost
    model and the report see the example call: its sizes and, through the captures, its values."""
    from asam_compile.kernels import cost
    from asam_compile.kernels.block_mask import build_block_mask

    B, H, L, S = (size_hint(d) for d in qv.shape)
    E = size_hint(sv.shape[-1])
    Bh, Hh = (B if "b" in axes else 1), (H if "h" in axes else 1)
    keep_fn.__name__ = name
    try:
        _, density = build_block_mask(keep_fn, Bh, Hh, L, S, sv.device, block_size=config.flex_block_size)
    except Exception as e:  # noqa: BLE001 - no example values: plan for the worst case
        log.debug("in-graph mask %s: example density not computed: %s", name, e)
        density = 1.0
    kernel, reason = cost.choose_kernel(B=B, H=H, L=L, S=S, E=E, density=density, device_type=sv.device.type,
                                        requires_grad=bool(val(softmax).requires_grad), policy=config.flex,
                                        build_s=Bh * Hh * L * S / _BUILD_ELEMENTS_PER_S)
    reason = f"{reason}; {where}"
    captures, score_key, neginf_key = _register(mask_key, keep_fn, scores, lifted, biased, in_graph=True)
    if score_key and biased:
        reason += "; additive terms as a score_mod"
    Bm, Hm = (qv.shape[0] if "b" in axes else 1), (qv.shape[1] if "h" in axes else 1)
    return FlexPlan(kernel, reason, name, mask_key, density, config.flex_block_size, tuple(qv.shape[2:]), (), score_key,
                    tuple(c.node for c in captures), (Bm, Hm), in_graph=True, neginf_key=neginf_key)


def _plan_dynamic_flex(
    softmax: fx.Node, scores: Any, lifted: list[Any], keep_fn: Any, axes: frozenset[str], key: Any,
    gm: fx.GraphModule, config: AsamConfig, qv: Any, sv: Any, biased: bool,
) -> FlexPlan | str:
    """Note [Flex under dynamic shapes] in passes/plan.py: a shape-only mask in a graph that serves many lengths gets its block
    mask built in the graph on every call, for the call's sizes (the in-graph build of runtime masks)."""
    from asam_compile.passes.mask_names import name_mask

    L, S = size_hint(qv.shape[2]), size_hint(qv.shape[3])
    name = name_mask(keep_fn, L, S)
    mask_key = f"{name}_{abs(hash((id(gm), key))) % 10**8}"
    return _in_graph_plan(softmax, scores, lifted, keep_fn, axes, name, mask_key, qv, sv, config, biased,
                          f"dynamic shapes: block mask built in the graph (chosen at the example's {L}x{S})")


# Note [Index-built score biases]
# An additive mask whose values on kept positions are not all 0 (ALiBi, relative-position biases), when it
# can be lifted, becomes two functions: keep(b, h, q, kv) = (sum of terms > LARGE_NEGATIVE) & fills, the
# block mask's mask_mod, and bias(b, h, q, kv) = sum of the scaled terms, added by a score_mod:
# flex computes q.k * scale + bias, the same order as SDPA's q.k * scale + attn_mask.


def _lifted_bias(scores: Any, lifted: list[Any], biased: bool = True) -> Any:
    """score_mod(score, b, h, q, kv) = score (soft-capped, Note [Soft-capped scores] in passes/match.py) + the additive terms at
    (b, h, q, kv) where `biased`."""
    terms = list(zip(scores.terms, lifted[: len(scores.terms)])) if biased else []
    cap = scores.softcap

    def lifted_bias(score: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
        if cap is not None:
            score = torch.tanh(score / cap) * cap
        for t, lf in terms:
            v = lf.fn(b, h, q, kv).to(score.dtype) * t.factor
            score = score - v if t.negate else score + v
        return score

    return lifted_bias


def _lifted_keep(scores: Any, lifted: list[Any]) -> tuple[Any, frozenset[str]]:
    """keep(b, h, q, kv): the positions the original mask leaves in, from the lifted terms and fills."""
    terms = list(zip(scores.terms, lifted[: len(scores.terms)]))
    fills = list(zip(scores.fills, lifted[len(scores.terms):]))
    axes = frozenset().union(*(lf.axes for lf in lifted)) if lifted else frozenset()

    def keep_fn(b: Any, h: Any, q: Any, kv: Any) -> Any:
        keep = None
        if terms:
            add = None
            for t, lf in terms:
                v = lf.fn(b, h, q, kv).to(torch.float32) * t.factor
                v = -v if t.negate else v
                add = v if add is None else add + v
            keep = add > LARGE_NEGATIVE
        for fl, lf in fills:
            m = lf.fn(b, h, q, kv).bool()
            m = m if fl.mask_is_keep else ~m
            keep = m if keep is None else keep & m
        return keep

    return keep_fn, axes


def flex_fixup(plan: FlexPlan, fixup: str | None) -> str | None:
    """The fully-masked-row fix-up a dense-mask site keeps when its mask becomes this Flex plan: a run-time
    mask may leave rows without keys on some call, so they keep it; a compile-time one was checked to leave
    none (Note [Fully masked rows] in passes/plan.py)."""
    return fixup if plan.in_graph else None


def softcap_plan(
    softmax: fx.Node, scores: Any, mask_kind: str, flex_plan: "FlexPlan | str | None", fixup: str | None,
    stepped: bool, dropout_p: float, gm: fx.GraphModule, config: AsamConfig, qv: Any, sv: Any,
) -> tuple[str, "FlexPlan", str | None]:
    """Note [Soft-capped scores] in passes/match.py: the site's Flex plan (its mask's, or a full / causal block mask), whose
    score_mod carries the soft-capping; raises a Rejection that names the tanh where Flex cannot run."""
    from asam_compile.kernels import cost
    from asam_compile.kernels.block_mask import build_block_mask

    def refuse(why: str) -> Rejection:
        return Rejection(Reject.SOFTCAP_NEEDS_FLEX, f"tanh soft-capping (c={scores.softcap}): {why}")

    why = _site_unavailable(config, dropout_p, qv)
    if why is None and stepped:
        why = "the mask is added in another layout of the scores"
    if why is None:
        E = sv.shape[-1]
        why = cost.flex_unavailable(E=E if isinstance(E, int) else 16, device_type=sv.device.type,
                                    requires_grad=bool(val(softmax).requires_grad))
    if why is not None:
        raise refuse(why)
    if mask_kind == "flex":
        return mask_kind, flex_plan, fixup
    if mask_kind == "dense":
        if not isinstance(flex_plan, FlexPlan):
            raise refuse(flex_plan or "the mask cannot be made a Flex block mask")
        plan = dataclasses.replace(flex_plan, kernel="flex", reason=f"soft-capping as a score_mod; {flex_plan.reason}")
        return "flex", plan, flex_fixup(plan, fixup)
    q4 = as_4d(qv)
    if any(not isinstance(d, int) for d in (*q4.shape, *sv.shape)):
        raise refuse("dynamic shapes (a full or causal block mask is built for static shapes only)")
    B, H, L, S = q4.shape
    causal = mask_kind == "causal"

    def keep_fn(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return kv <= q if causal else (q >= 0) & (kv >= 0)

    name = "causal" if causal else "full"
    keep_fn.__name__ = name
    mask_key = f"softcap_{name}_{abs(hash((id(gm), softmax.name))) % 10**8}"
    block_mask, density = build_block_mask(keep_fn, 1, 1, L, S, sv.device, block_size=config.flex_block_size,
                                           key=(f"softcap_{name}", L, S, config.flex_block_size, str(sv.device)))
    _, score_key, _ = _register(mask_key, keep_fn, scores, [], False, in_graph=False)
    tensors = (block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    plan = FlexPlan("flex", f"soft-capping as a score_mod over a {name} block mask", name, mask_key, density,
                    config.flex_block_size, (L, S), tensors, score_key, (), (1, 1))
    return "flex", plan, None
