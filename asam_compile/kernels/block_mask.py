"""block_mask: build a FlexAttention BlockMask from a mask_mod in row chunks, never materialising L x S.

    keep = mask_mod(b[:, None, None, None], h[None, :, None, None], q[None, None, rows, None], kv[None, None, None, :])
    per (q block, kv block): empty | partial | full       ->  BlockMask.from_kv_blocks(...), density
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import Any, Callable, Hashable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

log = logging.getLogger(__name__)

Tensor = torch.Tensor
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# Note [Block classification]
# Matches torch's create_block_mask (torch 2.11-2.13, _convert_mask_to_block_mask): the mask is padded
# with False up to whole blocks, then a (q block, kv block) is "full" when every one of its
# block_size x block_size elements is kept, "partial" when some but not all are, and left out when none
# are. Positions past L or S count as removed, so a ragged last block is never full: FlexAttention
# then applies mask_mod (and its own bounds check) there, and the partial list is where it looks.
# Full blocks go in full_kv_*, and only there (kv_* holds partial blocks only); a kernel skips
# mask_mod on full blocks. Indices are ordered like torch's: a row's used kv blocks first, ascending,
# then the unused ones ascending, one column per kv block (full width, which CPU lowering needs).

_CACHE_SIZE = 32
_cache: collections.OrderedDict[Hashable, tuple[BlockMask, float]] = collections.OrderedDict()
_cache_lock = threading.Lock()


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def build_block_mask(
    mask_mod: MaskMod,
    B: int,
    H: int,
    L: int,
    S: int,
    device: Any,
    block_size: int = 128,
    chunk_elems: int = 1 << 24,
    *,
    key: Hashable | None = None,
) -> tuple[BlockMask, float]:
    """A BlockMask for `mask_mod` over (B, H, L, S), and its density (share of non-empty blocks).

    mask_mod must be elementwise: it is called with broadcast index grids, a chunk of whole query blocks
    at a time, so that about `chunk_elems` mask elements exist at once. Pass B=1 / H=1 when the mask does
    not depend on them. With a hashable `key` (one per mask function, e.g. its source graph and node), the
    result is cached under (key, B, H, L, S, device, block_size) and later calls skip the evaluation.
    """
    for name, v in (("B", B), ("H", H), ("L", L), ("S", S), ("block_size", block_size), ("chunk_elems", chunk_elems)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"build_block_mask: {name}={v!r}, expected a positive int")
    device = torch.device(device)
    cache_key = None
    if key is not None:
        cache_key = (key, B, H, L, S, str(device), block_size)
        with _cache_lock:
            hit = _cache.get(cache_key)
            if hit is not None:
                _cache.move_to_end(cache_key)
                return hit
    t0 = time.perf_counter()
    partial, full = _classify_blocks(mask_mod, B, H, L, S, device, block_size, chunk_elems)
    density = float((partial | full).float().mean()) if partial.numel() else 0.0
    partial = partial.expand(B, H, *partial.shape[2:])
    full = full.expand(B, H, *full.shape[2:])
    kv_num_blocks, kv_indices = _dense_to_ordered(partial)
    full_kv_num_blocks, full_kv_indices = _dense_to_ordered(full)
    bm = BlockMask.from_kv_blocks(
        kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
        BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(L, S),
    )
    log.debug(
        "block mask %s: B=%d H=%d L=%d S=%d block %d, density %.3f, %.1f ms",
        getattr(mask_mod, "__name__", "mask_mod"), B, H, L, S, block_size, density, 1e3 * (time.perf_counter() - t0),
    )
    result = (bm, density)
    if cache_key is not None:
        with _cache_lock:
            _cache[cache_key] = result
            _cache.move_to_end(cache_key)
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    return result


def _classify_blocks(
    mask_mod: MaskMod, B: int, H: int, L: int, S: int, device: torch.device, bs: int, chunk_elems: int
) -> tuple[Tensor, Tensor]:
    """(partial, full): bool (B', H', nq, nk) with B' in {1, B}, H' in {1, H}. See Note [Block classification]."""
    nq, nk = math.ceil(L / bs), math.ceil(S / bs)
    b = torch.arange(B, device=device)[:, None, None, None]
    h = torch.arange(H, device=device)[None, :, None, None]
    kv = torch.arange(S, device=device)[None, None, None, :]
    partials, fulls = [], []
    i, blocks = 0, 1  # the first chunk is one query block: it shows which of B, H the mask spans
    while i < nq:
        j = min(nq, i + blocks)
        q = torch.arange(i * bs, min(L, j * bs), device=device)[None, None, :, None]
        keep = mask_mod(b, h, q, kv)
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
            raise TypeError(f"mask_mod must return a bool tensor, got {getattr(keep, 'dtype', type(keep))}")
        keep = keep.expand(torch.broadcast_shapes(keep.shape, (1, 1, q.shape[2], S)))
        if keep.dim() != 4:
            raise ValueError(f"mask_mod gave a {keep.dim()}-D result {tuple(keep.shape)}; expected 4-D")
        p, f = _chunk_blocks(keep, j - i, nk, bs)
        partials.append(p)
        fulls.append(f)
        per_block = keep.shape[0] * keep.shape[1] * bs * nk * bs
        blocks = max(1, chunk_elems // per_block)
        i = j
    bh = torch.broadcast_shapes(*(p.shape[:2] for p in partials))
    partial = torch.cat([p.expand(*bh, *p.shape[2:]) for p in partials], dim=2)
    full = torch.cat([f.expand(*bh, *f.shape[2:]) for f in fulls], dim=2)
    return partial, full


def _chunk_blocks(keep: Tensor, nqc: int, nk: int, bs: int) -> tuple[Tensor, Tensor]:
    Bp, Hp, rows, S = keep.shape
    padded = F.pad(keep, (0, nk * bs - S, 0, nqc * bs - rows))  # False: see Note [Block classification]
    counts = padded.reshape(Bp, Hp, nqc, bs, nk, bs).sum(dim=(3, 5))
    full = counts == bs * bs
    return (counts > 0) & ~full, full


def _dense_to_ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """(num_blocks, indices) as torch's own _dense_to_ordered: used columns first, ascending, full width."""
    dense = dense.to(torch.int32)
    num = dense.sum(dim=-1).to(torch.int32)
    indices = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return num.contiguous(), indices.contiguous()
