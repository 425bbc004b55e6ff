"""What does each adaptive block estimator cost on its own? (Note [Block estimators] in asam_compile/kernels/selection.py)

Times asam_compile.kernels.selection.select (the whole selection: estimate, ranking, max_density rule) for the "pooled"
and "sampled" estimators, eager and under torch.compile (as the in-graph adaptive call runs it), against SDPA
flash on the same causal q, k, v. Random bf16 inputs: the estimators' cost does not depend on the values.

    python benchmarks/adaptive/bench_estimators.py --seqs 8192 16384 --json est.json        # on a GPU
    python benchmarks/adaptive/bench_estimators.py --device cpu --seqs 2048 --heads 4       # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from asam_compile.measure import header_line, run_header, time_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="time the eager selection only")
    p.add_argument("--json", default="")
    args = p.parse_args()

    from asam_compile.kernels import selection
    from tabulate import tabulate

    dev, dtype = args.device, getattr(torch, args.dtype)
    header = run_header(dev, workload=f"H={args.heads} D={args.dim} {args.dtype} B=1 causal")
    print(header_line(header), flush=True)
    rows = []
    for L in args.seqs:
        g = torch.Generator(device=dev).manual_seed(L)
        q, k, v = (torch.randn(1, args.heads, L, args.dim, device=dev, dtype=dtype, generator=g) for _ in range(3))
        scale = args.dim**-0.5
        flash = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), dev, args.iters)
        rows.append(dict(seq=L, what="SDPA flash (causal attention itself)", ms=flash))
        for estimator in ("pooled", "sampled"):
            st = selection.SparseSettings(128, 0.95, 0.5, 0, 2, 1, estimator=estimator)
            variants = [("eager", selection.select)]
            if not args.no_compile:
                variants.append(("compiled", torch.compile(selection.select)))
            for how, fn in variants:
                t0 = time.perf_counter()
                try:
                    with torch.no_grad():
                        fn(q, k, scale=scale, causal=True, settings=st)
                        first = time.perf_counter() - t0
                        ms = time_ms(lambda fn=fn, st=st: fn(q, k, scale=scale, causal=True, settings=st), dev, args.iters)
                    rows.append(dict(seq=L, what=f"select, {estimator}, {how}", ms=ms, first_s=first))
                except Exception as e:  # noqa: BLE001 - a failing variant is a row
                    rows.append(dict(seq=L, what=f"select, {estimator}, {how}", ms=float("nan"),
                                     error=f"{type(e).__name__}: {str(e)[:160]}"))
                print(rows[-1], flush=True)
    for r in rows:
        base = next(x["ms"] for x in rows if x["seq"] == r["seq"] and x["what"].startswith("SDPA"))
        r["vs_flash"] = r["ms"] / base
    print(header_line(header))
    print(tabulate([[r["seq"], r["what"], f"{r['ms']:.3f}", f"{r['vs_flash']:.2f}", f"{r.get('first_s', 0):.1f}",
                     r.get("error", "")] for r in rows],
                   headers=["seq", "what", "ms", "x SDPA flash time", "first call s", "error"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
