"""The plan stage's adaptive decision (a helper of passes/plan.py, as flex_plan.py is): which matched attention
sites go ASAM adaptive sparse, with which settings, or why they stay exact.

A site goes sparse in mode="adaptive", or when a module marked with asam_compile.sparse(...) is on its
nn_module_stack; the innermost mark's settings override the backend's options. The rewrite then emits the
adaptive call its dense_fallback names (asam_compile.kernels.adaptive, asam_compile.kernels.dispatch) instead of
SDPA (Note [Adaptive sparse attention]); inside a mask's Flex block mask for a masked site (Note [Adaptive over a
structured mask]).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from asam_compile.config import AsamConfig, SparseSettings
from asam_compile.kernels import cost, selection
from asam_compile.passes.ir import size_hint
from asam_compile.sparse import settings_for


def site_settings(softmax: fx.Node, config: AsamConfig, root: type | None = None) -> SparseSettings | None:
    """The sparse settings that apply to this site, or None where it stays exact. `root`: the type of the
    module whose forward was compiled (not on nn_module_stack; see _compat.compiled_frame_module)."""
    if not config.allow_sparse:
        return None
    stack = softmax.meta.get("nn_module_stack") or {}
    types = [root] + [v[1] for v in stack.values() if isinstance(v, tuple) and len(v) > 1]
    marked = settings_for(t for t in types if t is not None)
    if marked is None and config.mode != "adaptive":
        return None
    return config.sparse.replaced(**(marked or {}))


# Note [Adaptive under dynamic shapes]
# asam::adaptive_attention works with symbolic lengths (an opaque op whose output has q's shape; the block
# counts and the selection are computed when it runs; tested on CPU over several lengths with one compile).
# The min_seq_len test on a symbolic length adds
# a guard to Dynamo's shape environment: a graph compiled at or above min_seq_len serves every length above
# it with the sparse call, and a shorter input recompiles once into a graph whose sites are exact (and the
# other way round). That is the one recompile our options can cause, and only where a site may go sparse.


def refusal(m: Any, settings: SparseSettings, L: Any, S: Any, E: Any, Ev: Any, device: torch.device,
            requires_grad: bool, mask_kind: str | None = None, heads: Any = 1) -> str | None:
    """Why this matched site cannot or should not go sparse (it then stays exact), or None. `mask_kind`: the
    site's, if it went adaptive (a dense mask with a Flex plan becomes "flex"); `heads`: batch x query heads."""
    mask_kind = mask_kind or m.mask_kind
    if mask_kind not in ("none", "causal", "flex"):
        why = f" ({m.flex_plan})" if isinstance(m.flex_plan, str) else ""
        return (f"adaptive sparse takes no mask, a causal one, or one that becomes a Flex block mask; this site "
                f"keeps a {mask_kind} mask{why}")
    if mask_kind == "flex":  # Note [Adaptive over a structured mask] in asam_compile/kernels/adaptive.py
        if settings.dense_fallback == "per_call":
            return "dense_fallback='per_call' takes no mask or a causal one"
        if settings.estimator != "pooled":
            return f"the {settings.estimator} estimator takes no mask or a causal one"
        if settings.block_size != m.flex_plan.block_size:
            return f"block_size {settings.block_size} differs from the mask's block mask ({m.flex_plan.block_size})"
    if m.dropout_p:
        return "attention dropout (Flex has none)"
    # Under dynamic shapes these comparisons become guards (Note [Adaptive under dynamic shapes])
    if bool(L < settings.min_seq_len) or bool(S < settings.min_seq_len):
        return f"{min(int(L), int(S))} tokens < min_seq_len={settings.min_seq_len}: sparsity does not pay"
    if E != Ev:
        return f"Flex needs equal query and value head sizes ({E} vs {Ev})"
    why = cost.flex_unavailable(E=Ev, device_type=device.type, requires_grad=requires_grad)
    if why is not None:
        return why
    forced = _forced_share(m, settings, mask_kind, size_hint(L), size_hint(S))
    if forced is not None and forced > settings.max_density:  # Note [Nothing to select]
        return (f"the sinks and window blocks alone are {forced:.0%} of the allowed blocks (> max_density="
                f"{settings.max_density}): every head would run all of them, so the selection is skipped")
    if (forced is not None and settings.dense_fallback == "measured" and mask_kind in ("none", "causal")
            and device.type == "cuda" and not requires_grad):  # Note [Nothing to gain]
        gain, floor = cost.best_dispatch_gain(size_hint(heads), size_hint(L), size_hint(S), int(E),
                                              mask_kind == "causal", forced)
        if gain <= floor:
            return (f"even with only its sinks and window blocks ({forced:.0%}) on every head, sparse would save "
                    f"{gain * 1e3:.2f} ms a call, no more than the measured dispatch's own cost ({floor * 1e3:.2f} "
                    f"ms)")
    return None


# Note [Nothing to gain]
# The measured dispatch (Note [Dispatch by measured density] in asam_compile/kernels/dispatch.py) costs its
# opaque op's time on every call, even where it then runs SDPA alone: on an H200 the whole SmolLM2-135M at 8k
# tokens ran 31.9 ms through it against 18.7 ms exact, with (by the densities it measures) no head going sparse,
# about 0.44 ms a site in a host-bound run (benchmarks/RESULTS.md, session 9). So on CUDA, where even the best
# case (every head keeping only its forced blocks, on the fastest sparse kernel) saves no more than that cost and
# the sparse path's own (cost.best_dispatch_gain), the site stays exact at compile time: short or few-headed
# sites (SmolLM2's 9 heads of 64 save at most ~0.3 / 0.53 ms a site at 8k / 16k; at 32k 2.1 ms), not Gemma-3's
# global layers at 16k (~0.9 ms). The 0.44 ms is one host-bound measurement; a GPU-bound model pays less.


# Note [Nothing to select]
# A head that keeps more than max_density of its allowed blocks runs all of them, so where the blocks that every
# selection keeps (the sinks and the window at the diagonal) are already more than max_density of what the mask
# allows, the selection can only cost time: the site stays exact. This is the case of short sliding windows: on
# Gemma-3's 512-token local layers (block 128) each query block is allowed at most 5 key blocks and the forced
# sink and window blocks are 3 of them (issue 16). Decided at compile time from the mask's block tables (a causal
# mask or none: from the lengths' hints); a mask read at run time is not known then and goes on to the selection.


def _forced_share(m: Any, settings: SparseSettings, mask_kind: str, L: int, S: int) -> float | None:
    """The forced blocks' share of the allowed ones (the largest over the mask's batch and heads), or None where
    the mask is known only at run time."""
    blocks = None
    if mask_kind == "flex":
        plan = m.flex_plan
        if plan.in_graph or not plan.tensors:
            return None
        n_blocks = -(-S // settings.block_size)
        num, idx, full_num, full_idx = (t.cpu() for t in plan.tensors)
        cut = selection.blocks_from_tables(num, idx, n_blocks)
        blocks = (cut | selection.blocks_from_tables(full_num, full_idx, n_blocks), cut)
    forced, allowed, _ = selection.forced_blocks(L, S, causal=mask_kind == "causal", settings=settings, blocks=blocks,
                                                 device="cpu")
    return selection.forced_density(forced, allowed)
