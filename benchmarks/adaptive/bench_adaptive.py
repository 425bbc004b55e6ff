"""How fast is ASAM adaptive sparse attention against SDPA flash, at what density and what error?

Attention alone, causal, written by hand (softmax(q kᵀ · scale + causal mask) v) and compiled with
backend="asam", options={"mode": "adaptive", ...}: the block selection (pooled q·k estimate, coverage,
sinks, window) is part of the compiled graph and of every timing. Side by side, one run, one device:
SDPA flash (is_causal), the same module under exact backend="asam" (SDPA), and adaptive at each coverage.
Error: relative Frobenius error against SDPA in float32 (the float32 result stands in for exact; the bf16
flash error against it is printed alongside as the floor). Density: kept / causal key blocks.

Inputs (--inputs):
  planted  every query block of every head attends strongly to `--hits` random earlier key blocks
           (concentrated attention, as real deep layers show; random q/k alone give uniform attention)
  random   plain Gaussian q, k, v: diffuse attention, the worst case (heads fall back to dense)
--fallbacks: the dense_fallback values to time ("measured", the default: per head SDPA or adaptive by measured
density, Note [Dispatch by measured density]; "none": all heads in one in-graph Flex call; "per_call": a host sync
per call, Note [Adaptive attention op]). For "measured" the `split` column lists the heads that run sparse.
--mask padding / window: the same attention under a structured mask that asam turns into a Flex block mask, with
the adaptive selection inside it (Note [Adaptive over a structured mask]): "padding" is a batch of two, the second
row left-padded by --pad tokens (a key padding vector read at run time, as HF builds it); "window" a causal sliding
window of --window-tokens. The baseline is then SDPA with the boolean mask (flash takes no mask), the error is
measured on the unpadded query rows, and the density is kept / allowed blocks of the mask.
--train times forward + backward (of a fixed random output gradient) instead of the forward alone; the error
column is then the relative error of the q gradient against float32 SDPA's.
  FILE.pt  a dict {"q", "k", "v"} of (B, H, L, D) tensors saved from a real model (see --help of
           benchmarks/tools/dump_qkv.py); lengths are cut to each --seqs entry

    python benchmarks/adaptive/bench_adaptive.py --seqs 16384 32768 65536 --json adaptive.json
    python benchmarks/adaptive/bench_adaptive.py --device cpu --dtype float32 --seqs 1024 --heads 2 --dim 32
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from asam_compile.measure import header_line, run_header, time_ms
from asam_compile.models import CausalAttention, planted_qkv


def make_inputs(args, L, device, dtype):
    B = 2 if getattr(args, "mask", "causal") == "padding" else 1
    if args.inputs == "random":
        g = torch.Generator(device=device).manual_seed(0)
        return tuple(torch.randn(B, args.heads, L, args.dim, generator=g, device=device, dtype=dtype) for _ in range(3))
    if args.inputs == "planted":
        return planted_qkv(B, args.heads, L, args.dim, args.hits, device, dtype, logit=args.logit)
    saved = torch.load(args.inputs)
    q, k, v = (saved[n][..., :L, :].to(device, dtype) for n in ("q", "k", "v"))
    if k.shape[1] != q.shape[1]:  # grouped-query heads: the hand-written module takes them repeated
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    return q.contiguous(), k.contiguous(), v.contiguous()


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


class MaskedCausal(nn.Module):
    """Hand-written causal attention under a key padding vector ("padding", read at run time) or a sliding window
    ("window", shapes only), masked with the dtype's minimum as HF does (padded query rows stay finite)."""

    def __init__(self, kind: str, window: int) -> None:
        super().__init__()
        self.kind, self.window = kind, window

    def mask(self, keep, L, S):
        i, j = torch.arange(L, device=keep.device)[:, None], torch.arange(S, device=keep.device)[None, :]
        mask = (j <= i)[None, None]
        return mask & keep[:, None, None, :] if self.kind == "padding" else mask & (i - j < self.window)

    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        s = s.masked_fill(~self.mask(keep, q.shape[-2], k.shape[-2]), torch.finfo(s.dtype).min)
        return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def mask_blocks(mask, bs):
    """(allowed, partial) (B, 1, QB, KB) block sets of a bool (B, 1, L, S) mask."""
    L, S = mask.shape[-2:]
    QB, KB = -(-L // bs), -(-S // bs)
    counts = F.pad(mask.int(), (0, KB * bs - S, 0, QB * bs - L)).view(*mask.shape[:2], QB, bs, KB, bs).sum((3, 5))
    return counts > 0, (counts > 0) & (counts < bs * bs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--inputs", default="planted", help="planted, random, or saved q/k/v files (see above)")
    p.add_argument("--hits", type=int, default=4, help="planted key blocks per query block and head")
    p.add_argument("--logit", type=float, default=8.0, help="how much a planted block raises its logits")
    p.add_argument("--coverages", type=float, nargs="+", default=[0.9, 0.95])
    p.add_argument("--max-density", type=float, default=0.5)
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--sinks", type=int, default=1)
    p.add_argument("--fallbacks", nargs="+", default=["measured"], choices=["measured", "none", "per_call"],
                   help="dense_fallback values to time (see above)")
    p.add_argument("--train", action="store_true", help="time forward + backward")
    p.add_argument("--mask", default="causal", choices=["causal", "padding", "window"])
    p.add_argument("--pad", type=int, default=1000, help="--mask padding: left padding of the second row")
    p.add_argument("--window-tokens", type=int, default=4096, help="--mask window: the window in tokens")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", default="")
    args = p.parse_args()

    import asam_compile
    from asam_compile.config import SparseSettings
    from asam_compile.kernels import dispatch
    from asam_compile.kernels.selection import block_density, select_blocks
    from tabulate import tabulate

    dev, dtype = args.device, getattr(torch, args.dtype)
    header = run_header(
        dev, inputs=args.inputs, heads=args.heads, dim=args.dim, dtype=args.dtype, train=args.train, mask=args.mask,
        pad=args.pad if args.mask == "padding" else None,
        window_tokens=args.window_tokens if args.mask == "window" else None)
    print(header_line(header), flush=True)
    rows = []
    model = CausalAttention() if args.mask == "causal" else MaskedCausal(args.mask, args.window_tokens)
    for L in args.seqs:
        t0 = time.time()
        q, k, v = make_inputs(args, L, dev, dtype)
        header["heads"], header["dim"] = q.shape[1], q.shape[-1]
        keep = torch.ones(q.shape[0], L, dtype=torch.bool, device=dev)  # valid keys and queries
        if args.mask == "padding":
            keep[1, :args.pad] = False
        extra = () if args.mask == "causal" else (keep,)
        dense_mask = None if args.mask == "causal" else model.mask(keep, L, L)
        grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dev, dtype) if args.train else None
        if args.train:
            q, k, v = (x.requires_grad_() for x in (q, k, v))

        def result(fn, inputs):
            """fn's output (forward) or the q gradient (--train) on `inputs`."""
            out = fn(*inputs, *extra)
            if not args.train:
                return out.transpose(1, 2)[keep]  # the valid query rows (all of them unless padded)
            return torch.autograd.grad(out, inputs[0], grad.to(out.dtype))[0].transpose(1, 2)[keep]

        def step(fn):
            """One timed call: forward, or forward + backward."""
            if not args.train:
                with torch.no_grad():
                    return fn(q, k, v, *extra)
            return torch.autograd.grad(fn(q, k, v, *extra), (q, k, v), grad)

        def sdpa(a, b, c, *_):
            if dense_mask is None:
                return F.scaled_dot_product_attention(a, b, c, is_causal=True)
            return F.scaled_dot_product_attention(a, b, c, attn_mask=dense_mask)

        with torch.no_grad() if not args.train else torch.enable_grad():
            q32, k32, v32 = (x.detach().float().requires_grad_(args.train) for x in (q, k, v))
            exact32 = result(sdpa, (q32, k32, v32)).detach()
            del q32, k32, v32
            floor = rel_err(result(sdpa, (q, k, v)), exact32)
        ms_flash = time_ms(lambda: step(sdpa), dev, args.iters)
        base = "sdpa-flash" if dense_mask is None else "sdpa-mask"  # SDPA with a boolean mask: no flash
        rows.append({"seq": L, "mode": base, "ms": ms_flash, "density": 1.0, "rel_err": floor, "fired": "-"})
        runs = [("asam-exact", {})] + [
            (f"adaptive[{fb}] c={c}",
             {"mode": "adaptive", "coverage": c, "max_density": args.max_density, "window": args.window,
              "sinks": args.sinks, "min_seq_len": 0, "dense_fallback": fb})
            for c in args.coverages for fb in args.fallbacks
        ]
        for name, opts in runs:
            torch._dynamo.reset()
            fn = torch.compile(model, backend="asam", options=opts)
            with torch.no_grad() if not args.train else torch.enable_grad(), asam_compile.capture() as cap:
                t = time.time()
                out = result(fn, (q, k, v)).detach()
                if dev == "cuda":
                    torch.cuda.synchronize()
                compile_s = time.time() - t
            fired = ",".join(c.target or "refused" for c in cap.report.candidates)
            density = 1.0
            if "coverage" in opts:
                st = SparseSettings(128, opts["coverage"], opts["max_density"], 0, opts["window"], opts["sinks"])
                blocks = valid = None
                if dense_mask is not None:  # as adaptive_masked_call selects
                    blocks, diag = mask_blocks(dense_mask, 128), dense_mask.diagonal(dim1=-2, dim2=-1)
                    valid = (diag, diag)
                kept, _, allowed = select_blocks(q.detach(), k.detach(), scale=q.shape[-1] ** -0.5, causal=True,
                                                 settings=st, blocks=blocks, valid=valid)
                density = block_density(kept, allowed)
                del kept, allowed
            ms = time_ms(lambda: step(fn), dev, args.iters)
            split = ""
            if opts.get("dense_fallback") == "measured":  # after the timed calls: the split they ran
                for site in dispatch.decisions().values():
                    split += ";".join(f"{b}: sparse {d['sparse']} of {[round(x, 2) for x in d['density']]}"
                                      for b, d in site.items())
                dispatch.reset()
            rows.append({"seq": L, "mode": name, "ms": ms, "density": density, "rel_err": rel_err(out, exact32),
                         "fired": fired, "compile_s": compile_s, "split": split})
            del out
        for r in rows:
            if r["seq"] == L:
                r[f"speedup_vs_{base}"] = ms_flash / r["ms"]
        print(f"L={L} done in {time.time() - t0:.0f} s", flush=True)
        print(tabulate([r for r in rows if r["seq"] == L], headers="keys", floatfmt=".4g"), flush=True)
        if args.json:  # after every length: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"header": header, "rows": rows}, f, indent=2)
        q = k = v = exact32 = dense_mask = None  # free the device memory before the next length
        if dev == "cuda":
            torch.cuda.empty_cache()
    print(tabulate(rows, headers="keys", floatfmt=".4g"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
