"""The ASAM block selection: which key blocks each query block keeps. The public API that the adaptive calls,
the tests and the benchmarks use:

    select(q, k, *, scale, causal, settings, blocks=None, valid=None) -> Selection(kept, partial, allowed, dense)
    select_blocks(...)          -> (kept, partial, allowed), the max_density rule applied (dense pairs keep all)
    take_by_coverage(rest, need) the fewest blocks, largest estimates first, whose estimates reach `need`
    sampled_mass(...)           the "sampled" estimator's block mass (Note [Block estimators])
    block_tables(blocks)        a bool block set as FlexAttention's (num_blocks, indices) tables
    block_density(kept, allowed), reference(q, k, v, ...) (dense evaluation of the selection, for accuracy studies)
    causal_mask_mod             the causal mask_mod of the cut blocks

Settings are asam_compile.config.SparseSettings, passed whole.

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
index tensors, inside the compiled graph) combined with the original mask (none, causal, or a structured
mask's own block mask: Note [Adaptive over a structured mask]), and Flex runs only those blocks. Everything
here is traced into the compiled graph, so the estimate counts in every timing. It is approximate: the result
differs from exact attention by the mass of the blocks left out.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from asam_compile.config import SparseSettings

F = torch.nn.functional


def causal_mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    """The causal mask_mod, for the blocks the diagonal cuts."""
    return q_idx >= kv_idx


class Selection(NamedTuple):
    """Bool block sets (B, H, QB, KB) and (B, H) of one selection (see `select`)."""

    kept: torch.Tensor  # the selection, before the max_density rule
    partial: torch.Tensor  # allowed blocks the mask cuts through (need mask_mod)
    allowed: torch.Tensor  # blocks the original mask lets any query of the block see
    dense: torch.Tensor  # (B, H): the pairs the max_density rule sends to exact attention


def _pooled(x: torch.Tensor, n_blocks: int, block_size: int,
            valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, count): the mean of x (B, H, N, E) over each block of `block_size` rows, in float32, (B, H,
    n_blocks, E), and the number of rows it averages, (n_blocks,); with `valid` ((B', H', N) bool), over the
    valid rows only (Note [Valid rows of a masked block]), the count then (B', H', n_blocks)."""
    B, H, N, E = x.shape
    pad = n_blocks * block_size - N
    if valid is None:
        summed = F.pad(x.float(), (0, 0, 0, pad)).view(B, H, n_blocks, block_size, E).sum(3)
        counts = (N - torch.arange(n_blocks, device=x.device) * block_size).clamp(max=block_size)
        return summed / counts.view(n_blocks, 1), counts
    w = F.pad(valid.float(), (0, pad))
    summed = F.pad(x.float() * w[..., :N, None], (0, 0, 0, pad)).view(*x.shape[:2], n_blocks, block_size, E).sum(3)
    counts = w.view(*valid.shape[:2], n_blocks, block_size).sum(-1)
    return summed / counts.clamp(min=1)[..., None], counts


# Note [Block estimators]
# "pooled" (the default): one dot product per (query block, key block) of the blocks' mean q and mean k, a
# softmax over key blocks: (L/128)^2 products per head, nothing stored. "sampled": SAMPLED_ROWS exact query
# rows per query block (evenly spaced, the last one included) against every key, each row's own softmax
# (the original mask applied per element), summed per key block and averaged over the rows: costs
# SAMPLED_ROWS / block_size of the scores' matmul, computed in query-block chunks so that at most
# _SAMPLED_CHUNK scores exist at once. Measured on SmolLM2 (benchmarks/RESULTS.md, CPU): at the same density
# sampled rows keep more of the true mass (at 8k: 96.0 % at 30.2 % density where pooled keeps 89.5 % at
# 24.8 % and 96.2 % at 43.6 %): averaging the queries is what loses mass. On an H100 (bench_estimators.py) the
# compiled selection with it took 0.74 / 3.4 ms at 8k / 16k (H=16, D=128), 1.5-1.75x SDPA flash's time,
# against 0.13 / 0.26 ms pooled: for accuracy, not speed. The matmul runs in float32 (not tried: bf16).
SAMPLED_ROWS = 8
_SAMPLED_CHUNK = 1 << 26  # scores (float32) per chunk of the sampled estimator


