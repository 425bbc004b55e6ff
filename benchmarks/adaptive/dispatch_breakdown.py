"""Where does the time of one adaptive dispatch call go? (issue 16; Note [Dispatch by measured density])

On one saved layer (benchmarks/adaptive/gemma3_qkv.py) or planted inputs: SDPA with each backend (the default
choice, flash only, cuDNN only; K/V repeated to the query heads and with enable_gqa), the Triton block-sparse
kernel at density 1 and on the selection's kept blocks, Flex on the same blocks, the selection alone, the block
tables alone, the dispatch's compiled Triton path (selection, tables and kernel in one graph) with every head
dense and with every head sparse, and asam::adaptive_dispatch in its steady state. Each row: median of --iters calls (CUDA events).

    python benchmarks/adaptive/dispatch_breakdown.py --inputs benchmarks/data_local/gemma3_qkv_16k/gemma3_L16384_layer11.pt
    python benchmarks/adaptive/dispatch_breakdown.py --inputs planted --seq 65536 --heads 16 --dim 128
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from asam_compile.measure import header_line, run_header, time_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", required=True, help="a saved {'q','k','v'} file, or 'planted' (models.planted_qkv)")
    p.add_argument("--heads", type=int, default=16, help="planted: query heads (one kv head per query head)")
    p.add_argument("--dim", type=int, default=128, help="planted: head dim")
    p.add_argument("--hits", type=int, default=4, help="planted: key blocks each query block attends to")
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--coverage", type=float, default=0.9)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default="")
    args = p.parse_args()

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import BlockMask

    from asam_compile.config import SparseSettings
    from asam_compile.kernels import adaptive, dispatch, selection, triton_block_sparse

    dev = "cuda"
    if args.inputs == "planted":
        from asam_compile.models import planted_qkv

        q, k, v = planted_qkv(1, args.heads, args.seq, args.dim, args.hits, dev, torch.bfloat16)
    else:
        saved = torch.load(args.inputs)
        q, k, v = (saved[n][..., :args.seq, :].to(dev, torch.bfloat16).contiguous() for n in ("q", "k", "v"))
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    kr, vr = (x.repeat_interleave(H // Hkv, 1) for x in (k, v))
    scale = D**-0.5
    header = run_header(dev, inputs=args.inputs, seq=args.seq, heads=f"{H}/{Hkv}", dim=D, coverage=args.coverage)
    print(header_line(header), flush=True)
    st = SparseSettings(coverage=args.coverage, max_density=1.0, min_seq_len=0)
    rows = []

    def row(name, fn):
        try:
            with torch.no_grad():
                ms = time_ms(fn, dev, args.iters)
        except Exception as e:  # noqa: BLE001 - a failing variant is a row
            rows.append({"what": name, "ms": None, "error": f"{type(e).__name__}: {str(e)[:120]}"})
        else:
            rows.append({"what": name, "ms": ms})
        print(rows[-1], flush=True)

    def sdpa(backend, gqa):
        def run():
            with sdpa_kernel(backend) if backend is not None else torch.no_grad():
                if gqa:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
                return F.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=scale)
        return run

    for backend, label in ((None, "default"), (SDPBackend.FLASH_ATTENTION, "flash"),
                           (SDPBackend.CUDNN_ATTENTION, "cudnn"), (SDPBackend.EFFICIENT_ATTENTION, "efficient")):
        row(f"SDPA {label}, K/V repeated", sdpa(backend, False))
        row(f"SDPA {label}, enable_gqa", sdpa(backend, True))

    select = adaptive.compiled("select", dev)
    with torch.no_grad():
        sel = select(q, k, scale=scale, causal=True, settings=st)
    kept = sel.kept
    density = selection.block_density(kept, sel.allowed.expand_as(kept))
    full = sel.allowed.expand_as(kept)
    tables_kept, tables_full = selection.block_tables(kept), selection.block_tables(full)
    row("selection (compiled select)", lambda: select(q, k, scale=scale, causal=True, settings=st))
    row("block_tables of the kept blocks", lambda: selection.block_tables(kept))
    row("Triton kernel, density 1.0", lambda: triton_block_sparse.block_sparse_attention(
        q, k, v, *tables_full, scale=scale, causal=True))
    row(f"Triton kernel, kept blocks (density {density:.2f})", lambda: triton_block_sparse.block_sparse_attention(
        q, k, v, *tables_kept, scale=scale, causal=True))
    flex = adaptive.compiled("flex", dev)
    bm = BlockMask.from_kv_blocks(*selection.block_tables(kept & sel.partial), *selection.block_tables(kept & ~sel.partial),
                                  BLOCK_SIZE=128, mask_mod=selection.causal_mask_mod, seq_lengths=(args.seq, args.seq),
                                  compute_q_blocks=False)
    row(f"Flex, kept blocks (density {density:.2f})", lambda: flex(q, k, v, block_mask=bm, scale=scale, enable_gqa=True))
    path = dispatch.compiled_triton_path()
    all_dense, none_dense = (torch.full((H,), b, device=dev) for b in (True, False))
    row("Triton path compiled (selection + tables + kernel), every head dense",
        lambda: path(q, k, v, all_dense, st, scale, True))
    row("Triton path compiled, every head on its kept blocks", lambda: path(q, k, v, none_dense, st, scale, True))
    site = dispatch.new_site("breakdown")
    op_args = (q, k, v, scale, True, site, 128, args.coverage, 1.0, 2, 1)
    with torch.no_grad():
        for _ in range(3):
            torch.ops.asam.adaptive_dispatch(*op_args)
    row("asam::adaptive_dispatch, steady state", lambda: torch.ops.asam.adaptive_dispatch(*op_args))
    rows.append({"what": "split", "decisions": dispatch.decisions()[site]})
    print(json.dumps(rows, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
