"""asam::adaptive_dispatch: per site and head, the adaptive call where its measured density pays, SDPA where not.

Note [Dispatch by measured density]
Real attention is often too diffuse for block sparsity to pay: on Gemma-3-270M's global layers at 16k tokens a
selection at coverage 0.995 keeps 83 % of the blocks, and Flex computes a block at about 0.6x SDPA flash's speed
(issue 16), so the in-graph adaptive call was 0.57x the exact rewrite there. Choosing per call between the two
kernels needs the density on the host: a sync per call (asam::adaptive_attention, dense_fallback="per_call").
This op instead measures and then remembers. Per site and per length bucket (batch size, and the lengths rounded
up to a power of two):
  1. the first CALIBRATION_CALLS calls run the selection on every head and read each head's density (the share of
     its allowed key blocks that it keeps, averaged over the batch) on the host: one sync per calibration call;
  2. heads at or below max_density run sparse (selection + the sparse kernel on their kept blocks, with the
     in-graph max_density rule for a (batch, head) that is diffuse on this input) where, on CUDA, the time they
     save beats the sparse path's own cost (cost.sparse_split, Note [When sparse heads pay]); no head sparse:
     SDPA alone and no selection. The sparse kernel is our Triton one where it runs (CUDA, fp16/bf16, D
     64/128/256, block 64/128): one compiled call (selection, block tables, kernel). Where the kernel runs a
     block as fast as SDPA (D = 256), that call takes all heads and the heads left dense get all their blocks (a
     device mask); elsewhere the sparse heads are gathered for it and the dense heads run SDPA on their slice.
     Without the Triton kernel, Flex, eagerly called, with the same gathers. The gathers use index tensors kept
     on the device;
  3. every RECHECK_EVERY-th call of a bucket measures again (one sync) and updates the split.
Between those calls no value is read back: the split is a Python tuple of head indices. The compiled helpers
(selection, Flex, the Triton path) see a different number of heads per split, and Dynamo compiles each shape once:
the op raises Dynamo's recompile limit (8 by default, after which it would run them uncompiled, and eager Flex
fails inside the op) to 64 while it runs (found on CPU with SmolLM2 at 8k, whose 30 sites split 9 heads in
many ways). The decision is shown by `decisions()` and in explain(); a site runs the same kernels as the exact
rewrite when no head pays, plus the op's own cost: ~70 us on a CPU, but about 0.44 ms a site in a host-bound H200
run of SmolLM2 at 8k (0.59x the exact rewrite; not yet explained), which is why the plan keeps sites that cannot
gain that much exact (Note [Nothing to gain] in passes/adaptive_plan.py). Inference only: a graph that needs gradients takes the in-graph
call (the plan stage decides; the split would change the function between forward and backward).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from typing import Any, Sequence

import torch

from asam_compile import _compat
from asam_compile.config import SparseSettings
from asam_compile.kernels import cost
from asam_compile.kernels.selection import select

F = torch.nn.functional

CALIBRATION_CALLS = 2
RECHECK_EVERY = 100


@dataclasses.dataclass
class Bucket:
    """What one site has measured at one length bucket."""

    calls: int = 0
    measured: int = 0  # calls that measured
    density: list[float] = dataclasses.field(default_factory=list)  # per q head, mean over the measuring calls
    sparse: tuple[int, ...] | None = None  # q heads that run sparse; None until the first measurement
    index: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict, repr=False)  # on the device, per split

    def due(self) -> bool:
        return self.measured < CALIBRATION_CALLS or self.calls % RECHECK_EVERY == 0


_SITES: dict[str, dict[tuple[int, int, int], Bucket]] = {}
_LOCK = threading.Lock()
_COUNTER = itertools.count()


def new_site(name: str) -> str:
    """A fresh key for one rewritten site (its softmax's name, made unique)."""
    key = f"{name}#{next(_COUNTER)}"
    with _LOCK:
        _SITES[key] = {}
    return key


def decisions() -> dict[str, dict[str, Any]]:
    """Per site and length bucket: calls, measured density per head and the heads that run sparse."""
    with _LOCK:
        return {site: {f"B={b} L<={1 << lq} S<={1 << ls}": {"calls": bk.calls, "measured": bk.measured,
                                                             "density": bk.density, "sparse": bk.sparse}
                       for (b, lq, ls), bk in buckets.items()}
                for site, buckets in _SITES.items()}


def reset() -> None:
    """Forget every measurement: each site measures again on its next call."""
    with _LOCK:
        for buckets in _SITES.values():
            buckets.clear()


def _bucket(site: str, q: torch.Tensor, k: torch.Tensor) -> Bucket:
    key = (q.shape[0], (q.shape[2] - 1).bit_length(), (k.shape[2] - 1).bit_length())
    with _LOCK:
        return _SITES.setdefault(site, {}).setdefault(key, Bucket())


def _selection(q: torch.Tensor, k: torch.Tensor, settings: SparseSettings, scale: float, causal: bool) -> Any:
    from asam_compile.kernels.adaptive import compiled

    return compiled("select", q.device.type)(q, k, scale=scale, causal=causal, settings=settings)


def sparse_kernel(q: torch.Tensor, block_size: int) -> str:
    """"triton" (asam_compile/kernels/triton_block_sparse.py) where it runs (`triton_block_sparse.usable`: CUDA,
    fp16 or bf16, head dim 64, 128 or 256, block 64 or 128); else "flex"."""
    from asam_compile.kernels import triton_block_sparse

    with torch.no_grad():
        return "triton" if triton_block_sparse.usable(q, block_size) else "flex"


def _triton_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense_heads: torch.Tensor,
                 settings: SparseSettings, scale: float, causal: bool) -> torch.Tensor:
    """The sparse path on the Triton kernel, compiled as one graph (selection, block tables, kernel: Note [The
    kernel inside compiled graphs]): every head, the `dense_heads` ((H,) bool) and the diffuse (batch, head) pairs
    with all their allowed blocks (the kernel then runs at about SDPA's speed), the others on their kept blocks."""
    from asam_compile.kernels.adaptive import triton_on_blocks

    kept, _, allowed, dense = select(q, k, scale=scale, causal=causal, settings=settings)
    kept = torch.where(dense[..., None, None] | dense_heads[None, :, None, None], allowed, kept)
    return triton_on_blocks(q, k, v, kept, settings.block_size, scale, causal)