def sampled_mass(
    q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, allowed: torch.Tensor, bs: int
) -> torch.Tensor:
    """Block mass (B, H, QB, KB) from SAMPLED_ROWS exact rows per query block (Note [Block estimators])."""
    B, H, L, E = q.shape
    Hk, S = k.shape[1], k.shape[2]
    QB, KB = -(-L // bs), -(-S // bs)
    dev = q.device
    # evenly spaced rows, the first and last of the block included (python ints: no data-dependent size)
    picks = sorted({round(i * (bs - 1) / max(1, SAMPLED_ROWS - 1)) for i in range(SAMPLED_ROWS)})
    offsets = torch.tensor(picks, device=dev)
    r = len(picks)
    rows = (torch.arange(QB, device=dev)[:, None] * bs + offsets[None, :]).clamp(max=L - 1)  # (QB, r)
    if Hk != H:  # grouped-query attention: each query head reads its group's keys
        k = k.repeat_interleave(H // Hk, dim=1)
    keys = torch.arange(S, device=dev)
    pad = KB * bs - S
    chunk = max(1, _SAMPLED_CHUNK // max(1, B * H * r * S))
    masses = []
    for start in range(0, QB, chunk):
        rws = rows[start:start + chunk].flatten()  # (c * r,)
        scores = (q[:, :, rws].float() @ k.float().transpose(-2, -1)) * scale  # (B, H, c * r, S)
        if causal:
            scores = scores.masked_fill(keys[None, :] > rws[:, None], float("-inf"))
        p = F.pad(torch.softmax(scores, dim=-1), (0, pad))
        c = rws.numel() // r
        masses.append(p.view(B, H, c, r, KB, bs).sum((3, 5)) / r)
    return torch.cat(masses, dim=2).masked_fill(~allowed, 0.0)


def select_blocks(
    q: torch.Tensor, k: torch.Tensor, *, scale: float, causal: bool, settings: SparseSettings,
    blocks: tuple[torch.Tensor, torch.Tensor] | None = None, valid: tuple[torch.Tensor, torch.Tensor] | None = None,
    take: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept, partial, allowed) bool tensors of shape (B, H, QB, KB). See Note [Adaptive sparse attention].

    `allowed`: blocks the original mask lets any query see; `partial`: allowed blocks the mask cuts through
    (need mask_mod); `kept`: the selection, a subset of `allowed` (all of it for a diffuse (batch, head)).
    `blocks`: a structured mask's (allowed, partial), and `valid` its valid query and key rows, as for select.
    """
    kept, partial, allowed, dense = select(q, k, scale=scale, causal=causal, settings=settings, blocks=blocks, valid=valid,
                                           take=take)
    kept = torch.where(dense[..., None, None], allowed, kept)
    return kept, partial.expand_as(kept), allowed.expand_as(kept)

def forced_blocks(
    L: int, S: int, *, causal: bool, settings: SparseSettings, blocks: tuple[torch.Tensor, torch.Tensor] | None = None,
    device: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(forced, allowed, partial) bool block sets, (QB, KB) or blocks' shape: the blocks every selection keeps
    whatever the estimate says (sinks, window), the blocks the mask allows, and those it cuts. Also what the plan
    stage reads to skip the selection where the forced blocks alone exceed max_density."""
    bs = settings.block_size
    QB, KB = -(-L // bs), -(-S // bs)
    dev = blocks[0].device if blocks is not None else device
    qi = torch.arange(QB, device=dev).view(QB, 1)
    kj = torch.arange(KB, device=dev).view(1, KB)
    q_first = qi * bs
    q_last = torch.clamp((qi + 1) * bs, max=L) - 1
    centre = (q_first + q_last) // 2 * S // L // bs  # the key block at the query block's position
    near = (kj - centre).abs() < settings.window
    if blocks is not None:
        allowed, partial = blocks
        # the leading allowed blocks up to the `sinks`-th full one (a leading block that the mask cuts, as left
        # padding does, holds few keys and does not count), the last `window` allowed blocks of each row and the
        # `window` blocks around the query block's own position (a mask without causality, e.g. BERT's padding):
        # for a causal mask the sinks and the blocks ending at the diagonal, as below
        full = (allowed & ~partial).to(torch.int32)
        first = torch.cumsum(allowed.to(torch.int32), -1)
        last = first[..., -1:] - first + 1
        local = near | (last <= settings.window)
        forced = allowed & ((torch.cumsum(full, -1) - full < settings.sinks) | local)
    elif causal:
        allowed = kj * bs <= q_last
        partial = allowed & (torch.clamp((kj + 1) * bs, max=S) - 1 > q_first)
        diagonal = q_last // bs
        local = (kj <= diagonal) & (kj > diagonal - settings.window)
    else:
        allowed = torch.ones(QB, KB, dtype=torch.bool, device=dev)
        partial = torch.zeros(QB, KB, dtype=torch.bool, device=dev)
        local = near
    if blocks is None:
        forced = allowed & (local | (kj < settings.sinks))
    return forced, allowed, partial


def forced_density(forced: torch.Tensor, allowed: torch.Tensor) -> float:
    """The largest share, over (batch, head), of the allowed blocks that are forced (1.0 = nothing to select)."""
    if forced.dim() == 2:
        forced, allowed = forced[None, None], allowed[None, None]
    n = allowed.sum((-2, -1)).clamp(min=1)
    return float((forced.sum((-2, -1)) / n).max())


def select(
    q: torch.Tensor, k: torch.Tensor, *, scale: float, causal: bool, settings: SparseSettings,
    blocks: tuple[torch.Tensor, torch.Tensor] | None = None, valid: tuple[torch.Tensor, torch.Tensor] | None = None,
    take: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Selection:
    """Selection(kept, partial, allowed, dense): the selection before the max_density rule, and the (B, H) bool
    of the (batch, head) pairs that the rule sends to exact attention. `blocks`: (allowed, partial) of a structured
    mask's block mask, (B', H', QB, KB) (Note [Adaptive over a structured mask]); else none or causal.
    `valid`: (B', H', L) and (B', H', S) bool, the query and key rows the pooled estimate averages (Note [Valid
    rows of a masked block]); else all. `take`: the ranking rule (take_by_coverage; benchmarks try others)."""
    bs = settings.block_size
    B, H, L, _ = q.shape
    S = k.shape[2]
    QB, KB = -(-L // bs), -(-S // bs)
    forced, allowed, partial = forced_blocks(L, S, causal=causal, settings=settings, blocks=blocks, device=q.device)

    if settings.estimator == "sampled":  # Note [Block estimators]
        mass = sampled_mass(q, k, scale, causal, allowed, bs)
    else:
        q_valid, k_valid = valid if valid is not None else (None, None)
        if k_valid is not None and k_valid.shape[1] not in (1, k.shape[1]):  # head-dependent mask under GQA
            k = k.repeat_interleave(H // k.shape[1], dim=1)
        kp, k_len = _pooled(k, KB, bs, k_valid)
        if kp.shape[1] != H:  # grouped-query attention: each query head reads its group's keys
            kp = kp.repeat_interleave(H // kp.shape[1], dim=1)
        logits = _pooled(q, QB, bs, q_valid)[0] @ kp.transpose(-2, -1) * scale
        # each block's estimate counts its (valid) keys; a block without any gets a finite weight of one
        logits = logits + k_len.clamp(min=1).float().log().unsqueeze(-2)
        logits = logits.masked_fill(~allowed, float("-inf"))
        mass = torch.softmax(logits, dim=-1)
        if blocks is not None:  # a row with no allowed block (a padding query) has no mass, not NaN
            mass = torch.where(allowed.any(-1, keepdim=True), mass, 0.0)

    need = settings.coverage - (mass * forced).sum(-1, keepdim=True)
    kept = forced | (take or take_by_coverage)(mass.masked_fill(forced | ~allowed, 0.0), need)

    n_allowed = allowed.sum((-2, -1)).clamp(min=1)
    density = kept.sum((-2, -1)) / n_allowed  # per (batch, head)
    return Selection(kept, partial, allowed, density > settings.max_density)

# Note [Selection cost]
# The selection runs on every call, inside the compiled graph, so its kernels count against the blocks it skips.
# Measured on an H100 (benchmarks/RESULTS.md, H=16, D=128, planted inputs, 64k tokens, coverage 0.99): the whole
# module took 4.36 ms when the index tables came from stable argsorts of each row (0.73 ms in the fused kernel
# holding them) and 3.76 ms with the tables built from running counts and a scatter (block_tables below), against 3.01
# ms for Flex alone on the same blocks and 27.9 ms for SDPA flash. Inference graphs skip Flex's q-side tables (two
# transposed sorts that only its backward reads). take_by_coverage sorts the estimates' values only and thresholds at the
# smallest one the coverage rule takes, instead of scattering the taken ranks back through the sort's indices: at
# 64k (coverage 0.995) the selection went from 0.68 to 0.55 ms and the whole module from 4.82 to 4.62 ms (193,149
# blocks kept instead of 193,146: ties at the threshold). Tried and not kept: a bisection for the coverage
# threshold instead of sorting the estimates (2.3x slower at 16k), Flex kernel options (ROWS_GUARANTEED_SAFE,
# PRESCALE_QK, USE_TMA, other tiles: -1 % to +9 %).


def take_by_coverage(rest: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """The fewest blocks, largest estimates first, whose estimates `rest` sum to `need` (bool, rest's shape),
    and any block whose estimate equals the smallest one taken. The sort ranks values only: the smallest value
    taken becomes a threshold (Note [Selection cost])."""
    ranked = torch.sort(rest, dim=-1, descending=True).values
    before = torch.cumsum(ranked, dim=-1) - ranked  # estimated mass of the better blocks
    taken = (before < need) & (ranked > 0)
    least = torch.where(taken, ranked, float("inf")).amin(-1, keepdim=True)
    return (rest >= least) & (rest > 0)


def block_tables(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_blocks, full-width indices) of a bool (B, H, QB, KB) block set: each row a permutation of the key
    blocks, the kept ones first, each group in order (what a stable descending argsort gives). Built by
    scattering every column to its rank from two running counts: no sort (Note [Selection cost])."""
    num = blocks.sum(-1, dtype=torch.int32)
    b = blocks.to(torch.int32)
    rank = torch.where(blocks, torch.cumsum(b, -1) - 1, num[..., None] + torch.cumsum(1 - b, -1) - 1)
    cols = torch.arange(blocks.shape[-1], dtype=torch.int32, device=blocks.device).expand(blocks.shape)
    return num, torch.zeros_like(cols).scatter(-1, rank.long(), cols)


def blocks_from_tables(num: torch.Tensor, idx: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """The bool (..., QB, n_blocks) block set of a (num_blocks, indices) table pair (the inverse of block_tables)."""
    listed = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    counts = torch.zeros((*idx.shape[:-1], n_blocks), dtype=torch.int32, device=idx.device)
    return counts.scatter_add(-1, idx.long(), listed.to(torch.int32)) > 0


def block_density(kept: torch.Tensor, allowed: torch.Tensor) -> float:
    """Share of the allowed blocks that were kept (1.0 = dense)."""
    return float(kept.sum() / allowed.sum().clamp(min=1))


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool, settings: SparseSettings,
    kept: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Eager dense evaluation of what asam::adaptive_attention computes (for tests and accuracy studies):
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
