"""Does backend="asam" turn an unmodified HF Mistral (eager attention, sliding window) into Flex attention, as fast
as the same model hand-edited to Flex, at long prefill lengths?

One run, one device, one set of random weights (MistralConfig, GQA, sliding window 1024, bf16, batch 1, prefill):

    asam              torch.compile(model, backend="asam") on attn_implementation="eager" (the unmodified model)
    inductor          plain torch.compile of the same model (its L x L scores run out of memory at long lengths)
    eager             the unmodified model, uncompiled (only up to --eager-max-len)
    sdpa-eager        attn_implementation="sdpa" (hand edit; HF passes SDPA a dense L x L window mask)
    sdpa-inductor     the same, under torch.compile
    flex-handwritten  attention replaced through transformers' AttentionInterface by flex_attention on a BlockMask
                      built once per length by torch.compile(create_block_mask); the whole model under torch.compile
    flex-hf           attn_implementation="flex_attention" (transformers' own Flex path: the model runs eagerly, HF
                      compiles flex_attention and rebuilds the BlockMask with a compiled create_block_mask every call)
    (optional)        flex-hf-inductor (flex-hf under torch.compile), flex-handwritten-eager (the hand-written Flex
                      model uncompiled, its flex_attention compiled), asam-nocache (asam with use_cache=False)

Prefill is run as generate() runs it, with a DynamicCache (use_cache=True; --no-cache turns it off). Without a
cache, transformers 5.17 adds a packed-sequence mask computed from position_ids (a cumsum) to the window mask,
which asam cannot lift into a Flex mask_mod: its sites then stay SDPA with a dense mask (asam-nocache shows it).

Correctness before timing, at --ref-len (default 4096, longer than the window so the window matters): the last
--ref-keep logits of the eager model, sdpa-eager and asam against a float64 run of the original model; beside
them, how far a causal-only float64 run is from the windowed one (what ignoring the window would cost). At the
timed lengths every mode's last-token logits are compared with those of --delta-ref (sdpa-eager).

    python benchmarks/exact/bench_mistral.py --json mistral.json                        # on a GPU, about 6 minutes
    python benchmarks/exact/bench_mistral.py --device cpu --dtype float32 --seqs 256 --layers 1 --hidden 128 \
        --heads 4 --kv-heads 2 --window 64 --ref-len 256 --vocab 1000 --asam-flex always   # a smoke run
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import json
import time

import torch

from asam_compile.measure import free, header_line, is_oom, run_header, sync, time_ms

HAND_FLEX = "bench_hand_flex"  # the AttentionInterface key of the hand-written Flex attention
BLOCK_MASKS: dict[tuple[int, int], object] = {}  # (L, S) -> BlockMask, filled before the model is compiled
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S} +{time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


def hand_flex_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flex_attention on the BlockMask prebuilt for this length; HF hands us (B, H, L, E) and expects (B, L, H, E)."""
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = BLOCK_MASKS[(query.shape[-2], key.shape[-2])]
    # Under torch.compile(model) Dynamo traces flex_attention itself; run eagerly it must be compiled to be sparse.
    flex = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    out = flex(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


_FLEX_C = None


def _compiled_flex():
    global _FLEX_C
    if _FLEX_C is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX_C = torch.compile(flex_attention)
    return _FLEX_C


def window_mask_mod(window: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - window)

    mask_mod.__name__ = f"sliding_window_{window}"
    return mask_mod


def build(args, attn: str):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate or int(args.hidden * 8 / 3 // 64 * 64),
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim or None, vocab_size=args.vocab, max_position_embeddings=max(args.seqs + [args.ref_len]),
        sliding_window=args.window or None, attn_implementation=attn,
    )
    torch.manual_seed(0)
    return MistralForCausalLM(cfg).eval()


def measure(fn, dev: str, iters: int, slow_ms: float) -> tuple[float, str]:
    """Median ms of fn() and how it was timed. Calls slower than slow_ms get 3 timed calls and no warm-up
    instead of `iters` after warm-up (at 64k a dense-mask forward takes about a second)."""
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    once = (time.perf_counter() - t) * 1e3
    clock = "cuda events" if dev == "cuda" else "host clock"
    if dev == "cuda" and once > slow_ms:
        return time_ms(fn, dev, 3, warmup=0), f"{clock}, median of 3"
    return time_ms(fn, dev, iters), f"{clock}, median of {iters}"


def summarize_asam(cap) -> tuple[str, str, dict]:
    """('8/8', '8x flex flex:sliding_window_1024 d=0.035', details) from an asam_compile.capture()."""
    rep = cap.report
    groups: collections.Counter = collections.Counter()
    reasons = []
    for c in rep.candidates:
        if c.status == "rewritten":
            kernel = c.target or str(c.info.get("kernel", "?")).split(":")[0]
            d = f" d={c.info['density']}" if "density" in c.info else ""
            groups[f"{kernel} {c.info.get('mask')}{d}"] += 1
            if kernel == "sdpa" and c.info.get("kernel"):
                reasons.append(str(c.info["kernel"]))
        else:
            groups[f"{c.status}: {c.reject.name if c.reject else '?'}"] += 1
    n_flex = sum(1 for c in rep.rewritten if c.target == "flex")
    n_sdpa = sum(1 for c in rep.rewritten if c.target != "flex")
    fired = f"{cap.n_rewritten}/{len(rep.candidates)} in {len(rep.graphs)} graph(s)"
    kernels = ", ".join(f"{n}x {k}" for k, n in groups.items()) or "-"
    if reasons:
        kernels += f" [sdpa because: {reasons[0][:90]}]"
    details = dict(n_flex=n_flex, n_sdpa=n_sdpa, n_candidates=len(rep.candidates), n_graphs=len(rep.graphs),
                   failures=[f for g in rep.graphs for f in g.failures],
                   candidates=[dict(site=c.site, module=c.module, status=c.status, target=c.target, reason=c.reason,
                                    info={k: str(v) for k, v in c.info.items()}) for c in rep.candidates])
    return fired, kernels, details


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=0, help="0: hidden * 8/3 rounded down to 64, as bench_llama")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=0, help="0: hidden / heads (64 with the defaults)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--window", type=int, default=1024, help="MistralConfig.sliding_window")
    p.add_argument("--seqs", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=5, help="timed calls (median), after 2 warm-up calls")
    p.add_argument("--slow-ms", type=float, default=250.0, help="calls slower than this are timed 3 times only")
    p.add_argument("--modes", default="sdpa-eager,flex-handwritten,asam,flex-hf,sdpa-inductor,inductor,eager",
                   help="also: flex-hf-inductor, flex-handwritten-eager, asam-nocache")
    p.add_argument("--eager-max-len", type=int, default=8192, help="run the uncompiled eager model only up to here")
    p.add_argument("--ref-len", type=int, default=4096, help="length of the float64 check (0: skip)")
    p.add_argument("--ref-keep", type=int, default=64, help="how many last positions' logits the check compares")
    p.add_argument("--ref-modes", default="eager,sdpa-eager,asam", help="modes checked against float64 at --ref-len")
    p.add_argument("--delta-ref", default="sdpa-eager", help="mode whose logits the others are compared with when timed")
    p.add_argument("--no-cache", action="store_true", help="prefill with use_cache=False (HF then adds a packed-sequence mask)")
    p.add_argument("--asam-flex", default="auto", choices=["auto", "always", "never"], help="asam's `flex` option")
    p.add_argument("--json", default="")
    args = p.parse_args()

    import asam_compile
    from tabulate import tabulate
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers import AttentionInterface

    AttentionInterface.register(HAND_FLEX, hand_flex_attention)
    dtype, dev, W = getattr(torch, args.dtype), args.device, args.window
    use_cache = not args.no_cache
    header = run_header(dev, workload=(
        f"Mistral {args.layers}L h{args.hidden} {args.heads}q/{args.kv_heads}kv head_dim "
        f"{args.head_dim or args.hidden // args.heads} window {W} {args.dtype} B=1 prefill use_cache={use_cache} "
        f"asam flex={args.asam_flex}"))
    print(header_line(header), flush=True)
    modes = args.modes.split(",")
    out: dict = {"header": header, "args": vars(args), "check": [], "rows": []}

    def dump() -> None:  # after every row, so that a run cut short still leaves its rows
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2, default=str)

    log("building models (random weights, CPU)")
    base = build(args, "eager")
    models = {"eager": base}
    for attn in ("sdpa", "flex_attention", HAND_FLEX):
        if any(m.startswith({"sdpa": "sdpa", "flex_attention": "flex-hf", HAND_FLEX: "flex-handwritten"}[attn]) for m in modes + args.ref_modes.split(",")):
            models[attn] = build(args, attn)
            models[attn].load_state_dict(base.state_dict())
    ref_model = copy.deepcopy(base) if args.ref_len else None
    for m in models.values():
        m.to(dev, dtype)
    cbm = torch.compile(create_block_mask)

    def make(mode: str, L: int):
        """(callable, its keyword arguments, set-up seconds, set-up note) for one mode at length L."""
        kw = dict(use_cache=use_cache and mode != "asam-nocache", logits_to_keep=1)
        if mode == "eager":
            return base, kw, 0.0, ""
        if mode == "inductor":
            return torch.compile(base), kw, 0.0, ""
        if mode in ("asam", "asam-nocache"):
            return torch.compile(base, backend="asam", options={"flex": args.asam_flex}), kw, 0.0, ""
        if mode == "sdpa-eager":
            return models["sdpa"], kw, 0.0, ""
        if mode == "sdpa-inductor":
            return torch.compile(models["sdpa"]), kw, 0.0, ""
        if mode == "flex-hf":
            return models["flex_attention"], kw, 0.0, ""
        if mode == "flex-hf-inductor":
            return torch.compile(models["flex_attention"]), kw, 0.0, ""
        if mode in ("flex-handwritten", "flex-handwritten-eager"):
            BLOCK_MASKS.clear()
            sync(dev)
            t = time.perf_counter()
            bm = cbm(window_mask_mod(W or L), None, None, L, L, device=dev)
            sync(dev)
            first = time.perf_counter() - t
            t = time.perf_counter()
            bm = cbm(window_mask_mod(W or L), None, None, L, L, device=dev)
            sync(dev)
            again = time.perf_counter() - t
            BLOCK_MASKS[(L, L)] = bm
            density = 1 - bm.sparsity() / 100
            note = f"BlockMask d={density:.3f}: build {first:.1f} s first (compile), then {again * 1e3:.1f} ms"
            model = models[HAND_FLEX]
            return (model if mode.endswith("eager") else torch.compile(model)), kw, first, note
        raise SystemExit(f"unknown mode {mode}")

    def run_once(mode: str, L: int, ids: torch.Tensor, keep: int) -> dict:
        """Compile (first call) and run one mode once; returns its logits and what asam did."""
        torch._dynamo.reset()
        free(dev)
        fn, kw, setup_s, note = make(mode, L)
        kw = dict(kw, logits_to_keep=keep)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad(), asam_compile.capture() as cap:
            sync(dev)
            t = time.perf_counter()
            logits = fn(ids, **kw).logits.float()
            sync(dev)
            first = time.perf_counter() - t
        res = dict(fn=fn, kw=kw, logits=logits, first_s=first, setup_s=setup_s, note=note,
                   peak_first_gib=torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan"))
        res["rewritten"], res["kernels"], res["asam"] = summarize_asam(cap) if mode.startswith("asam") else ("-", note or "-", None)
        return res

    # ---- correctness at a short length where the window is active --------------------------------------------
    if args.ref_len:
        if W and W >= args.ref_len:
            log(f"warning: window {W} >= --ref-len {args.ref_len}: the check does not exercise the window")
        torch.manual_seed(1)
        ids = torch.randint(0, args.vocab, (1, args.ref_len), device=dev)
        keep = min(args.ref_keep, args.ref_len)
        log(f"check at {args.ref_len} tokens: float64 reference (windowed, then causal only)")
        ref_model = ref_model.to(dev, torch.float64)
        kw = dict(use_cache=use_cache, logits_to_keep=keep)
        with torch.no_grad():
            ref = ref_model(ids, **kw).logits.float()
            ref_model.config.sliding_window = None
            ref_causal = ref_model(ids, **kw).logits.float()
        window_effect = (ref - ref_causal).abs().max().item()
        ref_model = None
        free(dev)
        for mode in args.ref_modes.split(","):
            log(f"check {mode} at {args.ref_len}")
            try:
                r = run_once(mode, args.ref_len, ids, keep)
                err = (r["logits"] - ref).abs().max().item()
                row = dict(seq=args.ref_len, mode=mode, max_err_vs_fp64=err, window_effect_fp64=window_effect,
                           first_s=r["first_s"], rewritten=r["rewritten"], kernels=r["kernels"], asam=r["asam"])
            except Exception as e:  # noqa: BLE001 - a failing mode is a row; the run goes on
                row = dict(seq=args.ref_len, mode=mode, max_err_vs_fp64=float("nan"), window_effect_fp64=window_effect,
                           first_s=float("nan"), rewritten="-", kernels=f"{'OOM' if is_oom(e) else 'error'}: {type(e).__name__}: {str(e)[:160]}", asam=None)
            r = None
            out["check"].append(row)
            print({k: v for k, v in row.items() if k != "asam"}, flush=True)
            dump()

    # ---- timing at the long lengths ----------------------------------------------------------------------------
    for L in args.seqs:
        torch.manual_seed(L)
        ids = torch.randint(0, args.vocab, (1, L), device=dev)
        logits_of = {}
        for mode in modes:
            if mode == "eager" and L > args.eager_max_len:
                log(f"skip eager at {L} (> --eager-max-len {args.eager_max_len})")
                continue
            log(f"{mode} at {L}: compile / first call")
            row = dict(seq=L, mode=mode, ms=float("nan"), first_s=float("nan"), setup_s=float("nan"), peak_gib=float("nan"),
                       peak_first_gib=float("nan"), timer="-", rewritten="-", kernels="-", asam=None)
            try:
                r = run_once(mode, L, ids, 1)
                logits_of[mode] = r["logits"]
                row.update({k: r[k] for k in ("first_s", "setup_s", "peak_first_gib", "rewritten", "kernels", "asam")})
                log(f"{mode} at {L}: first call {r['first_s']:.1f} s; timing")
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                fn, kw = r["fn"], r["kw"]
                with torch.no_grad():
                    row["ms"], row["timer"] = measure(lambda: fn(ids, **kw), dev, args.iters, args.slow_ms)
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
            except Exception as e:  # noqa: BLE001 - OOM (plain torch.compile at 64k) or a failing mode is a row
                row["kernels"] = "OOM" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:160]}"
                row["ms"] = float("nan")
            r = fn = None
            free(dev)
            out["rows"].append(row)
            print({k: v for k, v in row.items() if k != "asam"}, flush=True)
            dump()
        base_logits = logits_of.get(args.delta_ref)
        for row in out["rows"]:
            if row["seq"] == L:
                lg = logits_of.get(row["mode"])
                row["max_delta_vs_ref_mode"] = (lg - base_logits).abs().max().item() if lg is not None and base_logits is not None else float("nan")
        dump()

    for L in args.seqs:
        flex = next((r["ms"] for r in out["rows"] if r["seq"] == L and r["mode"] == "flex-handwritten"), float("nan"))
        ind = next((r["ms"] for r in out["rows"] if r["seq"] == L and r["mode"] == "inductor"), float("nan"))
        for r in out["rows"]:
            if r["seq"] == L:
                r["vs_handwritten_flex"] = r["ms"] / flex
                r["x_vs_inductor"] = ind / r["ms"]
    log("done")
    print(header_line(header))
    if out["check"]:
        print(f"\ncheck at {args.ref_len} tokens, last {min(args.ref_keep, args.ref_len)} positions' logits; a causal-only "
              f"float64 run differs from the windowed one by {out['check'][0]['window_effect_fp64']:.3g}")
        print(tabulate([[r["mode"], f"{r['max_err_vs_fp64']:.3g}", f"{r['first_s']:.1f}", r["rewritten"], r["kernels"]] for r in out["check"]],
                       headers=["mode", "max err vs fp64", "first call s", "asam rewritten", "kernels"]))
    print()
    print(tabulate([[r["seq"], r["mode"], "OOM" if r["kernels"] == "OOM" else f"{r['ms']:.2f}", f"{r['vs_handwritten_flex']:.2f}",
                     f"{r['x_vs_inductor']:.2f}x", f"{r['first_s']:.1f}", f"{r['peak_gib']:.2f}", f"{r['peak_first_gib']:.2f}",
                     f"{r.get('max_delta_vs_ref_mode', float('nan')):.3g}", r["rewritten"], r["kernels"]] for r in out["rows"]],
                   headers=["seq", "mode", "ms", "time / hand-written Flex", "vs torch.compile", "first call s", "peak GiB",
                            "peak GiB 1st call", f"max |d logits| vs {args.delta_ref}", "asam rewritten", "kernels / notes"],
                   maxcolwidths=[None] * 10 + [70]))
    dump()


if __name__ == "__main__":
    main()
