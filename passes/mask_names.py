"""mask_names: a readable name for a keep-mask (causal, sliding_window_W, chunked_C, ...), for dumps and logs.

    keep(b, h, q, kv) = (kv <= q) & (kv > q - 1024)   ->  "sliding_window_1024"
    anything not recognised                              ->  "lifted_mask"
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def sample_grid(L: int, S: int, edge: int = 64) -> tuple[Tensor, Tensor]:
    rows = sorted({*range(min(L, edge)), *range(max(0, L - edge), L), *range(0, L, max(1, L // edge))})
    return torch.tensor(rows)[:, None], torch.arange(S)[None, :]


def name_mask(keep_fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor], L: int, S: int) -> str:
    """A readable name for a keep-mask (True keeps a key), judged on a sample of rows at b = h = 0.

    "causal" (kv <= q), "sliding_window_W" ((kv <= q) & (kv > q - W), W < L: each query sees W keys),
    "bidirectional_window_W" (|q - kv| <= W), "chunked_C" (q // C == kv // C), else "lifted_mask".
    Only a name for dumps and logs, never a proof: rows between the sampled ones are not looked at.
    """
    if L < 1 or S < 1:
        return "lifted_mask"
    q, kv = sample_grid(L, S)
    zero = torch.zeros((), dtype=torch.int64)
    try:
        # a captured buffer may live on the GPU: its result then does too
        keep = torch.as_tensor(keep_fn(zero, zero, q, kv)).to("cpu", torch.bool).expand(q.shape[0], S)
        return _recognise(keep, q, kv, L, S)
    except Exception:  # noqa: BLE001 - a name is not worth an error
        return "lifted_mask"


def _recognise(keep: Tensor, q: Tensor, kv: Tensor, L: int, S: int) -> str:
    if bool(keep.all()):
        return "lifted_mask"
    causal = kv <= q
    if torch.equal(keep, causal):
        return "causal"
    last = keep[-1]
    W = int(last.sum())
    if 0 < W < L and torch.equal(keep, causal & (kv > q - W)):
        return f"sliding_window_{W}"
    first = keep[0]  # the row of q = 0
    W = int((first & (kv[0] > 0)).sum())
    if torch.equal(keep, (q - kv).abs() <= W):
        return f"bidirectional_window_{W}"
    C = int(first.sum())
    if 0 < C < max(L, S) and torch.equal(keep, q // C == kv // C):
        return f"chunked_{C}"
    return "lifted_mask"
