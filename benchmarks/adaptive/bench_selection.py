"""What does the adaptive block selection cost on the GPU, and which way of ranking and indexing is cheapest?

Each variant is compiled alone (no Flex) and timed on the same planted q, k: the selection of asam's adaptive
mode (pooled estimate, coverage, max_density rule) followed by the four block-index tables that
BlockMask.from_kv_blocks takes. Variants:
  argsort     the tables from a stable argsort of each row (asam_compile before 2026-11-27), the blocks chosen
              by sorting the estimates with their indices and scattering the taken ranks back
  scatter     the tables from running counts and a scatter (asam_compile.kernels.selection.block_tables), blocks as argsort
  threshold   scatter, and the blocks chosen by bisecting a mass threshold (16 steps) instead of sorting the
              estimates (not in asam_compile: it can keep a few more blocks at the boundary)
  values      scatter, and the blocks chosen from a sort of the estimates' values alone: the smallest value
              the coverage rule takes becomes a threshold (asam_compile.kernels.selection.take_by_coverage since session 6; blocks
              tied with the threshold are all kept)
Printed beside them: SDPA flash, Flex alone on the selected blocks, and the whole compiled module
(backend="asam", adaptive) as the default in-graph path runs it.

    python benchmarks/adaptive/bench_selection.py --seqs 16384 65536 --json selection.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from asam_compile.measure import header_line, run_header, time_ms


def argsort_indices(blocks):
    num = blocks.sum(-1, dtype=torch.int32)
    return num, torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)


def threshold_take(rest, need, steps=16):
    """In place of selection.take_by_coverage: blocks whose estimate is at least the largest threshold t with
    sum(rest >= t) >= need (bisection)."""
    lo = torch.zeros_like(need)
    hi = rest.amax(-1, keepdim=True)
    for _ in range(steps):
        mid = (lo + hi) / 2
        ok = (rest * (rest >= mid)).sum(-1, keepdim=True) >= need
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return (rest >= lo) & (rest > 0) & (need > 0)


def index_take(rest, need):
    """selection.take_by_coverage before session 6: the taken ranks scattered back through the sort's indices."""
    ranked, order = torch.sort(rest, dim=-1, descending=True)
    before = torch.cumsum(ranked, dim=-1) - ranked
    take = (before < need) & (ranked > 0)
    return torch.zeros_like(take).scatter(-1, order, take)


TAKES = {"argsort": index_take, "scatter": index_take, "threshold": threshold_take}  # values: the package's


def make_selection(variant, settings, scale):
    from asam_compile.kernels import selection

    indices = argsort_indices if variant == "argsort" else selection.block_tables

    def run(q, k):
        kept, partial, _ = selection.select_blocks(q, k, scale=scale, causal=True, settings=settings,
                                                   take=TAKES.get(variant))
        return (*indices(kept & partial), *indices(kept & ~partial))

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--coverage", type=float, default=0.995)
    p.add_argument("--variants", nargs="+", default=["argsort", "scatter", "values"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", default="")
    args = p.parse_args()

    import asam_compile
    from asam_compile.kernels import adaptive, selection
    from asam_compile.models import CausalAttention, planted_qkv
    from torch.nn.attention.flex_attention import BlockMask

    dev, dtype = args.device, getattr(torch, args.dtype)
    header = run_header(dev, heads=args.heads, dim=args.dim, coverage=args.coverage)
    print(header_line(header), flush=True)
    rows = []
    st = selection.SparseSettings(128, args.coverage, 0.5, 0, 2, 1)
    for L in args.seqs:
        q, k, v = planted_qkv(1, args.heads, L, args.dim, 4, dev, dtype)
        scale = args.dim ** -0.5
        row = {"seq": L, "sdpa": time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), dev,
                                         args.iters)}
        tables = {}
        for variant in args.variants:
            fn = torch.compile(make_selection(variant, st, scale))
            with torch.no_grad():
                tables[variant] = fn(q, k)
                row[variant] = time_ms(lambda: fn(q, k), dev, args.iters)
            blocks = int(tables[variant][0].sum() + tables[variant][2].sum())
            row[f"{variant}_blocks"] = blocks
        if "argsort" in tables and "scatter" in tables:
            row["scatter_equals_argsort"] = all(torch.equal(a, b) for a, b in zip(tables["argsort"], tables["scatter"]))
        t = tables[args.variants[0]]
        bm = BlockMask.from_kv_blocks(*t, BLOCK_SIZE=128, mask_mod=selection.causal_mask_mod, seq_lengths=(L, L),
                                      compute_q_blocks=False)
        flex = adaptive.compiled("flex", dev)
        with torch.no_grad():
            row["flex_alone"] = time_ms(lambda: flex(q, k, v, block_mask=bm, scale=scale), dev, args.iters)
            module = torch.compile(CausalAttention(), backend="asam",
                                   options={"mode": "adaptive", "coverage": args.coverage, "min_seq_len": 0})
            with asam_compile.capture() as cap:
                module(q, k, v)
            row["fired"] = [c.target for c in cap.report.candidates]
            row["in_graph"] = time_ms(lambda: module(q, k, v), dev, args.iters)
        row["density"] = row[f"{args.variants[0]}_blocks"] / (args.heads * (L // 128) * (L // 128 + 1) / 2)
        print(row, flush=True)
        rows.append(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"header": header, "rows": rows}, f, indent=2)
        q = k = v = tables = bm = None  # free the device memory before the next length
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
