"""Is the Triton block-sparse forward as fast as SDPA flash when dense, proportional to density when sparse, and
faster than FlexAttention on the same block lists?

For each L in --seqs, D in --dims, heads H/Hkv in --heads, causal, bf16, B=1, and each density in --densities:
random kept key blocks per (kv head, query block) of 128, always block 0 and the diagonal block, `density` of
the causally allowed blocks in all. Timed (CUDA events, median of --iters after warm-up):
  sdpa    SDPA under sdpa_kernel(FLASH_ATTENTION), density 1 only (the backend that ran is named per row)
  flex    compiled flex_attention, BlockMask.from_kv_blocks of the same lists (expanded to the query heads):
          the diagonal block partial with a causal mask_mod, the other kept blocks full
  triton  asam_compile.kernels.triton_block_sparse.block_sparse_attention, per kv head lists
The kernel's output is checked against Flex's (max abs error) before timing.

    python benchmarks/adaptive/bench_triton_kernel.py                       # the whole grid (a few minutes)
    python benchmarks/adaptive/bench_triton_kernel.py --sweep               # launch configs of the kernel per D
    python benchmarks/adaptive/bench_triton_kernel.py --seqs 8192 --dims 128 --heads 16/16
JSON goes to --json, or to $OUT/bench_triton_kernel.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from asam_compile.kernels import triton_block_sparse as tbs  # noqa: E402
from asam_compile.measure import describe_error, free, header_line, run_header, time_ms  # noqa: E402

BLOCK = 128
# --sweep: (block_m, block_n, num_warps, num_stages[, mask_always]) tried per head dim
SWEEP = {
    64: [(128, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 4, 4)],
    128: [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3, True)],
    256: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 128, 4, 2)],
}


def causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def random_keep(Hkv: int, QB: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """bool (1, Hkv, QB, QB): in row m, block 0, block m and round(density * (m + 1)) - 2 more of blocks 1..m-1."""
    m = torch.arange(QB)
    allowed = m[None, :] <= m[:, None]
    n_keep = torch.clamp(torch.round(density * (m + 1)), min=torch.clamp(m + 1, max=2)).long()
    score = torch.rand(1, Hkv, QB, QB, generator=gen)
    score[..., 0] = 2.0
    score[..., m, m] = 2.0
    score = score.masked_fill(~allowed, -1.0)
    rank = score.argsort(-1, descending=True).argsort(-1)
    return (rank < n_keep[:, None]) & allowed


def flex_block_mask(keep: torch.Tensor, G: int, L: int, device: str):
    from torch.nn.attention.flex_attention import BlockMask

    QB = keep.shape[-2]
    diag = torch.eye(QB, dtype=torch.bool).expand_as(keep)
    partial = tbs.block_tables(diag.repeat_interleave(G, dim=1))
    full = tbs.block_tables((keep & ~diag).repeat_interleave(G, dim=1))
    tables = [t.to(device) for t in (*partial, *full)]
    return BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=BLOCK, mask_mod=causal_mask_mod, seq_lengths=(L, L))


def sdpa_runner(q, k, v, G):
    """(name, fn) of the first SDPA backend that runs this shape: flash first, as the question asks."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kw = {"is_causal": True, "enable_gqa": G > 1}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def fn(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, **kw)
        try:
            out = fn()
            torch.cuda.synchronize()
            return backend.name.lower(), fn, out
        except RuntimeError:
            continue
    return "none", None, None


def pairs(keep: torch.Tensor) -> int:
    """Query-key pairs computed by the kept blocks (the diagonal block counted as its causal half)."""
    QB = keep.shape[-1]
    diag = int(keep[..., torch.arange(QB), torch.arange(QB)].sum())
    return (int(keep.sum()) - diag) * BLOCK * BLOCK + diag * BLOCK * (BLOCK + 1) // 2


def run_grid(args, flex) -> list[dict]:
    rows, gen = [], torch.Generator().manual_seed(0)
    for D in args.dims:
        for heads in args.heads:
            H, Hkv = (int(x) for x in heads.split("/"))
            for L in args.seqs:
                rows += run_shape(args, flex, gen, L, D, H, Hkv)
                free("cuda")
    return rows