_TRITON_PATH: list[Any] = []


def compiled_triton_path() -> Any:
    """_triton_path under torch.compile, built once: (q, k, v, dense_heads, settings, scale, causal) -> out."""
    if not _TRITON_PATH:
        _TRITON_PATH.append(torch.compile(_triton_path, dynamic=False))
    return _TRITON_PATH[0]


def _sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, settings: SparseSettings, scale: float,
            causal: bool) -> torch.Tensor:
    """Selection and Flex on the kept blocks for every head of q (a diffuse (batch, head) keeps all its
    blocks), eagerly called: where the Triton kernel does not run."""
    from asam_compile.kernels.adaptive import flex_on_blocks

    kept, partial, allowed, dense = _selection(q, k, settings, scale, causal)
    kept = torch.where(dense[..., None, None], allowed, kept)
    return flex_on_blocks(q, k, v, kept, partial, settings.block_size, scale, causal)


def split_index(H: int, Hkv: int, sparse: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Device tensors of a head split: the sparse and dense q heads and the kv head each one reads (for the
    gathers), and the dense heads as an (H,) bool (for the Triton path over all heads; all False for the
    gathered sparse heads)."""
    group = H // Hkv
    dense = [h for h in range(H) if h not in set(sparse)]
    idx = {"s": list(sparse), "d": dense, "s_kv": [h // group for h in sparse], "d_kv": [h // group for h in dense]}
    index = {name: torch.tensor(x, device=device, dtype=torch.long) for name, x in idx.items()}
    index["dense_heads"] = torch.tensor([h in set(dense) for h in range(H)], device=device, dtype=torch.bool)
    index["s_none_dense"] = torch.zeros(len(sparse), device=device, dtype=torch.bool)  # the gathered sparse heads
    return index


def run_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, settings: SparseSettings, scale: float,
              causal: bool, sparse: Sequence[int], index: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention with the q heads in `sparse` run adaptive sparse and the others SDPA (Note [Dispatch by measured
    density]). On the Triton kernel where it runs a block as fast as SDPA (cost.sparse_speed), one compiled call
    for all heads, the others with all their blocks; else the sparse heads' q, K and V are gathered (per head, for
    a split that does not follow the kv groups) for the sparse path and the others' for SDPA. `index`: the
    split's split_index (built here if not given: a copy to the device)."""
    H, Hkv = q.shape[1], k.shape[1]
    if not sparse:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=Hkv != H)
    ix = index or split_index(H, Hkv, sparse, q.device)
    kernel = sparse_kernel(q, settings.block_size)
    if kernel == "triton" and (len(sparse) == H or cost.sparse_speed(q.shape[-1], kernel) >= 1.0):
        return compiled_triton_path()(q, k, v, ix["dense_heads"], settings, scale, causal)
    if len(sparse) == H:
        return _sparse(q, k, v, settings, scale, causal)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    qs, ks, vs = q[:, ix["s"]], k[:, ix["s_kv"]], v[:, ix["s_kv"]]
    if kernel == "triton":
        out[:, ix["s"]] = compiled_triton_path()(qs, ks, vs, ix["s_none_dense"], settings, scale, causal)
    else:
        out[:, ix["s"]] = _sparse(qs, ks, vs, settings, scale, causal)
    out[:, ix["d"]] = F.scaled_dot_product_attention(q[:, ix["d"]], k[:, ix["d_kv"]], v[:, ix["d_kv"]],
                                                     is_causal=causal, scale=scale)
    return out


