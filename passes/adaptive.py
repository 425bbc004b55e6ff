"""Which matched attention sites go ASAM adaptive sparse, with which settings, or why they stay exact.

A site goes sparse in mode="adaptive", or when a module marked with asam_compile.sparse(...) is on its
nn_module_stack; the innermost mark's settings override the backend's options. The rewrite then emits the
in-graph adaptive call (asam_compile.adaptive; the asam::adaptive_attention op with dense_fallback) instead of
SDPA (Note [Adaptive sparse attention]); inside a mask's Flex block mask for a masked site (Note [Adaptive over a
structured mask]).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from asam_compile import cost
from asam_compile.adaptive import SparseSettings
from asam_compile.config import SPARSE_FIELDS
from asam_compile.sparse import settings_for


def site_settings(softmax: fx.Node, config: Any, root: type | None = None) -> SparseSettings | None:
    """The sparse settings that apply to this site, or None where it stays exact. `root`: the type of the
    module whose forward was compiled (not on nn_module_stack; see _compat.compiled_frame_module)."""
    if not config.allow_sparse:
        return None
    stack = softmax.meta.get("nn_module_stack") or {}
    types = [root] + [v[1] for v in stack.values() if isinstance(v, tuple) and len(v) > 1]
    marked = settings_for(t for t in types if t is not None)
    if marked is None and config.mode != "adaptive":
        return None
    values = {f: getattr(config, f) for f in SPARSE_FIELDS}
    values.update(marked or {})
    return SparseSettings(**values)


# Note [Adaptive under dynamic shapes]
# asam::adaptive_attention works with symbolic lengths (an opaque op whose output has q's shape; the block
# counts and the selection are computed when it runs; tested on CPU over several lengths with one compile).
# The min_seq_len test on a symbolic length adds
# a guard to Dynamo's shape environment: a graph compiled at or above min_seq_len serves every length above
# it with the sparse call, and a shorter input recompiles once into a graph whose sites are exact (and the
# other way round). That is the one recompile our options can cause, and only where a site may go sparse.


def refusal(m: Any, settings: SparseSettings, L: Any, S: Any, E: Any, Ev: Any, device: torch.device,
            requires_grad: bool, mask_kind: str | None = None) -> str | None:
    """Why this matched site cannot or should not go sparse (it then stays exact), or None. `mask_kind`: the
    site's, if it went adaptive (a dense mask with a Flex plan becomes "flex")."""
    mask_kind = mask_kind or m.mask_kind
    if mask_kind not in ("none", "causal", "flex"):
        why = f" ({m.flex_plan})" if isinstance(m.flex_plan, str) else ""
        return (f"adaptive sparse takes no mask, a causal one, or one that becomes a Flex block mask; this site "
                f"keeps a {mask_kind} mask{why}")
    if mask_kind == "flex":  # Note [Adaptive over a structured mask] in asam_compile/adaptive.py
        if settings.dense_fallback:
            return "dense_fallback takes no mask or a causal one"
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
    return cost.flex_unavailable(E=Ev, device_type=device.type, requires_grad=requires_grad)
