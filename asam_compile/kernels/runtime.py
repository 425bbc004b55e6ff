"""Runtime ops that rewritten graphs call: FlexAttention, and block masks built in the graph from runtime masks."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger(__name__)

# mask_mod functions of the block masks our graphs use, by key. Graph nodes carry the key (a string), so the
# graph stays printable and its code readable; the function is looked up when Inductor traces the call.
MASK_MODS: dict[str, Callable[..., Any]] = {}
SCORE_MODS: dict[str, Callable[..., Any]] = {}
# Captured tensors of those functions (passes.lift.Capture), by mask key; see Note [Captured tensors in Flex].
CAPTURES: dict[str, tuple[Any, ...]] = {}


def register_mask_mod(key: str, mask_mod: Callable[..., Any]) -> str:
    MASK_MODS[key] = mask_mod
    return key


def register_captures(key: str, captures: tuple[Any, ...]) -> None:
    CAPTURES[key] = tuple(captures)


def register_score_mod(key: str, score_mod: Callable[..., Any]) -> str:
    SCORE_MODS[key] = score_mod
    return key


@contextlib.contextmanager
def _bound(mask_key: str, captured: tuple[torch.Tensor, ...]) -> Iterator[None]:
    """Note [Captured tensors in Flex] in passes/flex_plan.py: the mask functions of `mask_key` read `captured`
    (this call's traced tensors) instead of the compile-time values, while the block runs."""
    holders = CAPTURES.get(mask_key, ())
    saved = [h.tensor for h in holders]
    try:
        for holder, tensor in zip(holders, captured):
            holder.tensor = tensor
        yield
    finally:
        for holder, tensor in zip(holders, saved):
            holder.tensor = tensor


# Note [Block tables leave the graph through an opaque op]
# On an H100 (torch 2.11), when the block tables built in the graph fed the Flex call directly, inference graphs
# with batch > 1 hit illegal memory accesses inside Inductor's Flex template kernel, whose fused name listed
# the table build's ops (sort, sum, casts): by all signs their last steps were fused into the template
# (training graphs, which save the tables, did not fail). The
# tables therefore pass through asam::block_tables, an opaque copy that also expands them to the full
# (batch, heads) of the call, so Flex reads plain contiguous buffers and never broadcasts a block mask
# (pytorch issue 172225 reports out-of-bounds reads with broadcast batch / head dims). They are small:
# (B, H, L/128, S/128) int32.


@torch.library.custom_op("asam::block_tables", mutates_args=())
def block_tables(
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, full_kv_num_blocks: torch.Tensor,
    full_kv_indices: torch.Tensor, batch: int, heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four tables expanded to (batch, heads, ...) and copied (Note [Block tables leave the graph through an
    opaque op])."""
    tables = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
    # clone, not contiguous(): an op's output may not alias its input (tables already full-size and contiguous)
    return tuple(t.expand(batch, heads, *t.shape[2:]).clone(memory_format=torch.contiguous_format) for t in tables)  # type: ignore[return-value]


@block_tables.register_fake
def _(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, batch, heads):
    tables = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
    return tuple(t.new_empty((batch, heads, *t.shape[2:])) for t in tables)


def block_mask_tensors_call(
    *captured: torch.Tensor,
    mask_key: str,
    batch_heads: tuple[int, int],
    seq_lengths: tuple[int, int],
    block_size: int,
    device: torch.device,
    neginf_key: str | None = None,
    full_batch_heads: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, ...]:
    """The block-mask tensors of a mask that reads runtime inputs, built in the graph on every call.

    Note [Runtime masks as in-graph block masks] in passes/flex_plan.py. Returns (kv_num_blocks, kv_indices,
    full_kv_num_blocks, full_kv_indices, empty_rows[, neginf_rows]): block tables classified as torch's
    create_block_mask does (Note [Block classification] in asam_compile/kernels/block_mask.py), and bool
    (B', H', L, 1) rows with no key kept (and rows whose additive mask is all -inf, with neginf_key).
    Inductor traces it: the mask elements feed reductions and are never stored. With full_batch_heads (B, H),
    the tables come out expanded to it through asam::block_tables (Note [Block tables leave the graph through
    an opaque op]).
    """
    from asam_compile.kernels.block_mask import _dense_to_ordered

    Bm, Hm = batch_heads
    L, S = seq_lengths
    bs = block_size
    nq, nk = (L + bs - 1) // bs, (S + bs - 1) // bs  # sizes may be SymInts (dynamic shapes)
    keep_fn = MASK_MODS[mask_key]
    b = torch.arange(Bm, device=device)[:, None, None, None]
    h = torch.arange(Hm, device=device)[None, :, None, None]
    q_pad = torch.arange(nq * bs, device=device)
    kv_pad = torch.arange(nk * bs, device=device)
    with _bound(mask_key, captured):
        # positions past L or S count as removed; clamped indices keep captured reads in range
        inside = (q_pad < L)[None, None, :, None] & (kv_pad < S)[None, None, None, :]
        q = q_pad.clamp(max=L - 1)[None, None, :, None]
        kv = kv_pad.clamp(max=S - 1)[None, None, None, :]
        keep = (keep_fn(b, h, q, kv) & inside).broadcast_to(Bm, Hm, nq * bs, nk * bs)
        counts = keep.reshape(Bm, Hm, nq, bs, nk, bs).sum(dim=(3, 5))
        q, kv = q[:, :, :L], kv[..., :S]
        empty = ~keep_fn(b, h, q, kv).broadcast_to(Bm, Hm, L, S).any(dim=-1, keepdim=True)
        neginf = None
        if neginf_key is not None:
            neginf = MASK_MODS[neginf_key](b, h, q, kv).broadcast_to(Bm, Hm, L, S).all(dim=-1, keepdim=True)
    full = counts == bs * bs
    partial = (counts > 0) & ~full
    kv_num_blocks, kv_indices = _dense_to_ordered(partial)
    full_kv_num_blocks, full_kv_indices = _dense_to_ordered(full)
    tables = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
    if full_batch_heads is not None:
        tables = torch.ops.asam.block_tables(*tables, *full_batch_heads)
    out = (*tables, empty)
    return out if neginf is None else (*out, neginf)


def own_buffer(x: torch.Tensor) -> torch.Tensor:
    """x copied into a buffer of its own, for Inductor's CPU Flex template: it reads the 4-D size of the
    buffer under a view (cpp_flex_attention_template.choose_flex_template, torch 2.13), which fails with
    "not enough values to unpack" for q/k/v that are views of a (B*L, H*E) projection (BERT, MiniLM) or
    of a 3-D (N, L, E) input."""
    # `* 1.0` (exact): Inductor drops a plain clone of a contiguous tensor, and a 3-D site's q (an unsqueezed
    # view of a 3-D input) then still reached the template as a 3-D buffer
    return (x * 1.0).clone(memory_format=torch.contiguous_format)


def flex_attention_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor,
    full_kv_indices: torch.Tensor,
    *captured: torch.Tensor,
    mask_key: str,
    block_size: int,
    seq_lengths: tuple[int, int],
    scale: float,
    enable_gqa: bool = False,
    score_key: str | None = None,
) -> torch.Tensor:
    """flex_attention(q, k, v) with the BlockMask rebuilt from its kv-block tensors and registered mask_mod.

    Inductor traces this function (AOTAutograd's make_fx records the flex_attention higher-order op) and
    generates the fused block-sparse kernel, as it would for a user's own compiled flex_attention call.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if q.device.type == "cpu":
        q, k, v = (own_buffer(x) for x in (q, k, v))
    block_mask = BlockMask.from_kv_blocks(
        kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
        BLOCK_SIZE=block_size, mask_mod=MASK_MODS[mask_key], seq_lengths=tuple(seq_lengths),
    )
    return bound_flex(q, k, v, block_mask, captured, mask_key, scale, enable_gqa, score_key)


def bound_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, captured: tuple[torch.Tensor, ...],
               mask_key: str, scale: float, enable_gqa: bool, score_key: str | None) -> torch.Tensor:
    """flex_attention on `block_mask`, the mask (and score) functions of `mask_key` reading this call's
    `captured` tensors (Note [Captured tensors in Flex] in passes/flex_plan.py), with the score_mod of `score_key`."""
    from torch.nn.attention.flex_attention import flex_attention

    from asam_compile import _compat

    with _bound(mask_key, captured), _compat.static_closures(), warnings.catch_warnings():
        # Traced by Inductor, never run eagerly: the "called without torch.compile" warning does not apply.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        score_mod = SCORE_MODS[score_key] if score_key else None
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)

