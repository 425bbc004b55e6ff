"""ASAM adaptive sparse attention: per input, head and query block, keep the key blocks that matter.

Note [Adaptive sparse attention]
For each (batch, head, query block) of 128 queries:
  1. always keep the `sinks` leading key blocks and the `window` key blocks ending at the diagonal;
  2. estimate the attention mass of every allowed key block from pooled queries and keys: the softmax,
     over key blocks, of  mean(q over the query block) . mean(k over the key block) * scale  (plus the log
     of the key block's length, so a short last block weighs less);
  3. keep, besides the forced blocks, the fewest blocks (largest estimates first) whose estimated mass
     brings the total to `coverage`;
  4. a (batch, head) that keeps more than `max_density` of its allowed blocks keeps all of them: its
     estimate is diffuse, and it runs exact.
The kept blocks become a FlexAttention BlockMask (built with BlockMask.from_kv_blocks from full-width
index tensors, inside the compiled graph) combined with the original mask (none or causal), and Flex runs
only those blocks. Everything here is traced into the compiled graph, so the estimate counts in every
timing. It is approximate: the result differs from exact attention by the mass of the blocks left out.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from asam_compile import runtime

F = torch.nn.functional

# Note [Dense fallback at run time]
# Flex computes a block at about 0.69x the speed of SDPA flash (H100/H200, bf16; benchmarks/RESULTS.md), so a
# call whose selection keeps most blocks would be faster as SDPA flash. Choosing between them per call
# needs data-dependent control flow in the compiled graph: torch.cond(density <= x, flex, sdpa) compiles
# for plain modules, but inside an HF Llama graph Inductor (torch 2.13, CPU) passed the branch operands
# with a layout other than the one the branch was compiled for (assert_size_stride fails), even after
# explicit clones. Until that is solved, a diffuse (batch, head) keeps all its blocks (max_density) and
# runs them in Flex: exact, at Flex's speed. min_seq_len keeps short sites on SDPA at compile time.


@dataclasses.dataclass(frozen=True)
class SparseSettings:
    block_size: int
    coverage: float
    max_density: float
    min_seq_len: int
    window: int
    sinks: int


def _causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return q_idx >= kv_idx


def _pooled(x: torch.Tensor, n_blocks: int, block_size: int) -> torch.Tensor:
    """Mean of x (B, H, N, E) over each block of `block_size` rows, in float32: (B, H, n_blocks, E)."""
    B, H, N, E = x.shape
    pad = n_blocks * block_size - N
    summed = F.pad(x.float(), (0, 0, 0, pad)).view(B, H, n_blocks, block_size, E).sum(3)
    counts = (N - torch.arange(n_blocks, device=x.device) * block_size).clamp(max=block_size)
    return summed / counts.view(1, 1, n_blocks, 1)


def select_blocks(
    q: torch.Tensor, k: torch.Tensor, *, scale: float, causal: bool, settings: SparseSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept, partial, allowed) bool tensors of shape (B, H, QB, KB). See Note [Adaptive sparse attention].

    `allowed`: blocks the original mask lets any query see; `partial`: allowed blocks the mask cuts through
    (need mask_mod); `kept`: the selection, a subset of `allowed`.
    """
    bs = settings.block_size
    B, H, L, _ = q.shape
    S = k.shape[2]
    QB, KB = -(-L // bs), -(-S // bs)
    dev = q.device
    qi = torch.arange(QB, device=dev).view(QB, 1)
    kj = torch.arange(KB, device=dev).view(1, KB)
    q_first = qi * bs
    q_last = torch.clamp((qi + 1) * bs, max=L) - 1
    if causal:
        allowed = kj * bs <= q_last
        partial = allowed & (torch.clamp((kj + 1) * bs, max=S) - 1 > q_first)
        diagonal = q_last // bs
        local = (kj <= diagonal) & (kj > diagonal - settings.window)
    else:
        allowed = torch.ones(QB, KB, dtype=torch.bool, device=dev)
        partial = torch.zeros(QB, KB, dtype=torch.bool, device=dev)
        centre = (q_first + q_last) // 2 * S // L // bs  # the key block at the query block's position
        local = (kj - centre).abs() < settings.window
    forced = allowed & (local | (kj < settings.sinks))

    kp = _pooled(k, KB, bs)
    if kp.shape[1] != H:  # grouped-query attention: each query head reads its group's keys
        kp = kp.repeat_interleave(H // kp.shape[1], dim=1)
    logits = _pooled(q, QB, bs) @ kp.transpose(-2, -1) * scale
    k_len = (S - torch.arange(KB, device=dev) * bs).clamp(max=bs).float()
    logits = (logits + k_len.log()).masked_fill(~allowed, float("-inf"))
    mass = torch.softmax(logits, dim=-1)

    need = settings.coverage - (mass * forced).sum(-1, keepdim=True)
    rest = mass.masked_fill(forced | ~allowed, 0.0)
    ranked, order = torch.sort(rest, dim=-1, descending=True)
    before = torch.cumsum(ranked, dim=-1) - ranked  # estimated mass of the better blocks
    take = (before < need) & (ranked > 0)
    kept = forced | torch.zeros_like(take).scatter(-1, order, take)

    n_allowed = allowed.sum().clamp(min=1)
    density = kept.sum((-2, -1), keepdim=True) / n_allowed  # per (batch, head)
    kept = torch.where(density > settings.max_density, allowed, kept)
    return kept, partial.expand_as(kept), allowed.expand_as(kept)


def _indices(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_blocks, full-width indices) of a bool (B, H, QB, KB) block set, kept blocks first, in order."""
    num = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num, order


def block_density(kept: torch.Tensor, allowed: torch.Tensor) -> float:
    """Share of the allowed blocks that were kept (1.0 = dense)."""
    return float(kept.sum() / allowed.sum().clamp(min=1))


def adaptive_attention_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    enable_gqa: bool,
    block_size: int,
    coverage: float,
    max_density: float,
    window: int,
    sinks: int,
) -> torch.Tensor:
    """Adaptive block-sparse attention of (B, H, L, E) q and (B, H_kv, S, E) k, v. Traced by Inductor."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    settings = SparseSettings(block_size, coverage, max_density, 0, window, sinks)
    kept, partial, allowed = select_blocks(q, k, scale=scale, causal=causal, settings=settings)
    if q.device.type == "cpu":
        q, k, v = (runtime.own_buffer(x) for x in (q, k, v))

    num, idx = _indices(kept & partial)
    full_num, full_idx = _indices(kept & ~partial)
    block_mask = BlockMask.from_kv_blocks(
        num, idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=_causal if causal else None,
        seq_lengths=(q.shape[2], k.shape[2]),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool, settings: SparseSettings,
    kept: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Eager dense evaluation of what adaptive_attention_call computes (for tests and accuracy studies):
    SDPA with the kept blocks (selected here, or given) as a dense boolean mask; also the block density."""
    selected, _, allowed = select_blocks(q, k, scale=scale, causal=causal, settings=settings)
    kept = selected if kept is None else kept
    bs, L, S = settings.block_size, q.shape[2], k.shape[2]
    dense = kept.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :L, :S]
    if causal:
        dense = dense & torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale)
    return out, block_density(kept, allowed)