def run_shape(args, flex, gen, L: int, D: int, H: int, Hkv: int) -> list[dict]:
    """The rows of one shape, one per density (SDPA timed once, beside density 1)."""
    rows, G = [], H // Hkv
    q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scale, QB = D ** -0.5, L // BLOCK
    sdpa_name, sdpa_fn, sdpa_out = sdpa_runner(q, k, v, G)
    sdpa_ms = time_ms(sdpa_fn, "cuda", args.iters, args.warmup) if sdpa_fn else float("nan")
    dense_ms = None
    for density in args.densities:
        keep = random_keep(Hkv, QB, density, gen)
        num, idx = (t.cuda() for t in tbs.block_tables(keep))
        row = {"L": L, "D": D, "H": H, "Hkv": Hkv, "density": density,
               "kept": round(float(keep.sum()) / (Hkv * QB * (QB + 1) / 2), 4)}
        flops = 4 * D * G * pairs(keep)  # each query head runs its kv head's list
        bm = flex_block_mask(keep, G, L, "cuda")

        def mine():
            return tbs.block_sparse_attention(q, k, v, num, idx, scale=scale, causal=True)

        def theirs():
            return flex(q, k, v, block_mask=bm, scale=scale, enable_gqa=G > 1)

        try:
            out = mine()
            row["triton_ms"] = time_ms(mine, "cuda", args.iters, args.warmup)
            row["triton_tflops"] = round(flops / row["triton_ms"] / 1e9, 1)
        except Exception as err:  # noqa: BLE001 - a row that says so, and the grid goes on
            out, row["triton_error"] = None, describe_error(err)
        try:
            ref = theirs()
            row["flex_ms"] = time_ms(theirs, "cuda", args.iters, args.warmup)
            if out is not None:
                row["err_vs_flex"] = float((out.float() - ref.float()).abs().max())
        except Exception as err:  # noqa: BLE001
            row["flex_error"] = describe_error(err)
        if density == 1.0:
            row["sdpa"], row["sdpa_ms"] = sdpa_name, sdpa_ms
            if out is not None and sdpa_out is not None:
                row["err_vs_sdpa"] = float((out.float() - sdpa_out.float()).abs().max())
            dense_ms = row.get("triton_ms")
        if dense_ms and "triton_ms" in row:
            row["time_vs_dense"] = round(row["triton_ms"] / dense_ms, 3)
        rows.append(row)
        print(summary(row), flush=True)
    return rows


def launch_floor(args) -> dict:
    """The kernel's time where the GPU has next to nothing to do (every row keeps no block): the host-side
    cost of one call; and the smallest grid shape at density 0.1 timed by CUDA-graph replay (no host cost)."""
    H, Hkv, L, D = 4, 1, min(args.seqs), 64
    q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    QB = L // BLOCK
    empty = [t.cuda() for t in tbs.block_tables(torch.zeros(1, Hkv, QB, QB, dtype=torch.bool))]
    sparse = [t.cuda() for t in tbs.block_tables(random_keep(Hkv, QB, 0.1, torch.Generator().manual_seed(1)))]
    call = lambda tables: tbs.block_sparse_attention(q, k, v, *tables, scale=D ** -0.5, causal=True)  # noqa: E731
    row = {"L": L, "D": D, "H": H, "Hkv": Hkv, "empty_ms": time_ms(lambda: call(empty), "cuda", args.iters,
                                                                   args.warmup),
           "density_0.1_ms": time_ms(lambda: call(sparse), "cuda", args.iters, args.warmup)}
    call(sparse)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(sparse)
    row["density_0.1_graph_ms"] = time_ms(graph.replay, "cuda", args.iters, args.warmup)
    return row


