"""What does each adaptive block estimator cost on its own? (Note [Block estimators] in asam_compile/kernels/selection.py)

Times asam_compile.kernels.selection.select (the whole selection: estimate, ranking, max_density rule) for each
--estimators entry, eager and under torch.compile (as the in-graph adaptive call runs it), against SDPA on the same
causal q, k, v (the default backend choice, as the exact rewrite calls it; with grouped-query inputs through
enable_gqa). With --parts, also each estimate alone, compiled: the block mass of "dual" (dual_mass) and of its
two halves, and of "sampled" (sampled_mass) in float32 (the package's) and with its matmul in bf16. The selected
density is printed per row: on real inputs it says what the estimate bought; the timings do not depend on the values.

Inputs (--inputs): "random" (bf16 Gaussian, --heads / --kv-heads / --dim), or a saved layer FILE.pt (a dict q, k,
v of (B, H, L, D), e.g. gemma3_qkv.py's benchmarks/data_local/gemma3_qkv_16k/gemma3_L16384_layer11.pt), cut to
each --seqs length.

    python benchmarks/adaptive/bench_estimators.py --device cuda --seqs 8192 16384 --parts \
        --inputs benchmarks/data_local/gemma3_qkv_16k/gemma3_L16384_layer11.pt --json est.json
    python benchmarks/adaptive/bench_estimators.py --device cpu --seqs 2048 --heads 4 --iters 3    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from asam_compile.config import ESTIMATORS

F = torch.nn.functional
from asam_compile.measure import header_line, run_header, time_ms


def make_inputs(args, L, dev, dtype):
    if args.inputs == "random":
        g = torch.Generator(device=dev).manual_seed(L)
        heads = (args.heads, args.kv_heads or args.heads, args.kv_heads or args.heads)
        return tuple(torch.randn(1, h, L, args.dim, device=dev, dtype=dtype, generator=g) for h in heads)
    saved = torch.load(args.inputs, map_location="cpu", weights_only=True)
    return tuple(saved[n][..., :L, :].to(dev, dtype).contiguous() for n in ("q", "k", "v"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--inputs", default="random", help="random, or a saved FILE.pt of q, k, v (see above)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=0, help="random inputs: key/value heads (default: --heads)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    p.add_argument("--coverage", type=float, default=0.95)
    p.add_argument("--scale", type=float, default=None, help="default D^-0.5 (Gemma-3: 256^-0.5 as well)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="time the eager selection only")
    p.add_argument("--parts", action="store_true", help="also time each estimate alone (compiled)")
    p.add_argument("--json", default="")
    args = p.parse_args()

    from asam_compile.kernels import selection
    from tabulate import tabulate

    dev, dtype = args.device, getattr(torch, args.dtype)
    header = run_header(dev, workload=f"inputs {args.inputs}, {args.dtype}, B=1 causal, coverage {args.coverage}")
    print(header_line(header), flush=True)
    rows = []
    for L in args.seqs:
        q, k, v = make_inputs(args, L, dev, dtype)
        D, gqa = q.shape[-1], k.shape[1] != q.shape[1]
        scale = args.scale or D**-0.5
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # noqa: E731
        with torch.no_grad():
            base = time_ms(sdpa, dev, args.iters)
        rows.append(dict(seq=L, what="SDPA, default backend (causal attention itself)", ms=base))
        print(rows[-1], flush=True)
        for estimator in args.estimators:
            st = selection.SparseSettings(128, args.coverage, 1.0, 0, 2, 1, estimator=estimator)
            variants = [("eager", selection.select)]
            if not args.no_compile:
                variants.append(("compiled", torch.compile(selection.select)))
            for how, fn in variants:
                t0 = time.perf_counter()
                try:
                    with torch.no_grad():
                        kept, _, allowed, _ = fn(q, k, scale=scale, causal=True, settings=st)
                        first = time.perf_counter() - t0
                        ms = time_ms(lambda fn=fn, st=st: fn(q, k, scale=scale, causal=True, settings=st), dev, args.iters)
                    rows.append(dict(seq=L, what=f"select, {estimator}, {how}", ms=ms, first_s=first,
                                     density=selection.block_density(kept, allowed.expand_as(kept))))
                except Exception as e:  # noqa: BLE001 - a failing variant is a row
                    rows.append(dict(seq=L, what=f"select, {estimator}, {how}", ms=float("nan"),
                                     error=f"{type(e).__name__}: {str(e)[:160]}"))
                print(rows[-1], flush=True)
        if args.parts:
            QB = -(-L // 128)
            allowed = torch.ones(QB, QB, dtype=torch.bool, device=dev).tril()
            parts = [("dual_mass", selection.dual_mass, {}),
                     ("pooled_q_mass (dual's mean-query half)", selection.pooled_q_mass, {}),
                     ("pooled_k_mass (dual's mean-keys half)", selection.pooled_k_mass, {}),
                     ("sampled_mass, float32", selection.sampled_mass, {}),
                     ("sampled_mass, bf16 matmul", selection.sampled_mass, {"dtype": torch.bfloat16})]
            for name, fn, kw in parts:
                compiled = torch.compile(fn)
                call = lambda compiled=compiled, kw=kw: compiled(q, k, scale, True, allowed, 128, **kw)  # noqa: E731
                t0 = time.perf_counter()
                with torch.no_grad():
                    call()
                    first = time.perf_counter() - t0
                    ms = time_ms(call, dev, args.iters)
                rows.append(dict(seq=L, what=f"estimate alone, {name}, compiled", ms=ms, first_s=first))
                print(rows[-1], flush=True)
    for r in rows:
        r["vs_sdpa"] = r["ms"] / next(x["ms"] for x in rows if x["seq"] == r["seq"] and x["what"].startswith("SDPA"))
    print(header_line(header))
    print(tabulate([[r["seq"], r["what"], f"{r['ms']:.3f}", f"{r['vs_sdpa']:.3f}", f"{r.get('first_s', 0):.1f}",
                     f"{r['density']:.3f}" if "density" in r else "", r.get("error", "")] for r in rows],
                   headers=["seq", "what", "ms", "x SDPA time", "first call s", "density", "error"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
