"""The ASAM block selection: which key blocks each query block keeps. The public API that the adaptive calls,
the tests and the benchmarks use:

    select(q, k, *, scale, causal, settings, blocks=None, valid=None) -> Selection(kept, partial, allowed, dense)
    select_blocks(...)          -> (kept, partial, allowed), the max_density rule applied (dense pairs keep all)
    take_by_coverage(rest, need) the fewest blocks, largest estimates first, whose estimates reach `need`
    sampled_mass(...)           the "sampled" estimator's block mass (Note [Block estimators])
    dual_mass(...)              the "dual" estimator's: the mean of pooled_q_mass and pooled_k_mass (same Note)
    block_means(x, n, size)     the per-block means the estimators pool
    block_tables(blocks)        a bool block set as FlexAttention's (num_blocks, indices) tables
    block_density(kept, allowed), reference(q, k, v, ...) (dense evaluation of the selection, for accuracy studies)
    causal_mask_mod             the causal mask_mod of the cut blocks

Settings are asam_compile.config.SparseSettings, passed whole.

Note [Adaptive sparse attention]
For each (batch, head, query block) of 128 queries:
  1. always keep the `sinks` leading key blocks and the `window` key blocks ending at the diagonal;
  2. estimate the attention mass of every allowed key block from pooled queries and keys: the softmax,
     over key blocks, of  mean(q over the query block) . mean(k over the key block) * scale  (plus the log
     of the key block's length, so a short last block weighs less); or with another estimator (Note [Block
     estimators]);
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


def block_means(x: torch.Tensor, n_blocks: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, count): the float32 mean of x (B, H, N, E) over each block of `block_size` rows, (B, H, n_blocks, E),
    and how many rows each averages (the pooling of the estimators; for benchmarks)."""
    return _pooled(x, n_blocks, block_size)


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
# against 0.13 / 0.26 ms pooled: for accuracy, not speed. The matmul runs in float32 (in bf16 the densities and
# kept mass on Gemma-3 were the same to 0.001: estimator_vs_oracle.py's rows8-bf16).
#
# "dual" (issue 16): the mean of two pooled views, each exact on one side. pooled_q_mass: each query block's mean
# query against every key, its softmax over the keys summed per key block: a single key that holds a row's mass (an
# induction hit, a salient token) stays visible, where a key block's mean divides its score by the block size.
# pooled_k_mass: every query row against each key block's mean key (plus the log of its length), its softmax over the
# blocks averaged over the block's rows: rows that each attend a different block stay visible, where the block's mean
# query keeps only what the rows share (often the sink) and puts the mass there. Each half alone fails where the other
# holds: on Gemma-3-270M's global layers at 16k (estimator_vs_oracle.py, raw
# benchmarks/results/2026-12-04_cpu_estimator_*.json) the mean query alone keeps 0.70 of layer 5 head 1's true mass at
# coverage 0.99, and the mean keys alone fail as pooled does on spiky heads (layer 11 head 0: pooled needs 1.55x the
# oracle's blocks for 0.95 of the mass and never reaches 0.98). Together, at equal mean true mass, all 12 heads need
# at most 1.07x the oracle's blocks at 0.99 of the mass (1.11x at 0.98, 1.20x at 0.95, layer 5 head 1; sampled:
# 1.06 / 1.09 / 1.14x), and the kept mass tracks the coverage asked. Whole model (gemma3_coverage.py, the three global
# layers selected): at 16k tokens coverage 0.93 costs +0.19 % perplexity at density 0.44 and 0.95 +0.09 % at 0.50,
# where the +0.5 % bar needs 0.95 with sampled (+0.26 % at 0.49) and 0.98 with pooled (+0.45 % at 0.60); 0.9 is over
# it (+0.69 % at 0.36). The mean query alone is +1.8 % at 0.95 (8k). Cost: two matmuls of (L / block) x S x E per
# head, 2 / block_size of the scores' matmul: 1.6 % of dense causal attention's FLOPs at block 128 (sampled 6.25 %,
# pooled 0.006 %), and L * S / block_size scores each (a quarter of sampled's); in q's dtype (the saved Gemma-3 inputs
# are bf16: the same densities as float32 to 0.002), a group's query heads sharing their keys without a repeat. GPU
# time not measured yet (bench_estimators.py --parts). On inputs where single keys hold most of every row's mass the
# mean-keys half spreads it, so "dual" keeps more than asked (tests/test_estimators.py: up to 1.2x the oracle's blocks
# at equal mass). Tried and not kept (estimator_vs_oracle.py): XAttention's antidiagonal scores (stride 8 and 16),
# means of 16x16 or 128x4 tiles (all as pooled on the spiky heads: any mean over keys hides a spike), 2 or 4 sampled
# rows, the mean query with 4 sampled rows or 8, the union of the two halves' selections, means of 64..8 query rows
# against every key (as the mean query alone on layer 5 head 1).
SAMPLED_ROWS = 8
_SAMPLED_CHUNK = 1 << 26  # scores (float32) per chunk of the sampled estimator


