"""Does backend="asam" turn a hand-written sliding-window attention into a Flex block-sparse kernel that runs
as fast as hand-written Flex, without ever materialising the L x L mask?

Attention alone (B=1, H=16, D=128, bf16, window 1024), written the way HF transformers' eager Mistral path
writes it (aranges of query/key positions, `kv <= q & kv > q - W`, `where(mask, 0, finfo.min)`, added to
the scores). Side by side, one run, one device: the module under plain torch.compile, under
backend="asam", the hand edit to SDPA with the dense window mask, hand-written Flex with a compiled
create_block_mask, and SDPA flash with plain causal attention (what a dense kernel costs at that length).

    python benchmarks/exact/bench_swa.py --seqs 16384 32768 65536 --json swa.json
    python benchmarks/exact/bench_swa.py --device cpu --seqs 512 --heads 2 --dim 16 --window 64 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from asam_compile.measure import header_line, run_header, time_ms


class EagerSlidingWindowAttention(nn.Module):
    """softmax(q kᵀ · scale + window mask) v, with the mask built from index arithmetic as HF does."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        L, S = q.shape[-2], k.shape[-2]
        q_idx = torch.arange(L, device=q.device)[None, None, :, None]
        kv_idx = torch.arange(S, device=q.device)[None, None, None, :]
        keep = (kv_idx <= q_idx) & (kv_idx > q_idx - self.window)
        mask = torch.where(keep, torch.tensor(0.0, device=q.device), torch.finfo(q.dtype).min)
        scores = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5) + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)


def sdpa_dense_mask(q, k, v, window):
    L = q.shape[-2]
    i = torch.arange(L, device=q.device)
    keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--modes", default="inductor,asam,sdpa-dense-mask,flex-handwritten,sdpa-causal-flash")
    p.add_argument("--max-ref-len", type=int, default=16384, help="longest length checked against float64")
    p.add_argument("--json", default="")
    args = p.parse_args()

    import asam_compile
    from tabulate import tabulate
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev, dtype, W = args.device, getattr(torch, args.dtype), args.window
    header = run_header(dev, workload=f"attention alone B=1 H={args.heads} D={args.dim} {args.dtype} sliding window {W}")
    print(header_line(header), flush=True)
    module = EagerSlidingWindowAttention(W)
    flex_c = torch.compile(flex_attention)
    cbm = torch.compile(create_block_mask)

    def window_mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - W)

    window_mask.__name__ = f"sliding_window_{W}"
    rows = []
    for L in args.seqs:
        torch.manual_seed(L)
        q, k, v = (torch.randn(1, args.heads, L, args.dim, device=dev, dtype=dtype) for _ in range(3))
        ref = None
        if L <= args.max_ref_len:
            with torch.no_grad():
                ref = sdpa_dense_mask(q.double() if dev == "cpu" else q.float(), k.double() if dev == "cpu" else k.float(),
                                      v.double() if dev == "cpu" else v.float(), W).float()
        for mode in args.modes.split(","):
            torch._dynamo.reset()
            if dev == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            fired, kernel = "-", "-"
            try:
                if mode == "inductor":
                    fn = torch.compile(module)
                elif mode == "asam":
                    fn = torch.compile(module, backend="asam")
                elif mode == "sdpa-dense-mask":
                    fn = lambda q, k, v: sdpa_dense_mask(q, k, v, W)  # noqa: E731
                elif mode == "flex-handwritten":
                    bm = cbm(window_mask, None, None, L, L, device=dev)
                    fn = lambda q, k, v: flex_c(q, k, v, block_mask=bm)  # noqa: E731
                elif mode == "sdpa-causal-flash":
                    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
                else:
                    raise SystemExit(f"unknown mode {mode}")
                with torch.no_grad(), asam_compile.capture() as cap:
                    t0 = time.perf_counter()
                    out = fn(q, k, v)
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                if mode == "asam":
                    fired = f"{cap.n_rewritten}/{len(cap.report.candidates)}"
                    kernel = ", ".join(f"{c.target} {c.info.get('mask')} d={c.info.get('density', '-')}" for c in cap.report.rewritten) or "-"
                err = (out.float() - ref).abs().max().item() if ref is not None and mode != "sdpa-causal-flash" else float("nan")
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                with torch.no_grad():
                    ms = time_ms(lambda: fn(q, k, v), dev, args.iters)
                peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
                rows.append(dict(seq=L, mode=mode, ms=ms, compile_s=first, max_err=err, peak_gib=peak, rewritten=fired, kernel=kernel))
            except Exception as e:  # noqa: BLE001 - a failing configuration is a row; the sweep goes on
                rows.append(dict(seq=L, mode=mode, ms=float("nan"), compile_s=float("nan"), max_err=float("nan"), peak_gib=float("nan"),
                                 rewritten=fired, kernel=f"error: {type(e).__name__}: {str(e)[:100]}"))
            print(rows[-1], flush=True)
            fn = None
    for L in args.seqs:
        flash = next((r["ms"] for r in rows if r["seq"] == L and r["mode"] == "sdpa-causal-flash"), float("nan"))
        flex = next((r["ms"] for r in rows if r["seq"] == L and r["mode"] == "flex-handwritten"), float("nan"))
        for r in rows:
            if r["seq"] == L:
                r["x_vs_dense_flash"] = flash / r["ms"] if r["ms"] == r["ms"] else float("nan")
                r["vs_handwritten_flex"] = r["ms"] / flex if r["ms"] == r["ms"] else float("nan")
    print(header_line(header))
    print(tabulate([[r["seq"], r["mode"], f"{r['ms']:.3f}", f"{r['x_vs_dense_flash']:.2f}x", f"{r['vs_handwritten_flex']:.2f}",
                     f"{r['compile_s']:.1f}", f"{r['max_err']:.3g}", f"{r['peak_gib']:.2f}", r["rewritten"], r["kernel"]] for r in rows],
                   headers=["seq", "mode", "ms", "speed-up vs dense causal flash", "time / hand-written Flex", "first call s",
                            "max err vs ref", "peak GiB", "asam rewritten", "asam kernel"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
