"""Where does the time of one asam::adaptive_attention call go? Its steps timed one by one on the same input.

    select       the block selection (compiled on CUDA), without and with the host sync that reads how many
                 (batch, head) pairs go exact
    mask         BlockMask.from_kv_blocks and the index tensors, from a given selection
    flex         compiled flex_attention on that BlockMask alone
    op           the whole op; sdpa: SDPA flash (is_causal) on the same q, k, v
Then a torch.profiler table of a few op calls (CPU and device time per kernel and Python op).
--in-graph profiles the default path instead: the hand-written module compiled with backend="asam" in adaptive
mode (selection, block mask and Flex in one Inductor graph), its kernels sorted by device time.

    python benchmarks/adaptive/profile_adaptive.py --inputs planted --seq 16384
    python benchmarks/adaptive/profile_adaptive.py --inputs qkv/smollm2_L8192_layer14.pt --seq 8192
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from asam_compile.measure import header_line, run_header, time_ms
from bench_adaptive import make_inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", default="planted")
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--hits", type=int, default=4)
    p.add_argument("--logit", type=float, default=8.0)
    p.add_argument("--coverage", type=float, default=0.995)
    p.add_argument("--max-density", type=float, default=0.5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--in-graph", action="store_true", help="profile the in-graph default path, not the op")
    args = p.parse_args()

    from torch.nn.attention.flex_attention import BlockMask

    from asam_compile.kernels import adaptive, selection

    dev, dtype = args.device, getattr(torch, args.dtype)
    print(header_line(run_header(dev, inputs=args.inputs, seq=args.seq, dtype=args.dtype, coverage=args.coverage,
                                 max_density=args.max_density)), flush=True)
    q, k, v = make_inputs(args, args.seq, dev, dtype)
    scale = q.shape[-1] ** -0.5
    st = selection.SparseSettings(128, args.coverage, args.max_density, 0, 2, 1)
    select = adaptive.compiled("select", q.device.type)
    flex = adaptive.compiled("flex", q.device.type)
    kept, partial, allowed, dense = select(q, k, scale, True, st)
    sparse = kept & ~dense[..., None, None]

    def build():
        return BlockMask.from_kv_blocks(*selection.block_tables(sparse & partial), *selection.block_tables(sparse & ~partial),
                                        BLOCK_SIZE=128, mask_mod=selection.causal_mask_mod, seq_lengths=(q.shape[2], k.shape[2]),
                                        compute_q_blocks=False)

    bm = build()
    if args.in_graph:
        return in_graph(args, q, k, v, dev, {
            "select": time_ms(lambda: select(q, k, scale, True, st), dev, args.iters),
            "mask": time_ms(build, dev, args.iters),
            "flex": time_ms(lambda: flex(q, k, v, block_mask=bm, scale=scale), dev, args.iters),
            "sdpa": time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale), dev,
                            args.iters),
        }, selection.block_density(kept, allowed.expand_as(kept)))
    op = torch.ops.asam.adaptive_attention
    rows = {
        "select": time_ms(lambda: select(q, k, scale, True, st), dev, args.iters),
        "select+sync": time_ms(lambda: int(select(q, k, scale, True, st)[3].sum()), dev, args.iters),
        "mask": time_ms(build, dev, args.iters),
        "flex": time_ms(lambda: flex(q, k, v, block_mask=bm, scale=scale), dev, args.iters),
        "op": time_ms(lambda: op(q, k, v, scale, True, 128, args.coverage, args.max_density, 2, 1), dev, args.iters),
        "sdpa": time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale), dev, args.iters),
    }
    print({"inputs": args.inputs, "seq": args.seq, "dense_pairs": int(dense.sum()), "pairs": dense.numel(),
           "density": selection.block_density(kept, allowed.expand_as(kept))}, flush=True)
    for name, ms in rows.items():
        print(f"{name:12s} {ms:8.3f} ms", flush=True)
    with torch.profiler.profile() as prof:
        for _ in range(5):
            op(q, k, v, scale, True, 128, args.coverage, args.max_density, 2, 1)
        if dev == "cuda":
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)


def in_graph(args, q, k, v, dev, rows, density) -> None:
    """Time and profile the compiled module (the default in-graph path) next to its parts timed alone."""
    import asam_compile
    from asam_compile.models import CausalAttention

    opts = {"mode": "adaptive", "coverage": args.coverage, "max_density": args.max_density, "min_seq_len": 0}
    fn = torch.compile(CausalAttention(), backend="asam", options=opts)
    with torch.no_grad(), asam_compile.capture() as cap:
        fn(q, k, v)
        rows["in-graph"] = time_ms(lambda: fn(q, k, v), dev, args.iters)
        print({"inputs": args.inputs, "seq": args.seq, "density": density,
               "fired": [c.target for c in cap.report.candidates]}, flush=True)
        for name, ms in rows.items():
            print(f"{name:12s} {ms:8.3f} ms", flush=True)
        with torch.profiler.profile() as prof:
            for _ in range(5):
                fn(q, k, v)
            if dev == "cuda":
                torch.cuda.synchronize()
    key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=90), flush=True)


if __name__ == "__main__":
    main()