def sampled_mass(
    q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, allowed: torch.Tensor, bs: int,
    n_rows: int = SAMPLED_ROWS, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Block mass (B, H, QB, KB) from `n_rows` exact rows per query block, their scores' matmul in `dtype` (Note
    [Block estimators]; benchmarks try other counts and dtypes)."""
    B, H, L, E = q.shape
    Hk, S = k.shape[1], k.shape[2]
    QB, KB = -(-L // bs), -(-S // bs)
    dev = q.device
    # evenly spaced rows, the first and last of the block included (python ints: no data-dependent size)
    picks = sorted({round(i * (bs - 1) / max(1, n_rows - 1)) for i in range(n_rows)})
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
        scores = (q[:, :, rws].to(dtype) @ k.to(dtype).transpose(-2, -1)).float() * scale  # (B, H, c * r, S)
        if causal:
            scores = scores.masked_fill(keys[None, :] > rws[:, None], float("-inf"))
        p = F.pad(torch.softmax(scores, dim=-1), (0, pad))
        c = rws.numel() // r
        masses.append(p.view(B, H, c, r, KB, bs).sum((3, 5)) / r)
    return torch.cat(masses, dim=2).masked_fill(~allowed, 0.0)


def pooled_q_mass(
    q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, allowed: torch.Tensor, bs: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Block mass (B, H, QB, KB) of each query block's mean query against every key, its own softmax over the
    keys summed per key block (Note [Block estimators], "dual"); the matmul in `dtype` (default: q's)."""
    B, H, L, E = q.shape
    Hk, S = k.shape[1], k.shape[2]
    QB, KB = -(-L // bs), -(-S // bs)
    dev = q.device
    dtype = dtype or q.dtype
    qp = _pooled(q, QB, bs)[0].to(dtype)  # (B, H, QB, E)
    kt = k.to(dtype).transpose(-2, -1)  # (B, Hk, E, S): a group's query heads share it, no repeat
    q_last = torch.clamp((torch.arange(QB, device=dev) + 1) * bs, max=L) - 1  # the block's last row
    hidden = torch.arange(S, device=dev)[None, :] > q_last[:, None]  # (QB, S): keys after the block's last row
    pad = KB * bs - S
    chunk = max(1, _SAMPLED_CHUNK // max(1, B * H * S))
    masses = []
    for start in range(0, QB, chunk):
        qc = qp[:, :, start:start + chunk]
        c = qc.shape[2]
        scores = (qc.reshape(B, Hk, H // Hk * c, E) @ kt).view(B, H, c, S).float() * scale
        if causal:
            scores = scores.masked_fill(hidden[start:start + chunk], float("-inf"))
        p = F.pad(torch.softmax(scores, dim=-1), (0, pad))
        masses.append(p.view(B, H, c, KB, bs).sum(-1))
    return torch.cat(masses, dim=2).masked_fill(~allowed, 0.0)


def pooled_k_mass(
    q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, allowed: torch.Tensor, bs: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Block mass (B, H, QB, KB) of every query row against the key blocks' mean keys (plus the log of each
    block's length), its own softmax over the blocks it sees (those starting at or before the row), averaged over
    the query block's rows (Note [Block estimators], "dual"); the matmul in `dtype` (default: q's)."""
    B, H, L, E = q.shape
    Hk, S = k.shape[1], k.shape[2]
    QB, KB = -(-L // bs), -(-S // bs)
    dev = q.device
    dtype = dtype or q.dtype
    kp, k_len = _pooled(k, KB, bs)
    kpt = kp.to(dtype).transpose(-2, -1)  # (B, Hk, E, KB)
    bias = k_len.clamp(min=1).float().log()
    qs = F.pad(q, (0, 0, 0, QB * bs - L)).to(dtype)  # whole blocks; the padded rows are dropped from the means
    rows = torch.arange(QB * bs, device=dev)
    hidden = (torch.arange(KB, device=dev) * bs)[None, :] > rows[:, None]  # (QB * bs, KB)
    real = (rows < L).float()[:, None]
    chunk = max(1, _SAMPLED_CHUNK // max(1, B * H * bs * KB))  # query blocks per chunk
    masses = []
    for start in range(0, QB, chunk):
        qc = qs[:, :, start * bs:(start + chunk) * bs]
        c = qc.shape[2] // bs
        scores = (qc.reshape(B, Hk, H // Hk * c * bs, E) @ kpt).view(B, H, c * bs, KB).float() * scale + bias
        if causal:
            scores = scores.masked_fill(hidden[start * bs:(start + c) * bs], float("-inf"))
        p = torch.softmax(scores, dim=-1) * real[start * bs:(start + c) * bs]
        masses.append(p.view(B, H, c, bs, KB).sum(3))
    n_rows = torch.clamp(L - torch.arange(QB, device=dev) * bs, max=bs).view(QB, 1)
    return (torch.cat(masses, dim=2) / n_rows).masked_fill(~allowed, 0.0)


def dual_mass(
    q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, allowed: torch.Tensor, bs: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Block mass (B, H, QB, KB) of the "dual" estimator: the mean of pooled_q_mass and pooled_k_mass (Note
    [Block estimators])."""
    return (pooled_q_mass(q, k, scale, causal, allowed, bs, dtype)
            + pooled_k_mass(q, k, scale, causal, allowed, bs, dtype)) / 2


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
    elif settings.estimator == "dual":
        mass = dual_mass(q, k, scale, causal, allowed, bs)
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
