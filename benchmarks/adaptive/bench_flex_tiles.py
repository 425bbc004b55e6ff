"""Does a FlexAttention kernel option make the adaptive mode's sparse Flex call faster on this GPU?

On planted concentrated q, k, v (H=16, D=128, bf16, causal), the block set that asam's adaptive selection keeps
(coverage --coverage) becomes one BlockMask; flex_attention is then compiled once per kernel_options setting
and timed on it, next to SDPA flash. Each setting's output is checked against the default setting's.

    python benchmarks/adaptive/bench_flex_tiles.py --seq 16384 --json tiles.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from asam_compile.measure import header_line, run_header, time_ms

SETTINGS = {
    "default": {},
    "rows_safe": {"ROWS_GUARANTEED_SAFE": True},
    "rows_safe+prescale": {"ROWS_GUARANTEED_SAFE": True, "PRESCALE_QK": True},
    "tma": {"USE_TMA": True},
    "tma+rows_safe": {"USE_TMA": True, "ROWS_GUARANTEED_SAFE": True},
    "128x128 w8 s2": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "64x128 w4 s3": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--coverage", type=float, default=0.995)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", default="")
    args = p.parse_args()

    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from asam_compile.kernels import selection
    from asam_compile.models import planted_qkv

    dev, dtype, L = args.device, getattr(torch, args.dtype), args.seq
    q, k, v = planted_qkv(1, args.heads, L, args.dim, 4, dev, dtype)
    scale = args.dim ** -0.5
    st = selection.SparseSettings(128, args.coverage, 0.5, 0, 2, 1)
    with torch.no_grad():
        kept, partial, allowed = selection.select_blocks(q, k, scale=scale, causal=True, settings=st)
        bm = BlockMask.from_kv_blocks(*selection.block_tables(kept & partial), *selection.block_tables(kept & ~partial),
                                      BLOCK_SIZE=128, mask_mod=selection.causal_mask_mod, seq_lengths=(L, L),
                                      compute_q_blocks=False)
    result = {"header": run_header(dev, seq=L, heads=args.heads, dim=args.dim, coverage=args.coverage,
                                   density=selection.block_density(kept, allowed)),
              "sdpa_ms": time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), dev, args.iters),
              "rows": []}
    print(header_line(result["header"]), flush=True)
    print("sdpa", result["sdpa_ms"], flush=True)
    ref = None
    for name in args.settings:
        row = {"setting": name, "kernel_options": SETTINGS[name]}
        try:
            torch._dynamo.reset()
            fn = torch.compile(flex_attention)
            with torch.no_grad():
                out = fn(q, k, v, block_mask=bm, scale=scale, kernel_options=dict(SETTINGS[name]))
                ref = out if ref is None else ref
                row["max_diff_vs_first"] = float((out.float() - ref.float()).abs().max())
                row["ms"] = time_ms(lambda: fn(q, k, v, block_mask=bm, scale=scale,
                                               kernel_options=dict(SETTINGS[name])), dev, args.iters)
                row["speedup_vs_sdpa"] = result["sdpa_ms"] / row["ms"]
        except Exception as e:  # a setting this GPU or torch cannot compile: recorded, the sweep goes on
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(row, flush=True)
        result["rows"].append(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
