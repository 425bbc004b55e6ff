"""The adaptive sparse attention calls that the rewrite emits, over the selection of
asam_compile/kernels/selection.py (Note [Adaptive sparse attention] there):

    adaptive_attention_call   in-graph: selection + Flex on the kept blocks, no mask or a causal one
    adaptive_masked_call      in-graph: the same inside a structured mask's Flex block mask
    asam::adaptive_attention  an opaque op (dense_fallback="per_call"): diffuse pairs run SDPA, a sync per call
    (asam::adaptive_dispatch, the default for inference without a mask, is in dispatch.py)

Everything but the opaque op is traced by Inductor into the compiled graph, so the selection counts in every
timing. It is approximate: the result differs from exact attention by the mass of the blocks left out.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from asam_compile import _compat
from asam_compile.config import SparseSettings
from asam_compile.kernels import runtime, triton_block_sparse
from asam_compile.kernels.selection import block_tables, blocks_from_tables, causal_mask_mod, select, select_blocks

F = torch.nn.functional

# Note [Dense fallback at run time]
# Flex computes a block at about 0.69x the speed of SDPA flash (H100/H200, bf16; benchmarks/RESULTS.md), so a
# call whose selection keeps most blocks would be faster as SDPA flash. Choosing between them per call
# needs data-dependent control flow in the compiled graph: torch.cond(density <= x, flex, sdpa) compiles
# for plain modules, but inside an HF Llama graph Inductor (torch 2.13, CPU) passed the branch operands
# with a layout other than the one the branch was compiled for (assert_size_stride fails), even after
# explicit clones. The choice is made instead inside an opaque custom op (Note [Adaptive attention op]),
# opt-in (dense_fallback="per_call"): its host sync and eager launches cost more than Flex's slower blocks except
# where every pair is diffuse (measured on an H100; benchmarks/RESULTS.md). The default, dense_fallback="measured",
# decides per head from measured densities and reads nothing back in between (Note [Dispatch by measured density]
# in asam_compile/kernels/dispatch.py). min_seq_len keeps short sites on
# SDPA at compile time.


def adaptive_attention_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    enable_gqa: bool,
    settings: SparseSettings,
) -> torch.Tensor:
    """Adaptive block-sparse attention of (B, H, L, E) q and (B, H_kv, S, E) k, v on the kept blocks (a diffuse
    (batch, head) runs all its blocks): our Triton kernel where it runs (inference on CUDA, Note [The kernel
    inside compiled graphs] in triton_block_sparse.py), else Flex. Traced by Inductor into the compiled graph: no
    host sync, the selection fused with the rest of the graph. dense_fallback="none" (and every training graph)."""
    from torch.nn.attention.flex_attention import flex_attention

    kept, partial, allowed = select_blocks(q, k, scale=scale, causal=causal, settings=settings)
    if triton_block_sparse.usable(q, settings.block_size):
        return triton_on_blocks(q, k, v, kept, settings.block_size, scale, causal)
    if q.device.type == "cpu":
        q, k, v = (runtime.own_buffer(x) for x in (q, k, v))

    block_mask = _in_graph_block_mask(q, k, v, kept, partial, settings.block_size, causal_mask_mod if causal else None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def triton_on_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, block_size: int,
                     scale: float, causal: bool) -> torch.Tensor:
    """asam::block_sparse_attention (our Triton kernel as an op that compiled graphs trace into) on the kept
    blocks (B, H, QB, KB) of q (B, H, L, E) against k, v (GQA when k has fewer heads), one list per query head;
    the causal diagonal is masked per element by the kernel. Where `triton_block_sparse.usable` holds."""
    num, idx = block_tables(kept)
    return torch.ops.asam.block_sparse_attention(q, k, v, num, idx, scale, causal, block_size)


def _in_graph_block_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, partial: torch.Tensor,
                         block_size: int, mask_mod: Any) -> Any:
    """The BlockMask of the kept blocks (B, H, QB, KB), `partial` ones through mask_mod, built in the graph."""
    from torch.nn.attention.flex_attention import BlockMask

    B, H = kept.shape[:2]
    # The tables reach Flex through the opaque copy that runtime's in-graph block masks take (Note [Block
    # tables leave the graph through an opaque op]): Inductor cannot fuse their last steps into its template.
    tables = torch.ops.asam.block_tables(*block_tables(kept & partial), *block_tables(kept & ~partial), B, H)
    # The q-side tables (two more sorts of the block table) serve only Flex's backward: built when a gradient
    # will be asked for (this runs while Inductor traces: in a training graph q, k or v require grad).
    return BlockMask.from_kv_blocks(
        *tables, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(q.shape[2], k.shape[2]),
        compute_q_blocks=torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)),
    )


# Note [Adaptive over a structured mask]
# A site whose mask became a Flex block mask (a sliding window, packed documents, padding read from the run-time
# attention_mask: Note [Runtime masks as in-graph block masks] in passes/flex_plan.py) can go adaptive too: its block
# tables (graph constants, or built in the graph on every call) say which key blocks each query block may see at
# all (`allowed`) and which the mask cuts through (`partial`). The selection then runs inside them: it forces each
# row's leading allowed blocks up to its `sinks`-th full one, its last `window` allowed blocks and the allowed ones
# within `window` of the query block's own position (for a causal mask the same blocks as the causal selection
# forces), estimates the others, and Flex runs the kept blocks with the mask's own mask_mod (and score_mod) on the
# partial ones. Rows the mask leaves empty stay empty and get the original's fix-up. Sinks count full blocks
# because left padding that ends inside a block leaves the sequence's first tokens split over a cut block and the
# next one: measured on SmolLM2-135M (CPU, 2048 tokens, a batch with one row left-padded by 500 tokens, coverage
# 0.995), forcing only the cut block raised the padded row's perplexity from 18.56 to 19.52; with the next block
# forced too it stayed at 18.56, as with padding of 512 that ends on a block boundary (benchmarks/RESULTS.md). A
# row keeps its own block (the one at its position) and, for causal masks with a cache (more keys than queries),
# its last allowed block, which holds the query's own key; a mask that hides from a query its own position could
# leave a row with no kept key (Flex then gives 0 there).


# Note [Valid rows of a masked block]
# The pooled estimate averages a block's queries and keys. Where a mask cuts a block, part of those rows are
# ones the mask removes (padding tokens), and their mean can be far from that of the rows that count: measured
# on SmolLM2-135M (CPU, 2048 tokens, block 32, a row left-padded by 500), in the block holding 20 padding keys
# and the text's first 12 tokens (the attention sink among them) the estimate gave that forced block all of a
# query block's mass (1.000; true 0.327), so nothing else was taken, and a block holding 0.435 of the true mass
# was dropped: the padded row's perplexity rose 3.3 %. With a square mask (as many queries as keys), a row
# counts when the mask lets the query at its position see the key at its position, mask_mod(b, h, i, i): for
# padding that is the padding vector itself, for causal, window, document and prefix masks every row. Blocks are
# then pooled over their valid rows and weighted by their count of valid keys. With a cache (more keys than
# queries) the positions do not line up and all rows count, as before.


def _valid_rows(mask_key: str, captured: tuple[torch.Tensor, ...], batch_heads: tuple[int, int], n: int,
                device: torch.device) -> torch.Tensor:
    """(B', H', n) bool: mask_mod(b, h, i, i) of a square mask, i < n (Note [Valid rows of a masked block])."""
    b = torch.arange(batch_heads[0], device=device)[:, None, None, None]
    h = torch.arange(batch_heads[1], device=device)[None, :, None, None]
    i = torch.arange(n, device=device)[None, None, :, None]
    with runtime._bound(mask_key, captured):
        return runtime.MASK_MODS[mask_key](b, h, i, i).broadcast_to(*batch_heads, n, 1)[..., 0]


def adaptive_masked_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor,
    full_kv_indices: torch.Tensor,
    *captured: torch.Tensor,
    mask_key: str,
    scale: float,
    enable_gqa: bool,
    score_key: str | None,
    settings: SparseSettings,
) -> torch.Tensor:
    """Adaptive block-sparse attention inside a structured mask's block mask (Note [Adaptive over a structured
    mask]): the tables of runtime.flex_attention_call in, the kept blocks of them run by Flex with the mask's
    mask_mod. Traced by Inductor into the compiled graph, as adaptive_attention_call. settings.block_size is the
    mask's block mask's tile (the plan refuses a site where they differ)."""
    block_size = settings.block_size
    n_blocks = -(-k.shape[2] // block_size)
    cut = blocks_from_tables(kv_num_blocks, kv_indices, n_blocks)
    whole = blocks_from_tables(full_kv_num_blocks, full_kv_indices, n_blocks)
    valid = None
    if q.shape[2] == k.shape[2]:
        rows = _valid_rows(mask_key, captured, tuple(kv_num_blocks.shape[:2]), q.shape[2], q.device)
        valid = (rows, rows)
    kept, partial, _ = select_blocks(q, k, scale=scale, causal=False, settings=settings, blocks=(cut | whole, cut),
                                     valid=valid)
    if q.device.type == "cpu":
        q, k, v = (runtime.own_buffer(x) for x in (q, k, v))
    block_mask = _in_graph_block_mask(q, k, v, kept, partial, block_size, runtime.MASK_MODS[mask_key])
    return runtime.bound_flex(q, k, v, block_mask, captured, mask_key, scale, enable_gqa, score_key)


# the adaptive calls that Inductor traces into the graph (not the opaque op)
IN_GRAPH_CALLS = (adaptive_attention_call, adaptive_masked_call)


# Note [Adaptive attention op]
# The rewritten graph calls one custom op, asam::adaptive_attention, which Inductor treats as an opaque
# kernel (its fake implementation gives the output's shape). Inside, per call:
#   1. the block selection (Note [Adaptive sparse attention]), compiled on CUDA (one fused program);
#   2. one host sync: how many (batch, head) pairs the max_density rule sends to exact attention;
#   3. those pairs run SDPA (flash: about 1.45x Flex's speed per block), the others Flex on their kept blocks
#      (a pair sent to SDPA keeps no block in Flex, so Flex skips it); all pairs dense: SDPA alone.
# Choosing per call between two kernels is data-dependent control flow, which in-graph torch.cond could not
# carry through Inductor (Note [Dense fallback at run time]); an opaque op can, and its output shape never
# depends on the data, so it also serves every length under dynamic shapes. Gradients: a second op
# recomputes the forward (same selection) with autograd and differentiates it, Flex's backward included.


def compiled(kind: str, device_type: str) -> Any:
    """flex_attention (kind="flex") or selection.select (kind="select"), compiled once per device type. Selection is
    left eager on CPU (compiling it costs more than it saves there)."""
    key = (kind, device_type)
    fn = _COMPILED.get(key)
    if fn is None:
        if kind == "flex":
            from torch.nn.attention.flex_attention import flex_attention

            # as _compat.compile_fx(flex_on_cpu=True): Inductor's CPU Flex template refuses the epilogues
            # its scheduler fuses into it.
            fn = torch.compile(flex_attention, options={"epilogue_fusion": False} if device_type == "cpu" else None)
        else:
            fn = select if device_type == "cpu" else torch.compile(select)
        _COMPILED[key] = fn
    return fn


_COMPILED: dict[tuple[str, str], Any] = {}


def flex_on_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, partial: torch.Tensor,
                   block_size: int, scale: float, causal: bool, compute_q_blocks: bool = False) -> torch.Tensor:
    """Compiled Flex, eagerly called, on the kept blocks (B, H, QB, KB) of q (B, H, L, E) against k, v (GQA when
    k has fewer heads); `partial` ones (cut by causality) through the causal mask_mod. For the opaque ops."""
    from torch.nn.attention.flex_attention import BlockMask

    with torch.no_grad():
        block_mask = BlockMask.from_kv_blocks(
            *block_tables(kept & partial), *block_tables(kept & ~partial), BLOCK_SIZE=block_size,
            mask_mod=causal_mask_mod if causal else None, seq_lengths=(q.shape[2], k.shape[2]),
            compute_q_blocks=compute_q_blocks,
        )
    if q.device.type == "cpu":
        q, k, v = (runtime.own_buffer(x) for x in (q, k, v))
    return compiled("flex", q.device.type)(q, k, v, block_mask=block_mask, scale=scale,
                                           enable_gqa=k.shape[1] != q.shape[1])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, settings: SparseSettings, scale: float,
            causal: bool) -> torch.Tensor:
    """The body of asam::adaptive_attention (Note [Adaptive attention op]); differentiable."""
    B, H, Hkv = q.shape[0], q.shape[1], k.shape[1]
    gqa = Hkv != H
    with torch.no_grad():
        kept, partial, _, dense = compiled("select", q.device.type)(q.detach(), k.detach(), scale=scale, causal=causal,
                                                                   settings=settings)
        n_dense = int(dense.sum())
    if n_dense == B * H:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    # Flex's backward also reads q-side indices, which from_kv_blocks derives with vmap; only the backward
    # op's recompute needs them (the forward op runs with functorch's keys excluded, where vmap fails).
    out = flex_on_blocks(q, k, v, kept & ~dense[..., None, None], partial, settings.block_size, scale, causal,
                         compute_q_blocks=any(x.requires_grad for x in (q, k, v)))
    if n_dense:
        pairs = dense.flatten().nonzero().squeeze(1)
        b, h = pairs // H, pairs % H
        hk = h // (H // Hkv)
        exact = F.scaled_dot_product_attention(q[b, h][None], k[b, hk][None], v[b, hk][None], is_causal=causal,
                                               scale=scale)
        out = out.index_put((b, h), exact[0])
    return out


def op_arguments(settings: SparseSettings) -> tuple[Any, ...]:
    """The settings as the trailing arguments of asam::adaptive_attention (an op's schema takes no NamedTuple)."""
    return settings.block_size, settings.coverage, settings.max_density, settings.window, settings.sinks, settings.estimator


def _op_settings(block_size: int, coverage: float, max_density: float, window: int, sinks: int,
                 estimator: str) -> SparseSettings:
    """The inverse of op_arguments (min_seq_len was decided at compile time)."""
    return SparseSettings(block_size=block_size, coverage=coverage, max_density=max_density, min_seq_len=0,
                          window=window, sinks=sinks, dense_fallback="per_call", estimator=estimator)


@torch.library.custom_op("asam::adaptive_attention", mutates_args=())
def adaptive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, block_size: int,
    coverage: float, max_density: float, window: int, sinks: int, estimator: str = "pooled",
) -> torch.Tensor:
    """Adaptive block-sparse attention of (B, H, L, E) q and (B, H_kv, S, E) k, v (GQA when H_kv < H):
    (B, H, L, E), contiguous. Note [Adaptive attention op]."""
    settings = _op_settings(block_size, coverage, max_density, window, sinks, estimator)
    with torch.no_grad(), _compat.outside_dispatch_modes(), _compat.more_recompiles():
        # detached: Flex refuses inputs that require grad without the q-side indices of its backward
        return _attend(q.detach(), k.detach(), v.detach(), settings, scale, causal).contiguous()


