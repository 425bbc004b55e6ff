"""How close does each block estimator get to the oracle, at what cost? (issue 16; Note [Block estimators])

On real attention inputs (Gemma-3-270M's global layers, saved by gemma3_qkv.py), per layer, head, estimator and
coverage c, the package's selection rule (Note [Adaptive sparse attention]: the forced sinks=1 and window=2 blocks,
then the fewest blocks, largest estimates first, whose estimated mass brings the total to c; max_density 1.0, so
no head falls back) is applied to each estimator's block mass, and the kept blocks are scored against the exact
causal softmax of the measured query rows (oracle_density.block_mass_rows):

  density     sum(kept) / sum(allowed causal blocks) over the measured query blocks (as block_density counts)
  mass, p5    mean and 5th percentile over the measured rows of the true attention mass the kept blocks hold
  cost        FLOPs of the estimate's matmuls / FLOPs of dense causal attention (2 * L^2 * D per head), as the
              estimator computes them (the full square, causal masking applied after); "scores" = score
              elements it materialises / L^2 (memory traffic, what made "sampled" slow on an H100)

Rows measured: every --every-th query block from --first-block on, and the last (the estimators themselves run
over the whole sequence); their exact block masses are cached next to the inputs (blockmass_layer*.pt).

The ORACLE row applies the same rule to the true block mass averaged over each query block's rows ("avg" in
oracle_density.py, "oracle-avg" in gemma3_coverage.py): the fewest blocks a perfect estimate would keep.
"density at equal mass" interpolates each estimator's (mass, density) curve over the coverages at a target mean
mass, against the oracle's at the same mass: the number that says whether an estimator is close to the oracle.

Estimators: the package's (select_blocks: "pooled", "sampled", "dual") and candidates defined here (not in the
package) to compare against:
  rows{r}[-bf16]      r exact query rows per query block (the "sampled" estimator with r rows), optionally bf16
  tiles{gq}x{gk}[-bf16] means of gq query rows and gk keys; per query tile a softmax over key tiles (plus the log of
                      the tile's key count); tile masses summed per key block, averaged over the block's tiles:
                      pooled = tiles128x128, "dual" = mean(tiles128x1,tiles1x128) (tiles128x1: the block's mean
                      query against every key; tiles1x128: every row against the mean keys); optionally bf16
  xattn{S}            XAttention's antidiagonal scoring (Xu et al. 2025): the sum of each S x S tile's
                      antidiagonal q.k (stride S), divided by S, a softmax over key tiles per query tile, summed per
                      key block and averaged over the block's tiles
  mix{r}              the block's mean query as one more row beside r exact rows
  qpool-lse           tiles128x1 written as a log-sum-exp per key block (a check of tiles())
  mean(A,B)           the mean of two candidates' block masses; union(A,B): either one's kept blocks

    python benchmarks/adaptive/estimator_vs_oracle.py --qkv benchmarks/data_local/gemma3_qkv_16k --every 2 \
        --json benchmarks/results/2026-12-04_cpu_estimator_vs_oracle_16k.json
    python benchmarks/adaptive/estimator_vs_oracle.py --layers 5 --estimators dual "mean(tiles128x1,rows8)" \
        "union(tiles128x1,tiles1x128)" --coverages 0.9 0.95 0.99
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/adaptive
from gemma3_qkv import load_layer  # noqa: E402
from oracle_density import block_mass_rows  # noqa: E402

from asam_compile.config import ESTIMATORS, SparseSettings  # noqa: E402
from asam_compile.kernels import selection  # noqa: E402

F = torch.nn.functional
BS = 128  # the package's default block size; the rows measured are whole query blocks of it


# ---- candidate estimators: (q, k, scale, bs) -> block mass (B, H, QB, KB), causal; k already has H heads ----

def _tile_softmax_mass(qt: torch.Tensor, kt: torch.Tensor, scale: float, q_last: torch.Tensor,
                       k_first: torch.Tensor, k_count: torch.Tensor, per_block_q: int, gk_per_block: int,
                       QB: int, KB: int) -> torch.Tensor:
    """Per query tile a softmax over key tiles (tile visible when its first key <= the tile's last row), summed
    per key block, averaged over each query block's tiles. qt (B, H, NQ, E), kt (B, H, NK, E)."""
    B, H, NQ, _ = qt.shape
    NK = kt.shape[2]
    chunk = max(1, (1 << 24) // max(1, B * H * NK))
    parts = []
    for s in range(0, NQ, chunk):
        logits = (qt[:, :, s:s + chunk] @ kt.transpose(-2, -1)).float() * scale + k_count.log()
        visible = k_first[None, :] <= q_last[s:s + chunk, None]
        p = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        p = F.pad(p, (0, KB * gk_per_block - NK)).view(B, H, -1, KB, gk_per_block).sum(-1)
        parts.append(p)
    p = torch.cat(parts, dim=2)  # (B, H, NQ, KB)
    p = F.pad(p, (0, 0, 0, QB * per_block_q - NQ)).view(B, H, QB, per_block_q, KB)
    n = torch.clamp(q_last.new_tensor(NQ) - torch.arange(QB) * per_block_q, max=per_block_q).clamp(min=1)
    return p.sum(3) / n.view(QB, 1).to(p.dtype)


def tiles(gq: int, gk: int, dtype: torch.dtype = torch.float32) -> Callable[..., torch.Tensor]:
    def mass(q, k, scale, bs):
        L, S = q.shape[2], k.shape[2]
        QB, KB = -(-L // bs), -(-S // bs)
        qt, _ = selection.block_means(q, -(-L // gq), gq)
        kt, k_count = selection.block_means(k, -(-S // gk), gk)
        qt, kt = qt.to(dtype), kt.to(dtype)
        q_last = torch.clamp((torch.arange(qt.shape[2]) + 1) * gq, max=L) - 1
        k_first = torch.arange(kt.shape[2]) * gk
        return _tile_softmax_mass(qt, kt, scale, q_last, k_first, k_count.float(), bs // gq, bs // gk, QB, KB)
    return mass


def xattn(stride: int) -> Callable[..., torch.Tensor]:
    def mass(q, k, scale, bs):
        B, H, L, E = q.shape
        S = k.shape[2]
        if L % stride or S % stride:
            raise ValueError("xattn: lengths must be multiples of the stride")
        QB, KB = -(-L // bs), -(-S // bs)
        qt = q.float().reshape(B, H, L // stride, stride * E)
        kt = k.float().reshape(B, H, S // stride, stride, E).flip(3).reshape(B, H, S // stride, stride * E)
        q_last = (torch.arange(L // stride) + 1) * stride - 1
        k_first = torch.arange(S // stride) * stride
        ones = torch.ones(S // stride)
        return _tile_softmax_mass(qt, kt, scale / stride, q_last, k_first, ones, bs // stride, bs // stride, QB, KB)
    return mass


def rows(r: int, dtype: torch.dtype = torch.float32) -> Callable[..., torch.Tensor]:
    def mass(q, k, scale, bs):
        L, S = q.shape[2], k.shape[2]
        QB, KB = -(-L // bs), -(-S // bs)
        allowed = torch.ones(QB, KB, dtype=torch.bool).tril()
        return selection.sampled_mass(q, k, scale, True, allowed, bs, n_rows=r, dtype=dtype)
    return mass


def mix(r: int) -> Callable[..., torch.Tensor]:
    """The block's mean query as one more row beside r exact rows: (pooled_q + r * rows{r}) / (r + 1)."""
    def mass(q, k, scale, bs):
        L, S = q.shape[2], k.shape[2]
        QB, KB = -(-L // bs), -(-S // bs)
        allowed = torch.ones(QB, KB, dtype=torch.bool).tril()
        pq = selection.pooled_q_mass(q, k, scale, True, allowed, bs)
        return (pq + r * selection.sampled_mass(q, k, scale, True, allowed, bs, n_rows=r)) / (r + 1)
    return mass


def qpool_lse(q, k, scale, bs):
    B, H, L, E = q.shape
    S = k.shape[2]
    QB, KB = -(-L // bs), -(-S // bs)
    qp, _ = selection.block_means(q, QB, bs)
    logits = (qp @ k.float().transpose(-2, -1)) * scale  # (B, H, QB, S)
    q_last = torch.clamp((torch.arange(QB) + 1) * bs, max=L) - 1
    logits = logits.masked_fill(torch.arange(S)[None, :] > q_last[:, None], float("-inf"))
    lse = F.pad(logits, (0, KB * bs - S), value=float("-inf")).view(B, H, QB, KB, bs).logsumexp(-1)
    return torch.softmax(lse, dim=-1).nan_to_num(0.0)


def candidate(name: str) -> tuple[Callable[..., torch.Tensor], Callable[[int, int], tuple[float, float]]]:
    """(mass function, (L, bs) -> (cost, scores)) of a candidate name (module docstring)."""
    if m := re.fullmatch(r"rows(\d+)(-bf16)?", name):
        r = int(m[1])
        return rows(r, torch.bfloat16 if m[2] else torch.float32), lambda L, bs: (r / bs / 2 * 2, r / bs)
    if m := re.fullmatch(r"tiles(\d+)x(\d+)(-bf16)?", name):
        gq, gk = int(m[1]), int(m[2])
        return tiles(gq, gk, torch.bfloat16 if m[3] else torch.float32), lambda L, bs: (1 / (gq * gk), 1 / (gq * gk))
    if m := re.fullmatch(r"xattn(\d+)", name):
        s = int(m[1])
        return xattn(s), lambda L, bs: (1 / s, 1 / (s * s))
    if m := re.fullmatch(r"mix(\d+)", name):
        r = int(m[1])
        return mix(r), lambda L, bs: ((r + 1) / bs, (r + 1) / bs)
    if m := re.fullmatch(r"mean\((.+),(.+)\)", name):
        (fa, ca), (fb, cb) = candidate(m[1]), candidate(m[2])
        return (lambda *a: (fa(*a) + fb(*a)) / 2,
                lambda L, bs: tuple(x + y for x, y in zip(ca(L, bs), cb(L, bs))))
    if name == "qpool-lse":
        return qpool_lse, lambda L, bs: (1 / bs, 1 / bs)
    raise ValueError(f"unknown estimator {name!r}")


def package_cost(name: str, L: int, bs: int) -> tuple[float, float]:
    """(cost, scores) of the package's estimators (module docstring): matmul FLOPs / 2 L^2 D, scores / L^2."""
    if name == "pooled":
        return 1 / (bs * bs), 1 / (bs * bs)
    if name == "sampled":
        return selection.SAMPLED_ROWS / bs, selection.SAMPLED_ROWS / bs
    if name == "dual":
        return 2 / bs, 2 / bs
    raise ValueError(name)


# ---- measurement ----

def true_block_mass(q: torch.Tensor, k: torch.Tensor, scale: float, qblocks: list[int], bs: int,
                    cache: Path | None) -> torch.Tensor:
    """m_r for the rows of the given query blocks: (H, len(qblocks) * bs, KB) float32 (zero-padded past each
    row's causal end), cached in `cache`."""
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved["qblocks"] == qblocks and saved["bs"] == bs:
            return saved["m"]
    KB = -(-k.shape[2] // bs)
    parts = []
    for i in qblocks:
        start, end = i * bs, min((i + 1) * bs, q.shape[2])
        m = block_mass_rows(q, k, scale, start, end, bs)  # (H, rows, i + 1)
        parts.append(F.pad(m, (0, KB - m.shape[-1])))
    m = torch.cat(parts, dim=1)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"qblocks": qblocks, "bs": bs, "m": m}, cache)
    return m


def keep(mass: torch.Tensor, forced: torch.Tensor, allowed: torch.Tensor, c: float) -> torch.Tensor:
    """The package's rule on any block mass (as selection.select applies it to its estimate)."""
    need = c - (mass * forced).sum(-1, keepdim=True)
    return forced | selection.take_by_coverage(mass.masked_fill(forced | ~allowed, 0.0), need)


def score(kept: torch.Tensor, m: torch.Tensor, allowed: torch.Tensor, qblocks: list[int], bs: int) -> dict[str, Any]:
    """Per head: density, mean and p5 true mass of kept (H, QB, KB) on the measured rows m (H, R, KB)."""
    H = m.shape[0]
    kq = kept[:, qblocks]  # (H, nq, KB)
    held = (m.view(H, len(qblocks), bs, -1) * kq[:, :, None, :]).sum(-1).view(H, -1)
    density = kq.sum((1, 2)).double() / allowed[qblocks].sum()
    return {"density": density.tolist(), "mass_mean": held.double().mean(1).tolist(),
            "mass_p5": torch.quantile(held.double(), 0.05, dim=1).tolist(), "mass_min": held.amin(1).tolist()}


def at_mass(points: list[tuple[float, float]], target: float) -> float | None:
    """Density at mean mass `target`, interpolated linearly on (mass, density) points; None outside them."""
    pts = sorted(points)
    for (m0, d0), (m1, d1) in zip(pts, pts[1:]):
        if m0 <= target <= m1:
            return d0 if m1 == m0 else d0 + (d1 - d0) * (target - m0) / (m1 - m0)
    return None


def measure_layer(q, k, scale, qblocks, estimators, coverages, cache, bs=BS) -> dict[str, Any]:
    """Rows per (estimator, coverage) with per-head scores, the oracle's first."""
    H, L = q.shape[1], q.shape[2]
    t0 = time.perf_counter()
    m = true_block_mass(q, k, scale, qblocks, bs, cache)
    t_true = time.perf_counter() - t0
    st = SparseSettings(block_size=bs, coverage=0.99, max_density=1.0, min_seq_len=0, window=2, sinks=1)
    forced, allowed, _ = selection.forced_blocks(L, L, causal=True, settings=st, device=q.device)
    KB = allowed.shape[1]
    # the oracle's estimate: the true mass averaged over each measured query block's rows
    avg = torch.zeros(H, allowed.shape[0], KB)
    avg[:, qblocks] = m.view(H, len(qblocks), bs, KB).mean(2)
    out = []
    for c in coverages:
        out.append({"estimator": "oracle", "coverage": c, "cost": None, "scores": None,
                    **score(keep(avg, forced, allowed, c), m, allowed, qblocks, bs)})
    kh = k.repeat_interleave(H // k.shape[1], 1) if k.shape[1] != H else k
    for name in estimators:
        t0 = time.perf_counter()
        if name in ESTIMATORS:
            cost = package_cost(name, L, bs)
            kept_c = {}
            for c in coverages:
                s = st._replace(coverage=c, estimator=name)
                kept_c[c] = selection.select_blocks(q, k, scale=scale, causal=True, settings=s)[0][0]
        elif m_ := re.fullmatch(r"union\((.+),(.+)\)", name):  # either selection's blocks
            (fa, ca), (fb, cb) = candidate(m_[1]), candidate(m_[2])
            cost = tuple(x + y for x, y in zip(ca(L, bs), cb(L, bs)))
            ma, mb = (f(q, kh, scale, bs)[0].masked_fill(~allowed, 0.0) for f in (fa, fb))
            kept_c = {c: keep(ma, forced, allowed, c) | keep(mb, forced, allowed, c) for c in coverages}
        else:
            fn, cost_fn = candidate(name)
            cost = cost_fn(L, bs)
            mass = fn(q, kh, scale, bs)[0].masked_fill(~allowed, 0.0)
            kept_c = {c: keep(mass, forced, allowed, c) for c in coverages}
        seconds = time.perf_counter() - t0
        for c in coverages:
            out.append({"estimator": name, "coverage": c, "cost": cost[0], "scores": cost[1],
                        "seconds": round(seconds, 2), **score(kept_c[c], m, allowed, qblocks, bs)})
        print(f"  {name}: {seconds:.1f} s", flush=True)
    return {"rows": out, "qblocks": qblocks, "true_mass_seconds": round(t_true, 1)}


def summary(layer_rows: list[dict[str, Any]], targets: list[float], H: int) -> list[list[Any]]:
    """Per estimator and head: density at each target mean mass, and its ratio to the oracle's."""
    names = list(dict.fromkeys(r["estimator"] for r in layer_rows))
    table = []
    for name in names:
        rs = [r for r in layer_rows if r["estimator"] == name]
        for h in range(H):
            pts = [(r["mass_mean"][h], r["density"][h]) for r in rs]
            cells = []
            for t in targets:
                d = at_mass(pts, t)
                o = at_mass([(r["mass_mean"][h], r["density"][h]) for r in layer_rows if r["estimator"] == "oracle"], t)
                cells.append("-" if d is None else f"{d:.3f}" + (f" ({d / o:.2f}x)" if o else ""))
            table.append([name, h] + cells + [f"{rs[0]['cost']:.4f}" if rs[0]["cost"] is not None else "-"])
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qkv", default="benchmarks/data_local/gemma3_qkv_16k")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="default: the saved layers")
    p.add_argument("--every", type=int, default=4, help="measure every N-th query block (the last one included)")
    p.add_argument("--first-block", type=int, default=8, help="first query block measured (skip the short rows)")
    p.add_argument("--estimators", nargs="+",
                   default=["pooled", "sampled", "dual", "tiles128x1", "tiles1x128", "rows4", "rows2", "rows8-bf16",
                            "tiles16x16", "tiles128x4", "xattn8", "xattn16", "mean(tiles128x1,rows8)"])
    p.add_argument("--coverages", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999])
    p.add_argument("--targets", type=float, nargs="+", default=[0.95, 0.98, 0.99], help="mean masses compared")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from tabulate import tabulate

    from asam_compile.measure import header_line, run_header

    header = run_header("cpu", workload="block estimators against the oracle on Gemma-3-270M global layers")
    print(header_line(header), flush=True)
    manifest = json.loads((Path(args.qkv) / "manifest.json").read_text())
    layers = args.layers or manifest["layers"]
    results: dict[str, Any] = {"header": header, "args": vars(args), "source": args.qkv, "layers": {}}
    for n in layers:
        q, k, _, _ = load_layer(args.qkv, n)
        scale = manifest["scale"]
        QB = -(-q.shape[2] // BS)
        qblocks = sorted(set(range(args.first_block, QB, args.every)) | {QB - 1})
        cache = Path(args.qkv) / f"blockmass_layer{n}_b{BS}_from{args.first_block}_every{args.every}.pt"
        print(f"layer {n}: {len(qblocks)} query blocks measured", flush=True)
        res = measure_layer(q, k, scale, qblocks, args.estimators, args.coverages, cache)
        results["layers"][str(n)] = res
        H = q.shape[1]
        table = []
        for r in res["rows"]:
            for h in range(H):
                table.append([n, h, r["estimator"], r["coverage"], f"{r['density'][h]:.3f}",
                              f"{r['mass_mean'][h]:.4f}", f"{r['mass_p5'][h]:.3f}",
                              "-" if r["cost"] is None else f"{r['cost']:.4f}",
                              "-" if r["scores"] is None else f"{r['scores']:.4f}"])
        print(tabulate(table, headers=["layer", "head", "estimator", "coverage", "density", "mass mean", "mass p5",
                                       "cost", "scores"]))
        print(f"\nlayer {n}: density at equal mean true mass (x the oracle's)")
        print(tabulate(summary(res["rows"], args.targets, H),
                       headers=["estimator", "head"] + [f"mass {t}" for t in args.targets] + ["cost"]), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1))
    if args.json:
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
