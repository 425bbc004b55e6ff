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
index tensors, inside the compiled graph) combined with the original mask (none, causal, or a structured
mask's own block mask: Note [Adaptive over a structured mask]), and Flex runs only those blocks. Everything
here is traced into the compiled graph, so the estimate counts in every timing. It is approximate: the result
differs from exact attention by the mass of the blocks left out.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from asam_compile import _compat, runtime

F = torch.nn.functional

# Note [Dense fallback at run time]
# Flex computes a block at about 0.69x the speed of SDPA flash (H100/H200, bf16; benchmarks/RESULTS.md), so a
# call whose selection keeps most blocks would be faster as SDPA flash. Choosing between them per call
# needs data-dependent control flow in the compiled graph: torch.cond(density <= x, flex, sdpa) compiles
# for plain modules, but inside an HF Llama graph Inductor (torch 2.13, CPU) passed the branch operands
# with a layout other than the one the branch was compiled for (assert_size_stride fails), even after
# explicit clones. The choice is made instead inside an opaque custom op (Note [Adaptive attention op]),
# opt-in (dense_fallback=True): its host sync and eager launches cost more than Flex's slower blocks except
# where every pair is diffuse (measured on an H100; benchmarks/RESULTS.md). min_seq_len keeps short sites on
# SDPA at compile time.


@dataclasses.dataclass(frozen=True)
class SparseSettings:
    block_size: int
    coverage: float
    max_density: float
    min_seq_len: int
    window: int
    sinks: int
    dense_fallback: bool = False
    estimator: str = "pooled"  # Note [Block estimators]


def _causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return q_idx >= kv_idx


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


def _sampled_mass(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept, partial, allowed) bool tensors of shape (B, H, QB, KB). See Note [Adaptive sparse attention].

    `allowed`: blocks the original mask lets any query see; `partial`: allowed blocks the mask cuts through
    (need mask_mod); `kept`: the selection, a subset of `allowed` (all of it for a diffuse (batch, head)).
    `blocks`: a structured mask's (allowed, partial), and `valid` its valid query and key rows, as for _select.
    """
    kept, partial, allowed, dense = _select(q, k, scale, causal, settings, blocks, valid)
    kept = torch.where(dense[..., None, None], allowed, kept)
    return kept, partial.expand_as(kept), allowed.expand_as(kept)


def _select(
    q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, settings: SparseSettings,
    blocks: tuple[torch.Tensor, torch.Tensor] | None = None, valid: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept, partial, allowed, dense): the selection before the max_density rule, and the (B, H) bool of the
    (batch, head) pairs that the rule sends to exact attention. `blocks`: (allowed, partial) of a structured
    mask's block mask, (B', H', QB, KB) (Note [Adaptive over a structured mask]); else none or causal.
    `valid`: (B', H', L) and (B', H', S) bool, the query and key rows the pooled estimate averages (Note [Valid
    rows of a masked block]); else all."""
    bs = settings.block_size
    B, H, L, _ = q.shape
    S = k.shape[2]
    QB, KB = -(-L // bs), -(-S // bs)
    dev = q.device
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

    if settings.estimator == "sampled":  # Note [Block estimators]
        mass = _sampled_mass(q, k, scale, causal, allowed, bs)
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
    kept = forced | _take(mass.masked_fill(forced | ~allowed, 0.0), need)

    n_allowed = allowed.sum((-2, -1)).clamp(min=1)
    density = kept.sum((-2, -1)) / n_allowed  # per (batch, head)
    return kept, partial, allowed, density > settings.max_density


# Note [Selection cost]
# The selection runs on every call, inside the compiled graph, so its kernels count against the blocks it skips.
# Measured on an H100 (benchmarks/RESULTS.md, H=16, D=128, planted inputs, 64k tokens, coverage 0.99): the whole
# module took 4.36 ms when the index tables came from stable argsorts of each row (0.73 ms in the fused kernel
# holding them) and 3.76 ms with the tables built from running counts and a scatter (_indices below), against 3.01
# ms for Flex alone on the same blocks and 27.9 ms for SDPA flash. Inference graphs skip Flex's q-side tables (two
# transposed sorts that only its backward reads). _take sorts the estimates' values only and thresholds at the
# smallest one the coverage rule takes, instead of scattering the taken ranks back through the sort's indices: at
# 64k (coverage 0.995) the selection went from 0.68 to 0.55 ms and the whole module from 4.82 to 4.62 ms (193,149
# blocks kept instead of 193,146: ties at the threshold). Tried and not kept: a bisection for the coverage
# threshold instead of sorting the estimates (2.3x slower at 16k), Flex kernel options (ROWS_GUARANTEED_SAFE,
# PRESCALE_QK, USE_TMA, other tiles: -1 % to +9 %).


def _take(rest: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """The fewest blocks, largest estimates first, whose estimates `rest` sum to `need` (bool, rest's shape),
    and any block whose estimate equals the smallest one taken. The sort ranks values only: the smallest value
    taken becomes a threshold (Note [Selection cost])."""
    ranked = torch.sort(rest, dim=-1, descending=True).values
    before = torch.cumsum(ranked, dim=-1) - ranked  # estimated mass of the better blocks
    taken = (before < need) & (ranked > 0)
    least = torch.where(taken, ranked, float("inf")).amin(-1, keepdim=True)
    return (rest >= least) & (rest > 0)


def _indices(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_blocks, full-width indices) of a bool (B, H, QB, KB) block set: each row a permutation of the key
    blocks, the kept ones first, each group in order (what a stable descending argsort gives). Built by
    scattering every column to its rank from two running counts: no sort (Note [Selection cost])."""
    num = blocks.sum(-1, dtype=torch.int32)
    b = blocks.to(torch.int32)
    rank = torch.where(blocks, torch.cumsum(b, -1) - 1, num[..., None] + torch.cumsum(1 - b, -1) - 1)
    cols = torch.arange(blocks.shape[-1], dtype=torch.int32, device=blocks.device).expand(blocks.shape)
    return num, torch.zeros_like(cols).scatter(-1, rank.long(), cols)


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
    estimator: str = "pooled",
) -> torch.Tensor:
    """Adaptive block-sparse attention of (B, H, L, E) q and (B, H_kv, S, E) k, v, all in Flex (a diffuse
    (batch, head) runs all its blocks there). Traced by Inductor into the compiled graph: no host sync, the
    selection fused with the rest of the graph. The default; dense_fallback=True takes the op below."""
    from torch.nn.attention.flex_attention import flex_attention

    settings = SparseSettings(block_size, coverage, max_density, 0, window, sinks, estimator=estimator)
    kept, partial, allowed = select_blocks(q, k, scale=scale, causal=causal, settings=settings)
    if q.device.type == "cpu":
        q, k, v = (runtime.own_buffer(x) for x in (q, k, v))

    block_mask = _in_graph_block_mask(q, k, v, kept, partial, block_size, _causal if causal else None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def _in_graph_block_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, partial: torch.Tensor,
                         block_size: int, mask_mod: Any) -> Any:
    """The BlockMask of the kept blocks (B, H, QB, KB), `partial` ones through mask_mod, built in the graph."""
    from torch.nn.attention.flex_attention import BlockMask

    B, H = kept.shape[:2]
    # The tables reach Flex through the opaque copy that runtime's in-graph block masks take (Note [Block
    # tables leave the graph through an opaque op]): Inductor cannot fuse their last steps into its template.
    tables = torch.ops.asam.block_tables(*_indices(kept & partial), *_indices(kept & ~partial), B, H)
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


def _dense_blocks(num: torch.Tensor, idx: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """The bool (..., QB, n_blocks) block set of a (num_blocks, indices) table pair."""
    listed = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    counts = torch.zeros((*idx.shape[:-1], n_blocks), dtype=torch.int32, device=idx.device)
    return counts.scatter_add(-1, idx.long(), listed.to(torch.int32)) > 0


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
    block_size: int,
    scale: float,
    enable_gqa: bool,
    score_key: str | None,
    coverage: float,
    max_density: float,
    window: int,
    sinks: int,
) -> torch.Tensor:
    """Adaptive block-sparse attention inside a structured mask's block mask (Note [Adaptive over a structured
    mask]): the tables of runtime.flex_attention_call in, the kept blocks of them run by Flex with the mask's
    mask_mod. Traced by Inductor into the compiled graph, as adaptive_attention_call."""
    n_blocks = -(-k.shape[2] // block_size)
    cut = _dense_blocks(kv_num_blocks, kv_indices, n_blocks)
    whole = _dense_blocks(full_kv_num_blocks, full_kv_indices, n_blocks)
    settings = SparseSettings(block_size, coverage, max_density, 0, window, sinks)
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


def _compiled(kind: str, device_type: str) -> Any:
    """flex_attention (kind="flex") or _select (kind="select"), compiled once per device type. Selection is
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
            fn = _select if device_type == "cpu" else torch.compile(_select)
        _COMPILED[key] = fn
    return fn


_COMPILED: dict[tuple[str, str], Any] = {}


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, settings: SparseSettings, scale: float,
            causal: bool) -> torch.Tensor:
    """The body of asam::adaptive_attention (Note [Adaptive attention op]); differentiable."""
    from torch.nn.attention.flex_attention import BlockMask

    B, H, L, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    gqa = Hkv != H
    with torch.no_grad():
        kept, partial, _, dense = _compiled("select", q.device.type)(q.detach(), k.detach(), scale, causal, settings)
        n_dense = int(dense.sum())
    if n_dense == B * H:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    with torch.no_grad():
        sparse = kept & ~dense[..., None, None]
        cut, whole = sparse & partial, sparse & ~partial
        # Flex's backward also reads q-side indices, which from_kv_blocks derives with vmap; only the backward
        # op's recompute needs them (the forward op runs with functorch's keys excluded, where vmap fails).
        block_mask = BlockMask.from_kv_blocks(
            *_indices(cut), *_indices(whole), BLOCK_SIZE=settings.block_size,
            mask_mod=_causal if causal else None, seq_lengths=(L, S),
            compute_q_blocks=any(x.requires_grad for x in (q, k, v)),
        )
    if q.device.type == "cpu":
        q, k, v = (runtime.own_buffer(x) for x in (q, k, v))
    out = _compiled("flex", q.device.type)(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    if n_dense:
        pairs = dense.flatten().nonzero().squeeze(1)
        b, h = pairs // H, pairs % H
        hk = h // (H // Hkv)
        exact = F.scaled_dot_product_attention(q[b, h][None], k[b, hk][None], v[b, hk][None], is_causal=causal,
                                               scale=scale)
        out = out.index_put((b, h), exact[0])
    return out


@torch.library.custom_op("asam::adaptive_attention", mutates_args=())
def adaptive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, block_size: int,
    coverage: float, max_density: float, window: int, sinks: int, estimator: str = "pooled",
) -> torch.Tensor:
    """Adaptive block-sparse attention of (B, H, L, E) q and (B, H_kv, S, E) k, v (GQA when H_kv < H):
    (B, H, L, E), contiguous. Note [Adaptive attention op]."""
    settings = SparseSettings(block_size, coverage, max_density, 0, window, sinks, estimator=estimator)
    with torch.no_grad(), _compat.outside_dispatch_modes():
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
    settings = SparseSettings(block_size, coverage, max_density, 0, window, sinks, estimator=estimator)
    with torch.enable_grad(), _compat.outside_dispatch_modes(), _compat.autograd_inside_op():
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
    """Whether an FX node is an adaptive sparse attention call (in-graph, or the dense_fallback op)."""
    target = getattr(node, "target", None)
    return target in IN_GRAPH_CALLS or target is torch.ops.asam.adaptive_attention.default


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
