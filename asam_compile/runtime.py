"""Runtime ops that rewritten graphs call: FlexAttention with a block mask built at compile time."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

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


def own_buffer(x: torch.Tensor) -> torch.Tensor:
    """x copied into a buffer of its own, for Inductor's CPU Flex template: it reads the 4-D size of the
    buffer under a view (cpp_flex_attention_template.choose_flex_template, torch 2.13), which fails with
    "not enough values to unpack" for q/k/v that are views of a (B*L, H*E) projection (BERT, MiniLM)."""
    return x.clone(memory_format=torch.contiguous_format)


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
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if q.device.type == "cpu":
        q, k, v = (own_buffer(x) for x in (q, k, v))
    block_mask = BlockMask.from_kv_blocks(
        kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
        BLOCK_SIZE=block_size, mask_mod=MASK_MODS[mask_key], seq_lengths=tuple(seq_lengths),
    )
    holders = CAPTURES.get(mask_key, ())
    saved = [h.tensor for h in holders]
    try:
        # Note [Captured tensors in Flex] in passes/match.py: read this call's (traced) tensors
        for holder, tensor in zip(holders, captured):
            holder.tensor = tensor
        with warnings.catch_warnings():
            # Traced by Inductor, never run eagerly: the "called without torch.compile" warning does not apply.
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            score_mod = SCORE_MODS[score_key] if score_key else None
            return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    finally:
        for holder, tensor in zip(holders, saved):
            holder.tensor = tensor