def _measure(bucket: Bucket, q: torch.Tensor, k: torch.Tensor, settings: SparseSettings, scale: float,
             causal: bool) -> None:
    """Run the selection on every head, read the densities (one sync) and update the bucket's split."""
    kept, _, allowed, _ = _selection(q, k, settings, scale, causal)
    n = allowed.expand_as(kept).sum((-2, -1)).clamp(min=1)
    density = (kept.sum((-2, -1)) / n).float().mean(0).tolist()  # per q head, over the batch
    with _LOCK:
        m = bucket.measured
        bucket.density = density if m == 0 else [(a * m + b) / (m + 1) for a, b in zip(bucket.density, density)]
        bucket.measured = min(m + 1, CALIBRATION_CALLS)  # later measurements weigh as much as the calibration's
        split = cost.sparse_split(bucket.density, max_density=settings.max_density, E=q.shape[-1], L=q.shape[2],
                                  S=k.shape[2], causal=causal, batch=q.shape[0], device_type=q.device.type,
                                  kernel=sparse_kernel(q, settings.block_size))
        if split != bucket.sparse:
            bucket.sparse = split
            bucket.index = split_index(q.shape[1], k.shape[1], split, q.device) if split else {}


@torch.library.custom_op("asam::adaptive_dispatch", mutates_args=())
def adaptive_dispatch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, site: str, block_size: int,
    coverage: float, max_density: float, window: int, sinks: int, estimator: str = "pooled",
) -> torch.Tensor:
    """Adaptive attention of (B, H, L, E) q and (B, H_kv, S, E) k, v, dispatched per head by measured density
    (Note [Dispatch by measured density]): (B, H, L, E), contiguous. Inference only."""
    settings = SparseSettings(block_size=block_size, coverage=coverage, max_density=max_density, min_seq_len=0,
                              window=window, sinks=sinks, dense_fallback="measured", estimator=estimator)
    bucket = _bucket(site, q, k)
    with torch.no_grad(), _compat.outside_dispatch_modes(), _compat.more_recompiles():
        if bucket.due():
            _measure(bucket, q, k, settings, scale, causal)
        bucket.calls += 1
        return run_split(q, k, v, settings, scale, causal, bucket.sparse or (), bucket.index).contiguous()


@adaptive_dispatch.register_fake
def _(q, k, v, scale, causal, site, block_size, coverage, max_density, window, sinks, estimator="pooled"):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def op_arguments(settings: SparseSettings, site: str) -> tuple[Any, ...]:
    """The trailing arguments of asam::adaptive_dispatch for a site's settings."""
    return (site, settings.block_size, settings.coverage, settings.max_density, settings.window, settings.sinks,
            settings.estimator)
