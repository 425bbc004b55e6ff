"""Does backend="asam" make an unmodified HF Llama (eager attention) as fast as the hand-edited SDPA model?

One run, one device: eager, plain torch.compile, backend="asam", and the same weights with
attn_implementation="sdpa" (the hand edit) eager and compiled. Prefill, batch 1 by default. Correctness of every
mode against a float64 run of the original model, checked before timing; whether the rewrite fired.

With --batch B --pad P, rows 1..B-1 of the batch are left-padded by P tokens (attention_mask 0), as a batched
generate() prefill is: HF's mask then reads the runtime attention_mask, and asam builds the Flex block mask in
the graph (Note [Runtime masks as in-graph block masks]); mode asam-dense is asam with flex="never" (SDPA with
the dense mask, what the rewrite did before).

    python benchmarks/exact/bench_llama.py --seqs 2048 8192 --json out.json      # on a GPU
    python benchmarks/exact/bench_llama.py --device cpu --layers 2 --hidden 256 --seqs 256   # a smoke run
    python benchmarks/exact/bench_llama.py --seqs 8192 --batch 2 --pad 1000 --modes inductor,asam,asam-dense,sdpa-eager,sdpa-inductor
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from asam_compile.measure import header_line, run_header, time_ms


def build(args, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate or int(args.hidden * 8 / 3 // 64 * 64),
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab, max_position_embeddings=max(args.seqs), attn_implementation=attn,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=0)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--modes", default="eager,inductor,asam,sdpa-eager,sdpa-inductor")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--pad", type=int, default=0, help="left padding of batch rows 1.. (tokens)")
    p.add_argument("--no-ref", action="store_true", help="skip the float64 reference")
    p.add_argument("--profile", default="", help="write a kernel table of asam at the longest seq here")
    p.add_argument("--json", default="")
    args = p.parse_args()

    import asam_compile
    from tabulate import tabulate

    dtype = getattr(torch, args.dtype)
    dev = args.device
    header = run_header(dev, workload=f"Llama {args.layers}L h{args.hidden} {args.heads}q/{args.kv_heads}kv {args.dtype} "
                                      f"B={args.batch}" + (f" left pad {args.pad}" if args.pad else ""))
    print(header_line(header), flush=True)
    base = build(args, "eager")
    sdpa = build(args, "sdpa")
    sdpa.load_state_dict(base.state_dict())
    ref_model = copy.deepcopy(base).to(dev, torch.float64) if not args.no_ref else None
    base = base.to(dev, dtype)
    sdpa = sdpa.to(dev, dtype)
    modes = args.modes.split(",")
    rows = []
    for L in args.seqs:
        torch.manual_seed(L)
        ids = torch.randint(0, args.vocab, (args.batch, L), device=dev)
        kw = dict(use_cache=False, logits_to_keep=1)
        if args.pad:
            am = torch.ones(args.batch, L, dtype=torch.long, device=dev)
            am[1:, : args.pad] = 0
            kw["attention_mask"] = am
        ref = None
        if ref_model is not None:
            with torch.no_grad():
                ref = ref_model(ids, **kw).logits.float()
            torch.cuda.empty_cache() if dev == "cuda" else None
        for mode in modes:
            torch._dynamo.reset()
            model = sdpa if mode.startswith("sdpa") else base
            fired = "-"
            if mode in ("eager", "sdpa-eager"):
                fn = model
            elif mode in ("inductor", "sdpa-inductor"):
                fn = torch.compile(model)
            elif mode == "asam":
                fn = torch.compile(model, backend="asam")
            elif mode == "asam-dense":
                fn = torch.compile(model, backend="asam", options={"flex": "never"})
            else:
                raise SystemExit(f"unknown mode {mode}")
            try:
                with torch.no_grad(), asam_compile.capture() as cap:
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = fn(ids, **kw).logits.float()
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                if mode.startswith("asam"):
                    targets = sorted({c.target for c in cap.report.rewritten})
                    fired = f"{cap.n_rewritten}/{len(cap.report.candidates)} {'+'.join(targets)}"
                # float64 HF overflows on rows with no key (finfo.min + score = -inf: NaN), and the NaN spreads
                # through a left-padded batch row's keys: compare the rows where float64 is finite
                ok = ref.isfinite().all(-1) if ref is not None else None
                err = (out - ref)[ok].abs().max().item() if ref is not None and ok.any() else float("nan")
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                with torch.no_grad():
                    ms = time_ms(lambda: fn(ids, **kw), dev, args.iters)
                peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
                rows.append(dict(seq=L, mode=mode, ms=ms, compile_s=first, max_err_vs_fp64=err, peak_gib=peak, rewritten=fired))
            except Exception as e:  # noqa: BLE001 - a failing configuration is a row, the sweep goes on
                rows.append(dict(seq=L, mode=mode, ms=float("nan"), compile_s=float("nan"), max_err_vs_fp64=float("nan"), peak_gib=float("nan"), rewritten=f"error: {type(e).__name__}: {str(e)[:120]}"))
            print(rows[-1], flush=True)
        if args.profile and L == max(args.seqs) and "asam" in modes:
            torch._dynamo.reset()
            fn = torch.compile(base, backend="asam")
            with torch.no_grad():
                for _ in range(3):
                    fn(ids, **kw)
                torch.cuda.synchronize()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        fn(ids, **kw)
                    torch.cuda.synchronize()
            with open(args.profile, "w") as f:
                f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    for L in args.seqs:
        base_ms = next((r["ms"] for r in rows if r["seq"] == L and r["mode"] == "inductor"), float("nan"))
        for r in rows:
            if r["seq"] == L:
                r["speedup_vs_inductor"] = base_ms / r["ms"] if r["ms"] == r["ms"] else float("nan")
    print(header_line(header))
    print(tabulate([[r["seq"], r["mode"], f"{r['ms']:.2f}", f"{r['speedup_vs_inductor']:.2f}x", f"{r['compile_s']:.1f}",
                     f"{r['max_err_vs_fp64']:.3g}", f"{r['peak_gib']:.2f}", r["rewritten"]] for r in rows],
                   headers=["seq", "mode", "ms (median)", "vs torch.compile", "first call s", "max err vs fp64", "peak GiB", "asam rewritten"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