def run_sweep(args) -> list[dict]:
    rows, gen = [], torch.Generator().manual_seed(0)
    H, Hkv = (int(x) for x in args.sweep_heads.split("/"))
    L = args.sweep_seq
    for D in args.dims:
        q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        name, sdpa_fn, ref = sdpa_runner(q, k, v, H // Hkv)
        sdpa_ms = time_ms(sdpa_fn, "cuda", args.iters, args.warmup) if sdpa_fn else float("nan")
        tables = {d: [t.cuda() for t in tbs.block_tables(random_keep(Hkv, L // BLOCK, d, gen))] for d in (1.0, 0.25)}
        for cfg in SWEEP[D]:
            config = tbs.KernelConfig(*cfg)
            row = {"L": L, "D": D, "H": H, "Hkv": Hkv, "config": str(cfg), "sdpa": name, "sdpa_ms": sdpa_ms}
            for d, (num, idx) in tables.items():
                fn = lambda: tbs.block_sparse_attention(q, k, v, num, idx, scale=D ** -0.5, causal=True,  # noqa: E731
                                                        config=config)
                try:
                    out = fn()
                    if d == 1.0 and ref is not None:
                        row["err_vs_sdpa"] = float((out.float() - ref.float()).abs().max())
                    row[f"ms@{d}"] = time_ms(fn, "cuda", args.iters, args.warmup)
                except Exception as err:  # noqa: BLE001
                    row[f"error@{d}"] = describe_error(err)
            if "ms@1.0" in row:
                row["vs_sdpa"] = round(sdpa_ms / row["ms@1.0"], 3)
            rows.append(row)
            print(row, flush=True)
        free("cuda")
    return rows


def summary(row: dict) -> str:
    keys = ("L", "D", "H", "Hkv", "density", "triton_ms", "flex_ms", "sdpa_ms", "err_vs_flex",
            "triton_error", "flex_error")
    return " ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys if k in row)


def table(rows: list[dict]) -> str:
    from tabulate import tabulate

    out = []
    for r in rows:
        t, f, s = r.get("triton_ms"), r.get("flex_ms"), r.get("sdpa_ms")
        out.append([r["L"], r["D"], f"{r['H']}/{r['Hkv']}", r["density"], r["kept"],
                    f"{s:.3f} ({r['sdpa']})" if s is not None else "",
                    f"{f:.3f}" if f else r.get("flex_error", "")[:40],
                    f"{t:.3f}" if t else r.get("triton_error", "")[:40],
                    r.get("triton_tflops", ""),
                    f"{s / t:.2f}" if s and t else "", f"{f / t:.2f}" if f and t else "",
                    r.get("time_vs_dense", ""), f"{r['err_vs_flex']:.1e}" if "err_vs_flex" in r else ""])
    return tabulate(out, headers=["L", "D", "H/Hkv", "density", "kept", "sdpa ms", "flex ms", "triton ms",
                                  "TFLOP/s", "sdpa/triton", "flex/triton", "t / t(dense)", "max|triton-flex|"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--heads", nargs="+", default=["4/1", "16/16"], help="H/Hkv pairs")
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sweep", action="store_true", help="time the launch configs of SWEEP instead of the grid")
    p.add_argument("--sweep-seq", type=int, default=16384)
    p.add_argument("--sweep-heads", default="16/16")
    p.add_argument("--json", default="")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_triton_kernel needs CUDA")
    if sorted(args.densities, reverse=True)[0] != 1.0:
        args.densities = [1.0, *args.densities]
    import triton
    from torch.nn.attention.flex_attention import flex_attention

    header = run_header("cuda", workload="block-sparse forward: triton vs flex vs sdpa, causal bf16 B=1 block 128",
                        triton=triton.__version__, capability=".".join(map(str, torch.cuda.get_device_capability())))
    print(header_line(header), flush=True)
    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    flex = torch.compile(flex_attention, dynamic=False)
    rows = run_sweep(args) if args.sweep else run_grid(args, flex)
    floor = None
    if not args.sweep:
        print(table(rows))
        floor = launch_floor(args)
        print("launch floor (H=4/Hkv=1 D=64, triton):", {k: round(v, 4) for k, v in floor.items()})
    path = args.json or (os.path.join(os.environ["OUT"], "bench_triton_kernel" + ("_sweep" if args.sweep else "")
                                      + ".json") if os.environ.get("OUT") else "")
    if path:
        with open(path, "w") as f:
            json.dump({"header": header, "rows": rows, "launch_floor": floor}, f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