@adaptive_attention.register_fake
def _(q, k, v, scale, causal, block_size, coverage, max_density, window, sinks, estimator="pooled"):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("asam::adaptive_attention_backward", mutates_args=())
def adaptive_attention_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
    block_size: int, coverage: float, max_density: float, window: int, sinks: int, estimator: str = "pooled",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of asam::adaptive_attention with respect to q, k, v: the forward recomputed (the selection
    is a function of q and k, so it is the same) and differentiated; no gradient flows through the selection."""
    settings = _op_settings(block_size, coverage, max_density, window, sinks, estimator)
    with torch.enable_grad(), _compat.outside_dispatch_modes(), _compat.autograd_inside_op(), _compat.more_recompiles():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = _attend(*leaves, settings, scale, causal)
        grads = torch.autograd.grad(out, leaves, grad)
    return tuple(g.contiguous() for g in grads)


@adaptive_attention_backward.register_fake
def _(grad, q, k, v, scale, causal, block_size, coverage, max_density, window, sinks, estimator="pooled"):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    q, k, v, *rest = inputs
    ctx.save_for_backward(q, k, v)
    ctx.rest = rest


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    q, k, v = ctx.saved_tensors
    dq, dk, dv = adaptive_attention_backward(grad, q, k, v, *ctx.rest)
    return (dq, dk, dv) + (None,) * len(ctx.rest)


adaptive_attention.register_autograd(_backward, setup_context=_setup_context)


def is_adaptive_call(node: Any) -> bool:
    """Whether an FX node is an adaptive sparse attention call (in-graph, or one of the opaque ops)."""
    target = getattr(node, "target", None)
    return target in IN_GRAPH_CALLS or target in (torch.ops.asam.adaptive_attention.default,
                                                  torch.ops.asam.adaptive_dispatch.default)

