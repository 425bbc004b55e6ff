"""What do the constants of asam_compile/kernels/cost.py measure on this card? A calibration sweep of the kernels that the
cost model chooses between: SDPA with a dense mask and Flex on a block mask, beside SDPA flash.

Attention alone, B=1, H=16, D=128, bf16, for each length L (one run, one device):

    (a) SDPA flash, is_causal=True (the default pick, and forced to flash and to cuDNN), and without any mask
    (b) SDPA with a dense L x L mask: boolean, causal-like and sliding windows (the backend SDPA picks is recorded);
        an additive bf16 mask (what asam passes when it keeps SDPA); at --probe-window also forced to the
        efficient, cuDNN and math backends, and under torch.compile (what asam hands Inductor)
    (c) compiled flex_attention on block masks of several densities: sliding window W + causal, and causal
        (block density = 1 - BlockMask.sparsity() / 100, blocks of --block-size)
    (d) the BlockMask construction itself with a compiled create_block_mask: first call (compile) and after

The window mask_mod reads W from a one-element tensor filled before each build, so that one compiled Flex
kernel and one compiled create_block_mask serve every window at a length (a constant W would recompile both
for each window, minutes in all); the scalar load touches partial blocks only.

Then a fit, in the cost model's own terms: flash's rate (causal work counted as half of 4 L^2 H D); masked
SDPA's speed relative to it (MASKED_SDPA_SPEED); Flex time = overhead + density * 4 L^2 H D / (rate * speed)
per length and over all lengths (FLEX_OVERHEAD_S, FLEX_SPEED; fitted on relative error); the block density
below which Flex beats masked SDPA (and causal flash) at each L; and, for every (L, window), which kernel won,
what cost.choose_kernel picks now, and what it would pick with the fitted constants.

    python benchmarks/exact/calibrate_cost.py --json calib.json                 # on a GPU, about 2-3 minutes
    python benchmarks/exact/calibrate_cost.py --device cpu --seqs 256 512 --heads 2 --dim 32 --windows 64 128 \
        --probe-window 64 --block-size 64 --dtype float32                 # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from asam_compile.measure import free, header_line, is_oom, run_header, sync, time_ms

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S} +{time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


def sdpa_choice(q, k, v, **kw) -> str:
    """The backend F.scaled_dot_product_attention dispatches to for these inputs (the same check it runs)."""
    from torch.nn.attention import SDPBackend

    try:
        return SDPBackend(torch._fused_sdp_choice(q, k, v, **kw)).name.lower()
    except Exception as e:  # noqa: BLE001 - a private function; its absence only loses the label
        return f"? ({type(e).__name__})"


def linear_fit(xs, ys, relative: bool) -> tuple[float, float]:
    """(a, b) of y = a + b x by least squares; relative=True weights each point by 1/y^2 (relative error)."""
    ws = [1 / y**2 if relative else 1.0 for y in ys]
    sw = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs)) / sw
    my = sum(w * y for w, y in zip(ws, ys)) / sw
    sxx = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs))
    if sxx == 0:
        return my, float("nan")
    b = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys)) / sxx
    return my - b * mx, b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--windows", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--probe-window", type=int, default=1024, help="window timed on every SDPA backend and compiled")
    p.add_argument("--block-size", type=int, default=128, help="BlockMask block size (asam's default is 128)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=5, help="timed calls (median), after 2 warm-up calls")
    p.add_argument("--math-max-len", type=int, default=16384, help="time SDPA's math backend only up to here")
    p.add_argument("--json", default="")
    args = p.parse_args()

    from tabulate import tabulate
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    try:
        from asam_compile.kernels import cost
    except Exception as e:  # noqa: BLE001 - the sweep itself does not need the cost model
        cost = None
        print(f"asam_compile.kernels.cost not importable ({type(e).__name__}: {e}); no cost-model comparison", flush=True)

    dev, dtype, H, D, bs = args.device, getattr(torch, args.dtype), args.heads, args.dim, args.block_size
    header = run_header(dev, workload=f"attention alone B=1 H={H} D={D} {args.dtype}, block size {bs}")
    print(header_line(header), flush=True)
    out: dict = {"header": header, "args": vars(args), "rows": [], "per_len": [], "fit": {}, "decisions": []}

    def dump() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2, default=str)

    win = torch.full((), 0, dtype=torch.int64, device=dev)  # the window the mask_mod reads (see the docstring)

    def window_mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - win)

    def timed(L: int, kind: str, mask: str, fn, *, backend: str = "", density: float = float("nan"), work: float = float("nan"),
              ref: torch.Tensor | None = None, note: str = "") -> torch.Tensor | None:
        """Run fn once (checked against ref), time it, append a row; an error or OOM becomes the row instead."""
        row = dict(L=L, kind=kind, mask=mask, backend=backend, density=density, ms=float("nan"), tflops=float("nan"),
                   max_err=float("nan"), first_s=float("nan"), note=note)
        res = None
        try:
            with torch.no_grad():
                sync(dev)
                t = time.perf_counter()
                res = fn()  # the first call: compiles where fn is compiled
                sync(dev)
                row["first_s"] = time.perf_counter() - t
                if ref is not None and isinstance(res, torch.Tensor):
                    row["max_err"] = (res.float() - ref.float()).abs().max().item()
                row["ms"] = time_ms(fn, dev, args.iters)
            row["tflops"] = work / (row["ms"] * 1e-3) / 1e12
        except Exception as e:  # noqa: BLE001 - an unsupported backend or an OOM is a row; the sweep goes on
            row["note"] = ("OOM" if is_oom(e) else f"error: {type(e).__name__}: {str(e).splitlines()[0][:110] if str(e) else ''}")
            res = None
            free(dev)
        out["rows"].append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        return res

    for L in args.seqs:
        log(f"L={L}")
        torch._dynamo.reset()  # each length compiles afresh, with static shapes (no automatic dynamic recompile)
        free(dev)
        flex_c = torch.compile(flex_attention, dynamic=False)
        cbm_c = torch.compile(create_block_mask, dynamic=False)
        torch.manual_seed(L)
        q, k, v = (torch.randn(1, H, L, D, device=dev, dtype=dtype) for _ in range(3))
        full = 4.0 * H * L * L * D  # FLOPs of unmasked attention (two matmuls)
        i = torch.arange(L, device=dev)
        causal_keep = i[None, :] <= i[:, None]
        with torch.no_grad():
            ref_causal = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_keep)

        # (a) flash
        choice = sdpa_choice(q, k, v, is_causal=True)
        timed(L, "sdpa is_causal", "causal", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
              backend=f"default={choice}", density=0.5, work=full / 2, ref=ref_causal)
        for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            def forced(b=b):
                with sdpa_kernel([b]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            timed(L, "sdpa is_causal", "causal", forced, backend=b.name.lower(), density=0.5, work=full / 2, ref=ref_causal)
        timed(L, "sdpa no mask", "full", lambda: F.scaled_dot_product_attention(q, k, v),
              backend=f"default={sdpa_choice(q, k, v)}", density=1.0, work=full)

        masks = [("causal", L)] + [(f"window {W}", W) for W in args.windows if W < L]
        for name, W in masks:
            keep = causal_keep & (i[None, :] > i[:, None] - W)
            with torch.no_grad():
                ref = ref_causal if W == L else F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            # (b) SDPA with a dense mask
            choice = sdpa_choice(q, k, v, attn_mask=keep)
            timed(L, "sdpa bool mask", name, lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
                  backend=f"default={choice}", work=full, ref=ref)
            if W == L or W == args.probe_window:
                additive = torch.zeros(L, L, device=dev, dtype=dtype).masked_fill_(~keep, float("-inf"))
                timed(L, "sdpa additive mask", name, lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive),
                      backend=f"default={sdpa_choice(q, k, v, attn_mask=additive)}", work=full, ref=ref)
                if W == args.probe_window:
                    for b in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
                        if b == SDPBackend.MATH and L > args.math_max_len:
                            continue
                        def forced(b=b):
                            with sdpa_kernel([b]):
                                return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
                        timed(L, "sdpa bool mask", name, forced, backend=b.name.lower(), work=full, ref=ref)
                    sdpa_c = torch.compile(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), dynamic=False)
                    timed(L, "sdpa additive mask, compiled", name, lambda: sdpa_c(q, k, v, additive), backend="inductor",
                          work=full, ref=ref)
                additive = None
            keep = None
            free(dev)
            # (d) the block mask, then (c) Flex on it
            win.fill_(W)
            bm_box = []
            try:
                sync(dev)
                t = time.perf_counter()
                bm_box.append(cbm_c(window_mask, None, None, L, L, device=dev, BLOCK_SIZE=bs))
                sync(dev)
                first = time.perf_counter() - t
                density = 1 - bm_box[0].sparsity() / 100
            except Exception as e:  # noqa: BLE001
                first, density = float("nan"), float("nan")
                log(f"create_block_mask failed at L={L} {name}: {'OOM' if is_oom(e) else type(e).__name__}: {str(e)[:160]}")
            if bm_box:
                timed(L, "create_block_mask (compiled)", name, lambda: cbm_c(window_mask, None, None, L, L, device=dev, BLOCK_SIZE=bs),
                      backend="inductor", density=density)
                out["rows"][-1]["first_s"] = first
                timed(L, "flex", name, lambda: flex_c(q, k, v, block_mask=bm_box[0]), backend="flex", density=density,
                      work=density * full, ref=ref)
            bm_box.clear()
            ref = None
            free(dev)
            dump()
        q = k = v = ref_causal = causal_keep = None
        free(dev)

    # ---- fit ----------------------------------------------------------------------------------------------------
    rows = out["rows"]

    def pick(L, kind, mask=None, backend_prefix="default"):
        for r in rows:
            if r["L"] == L and r["kind"] == kind and (mask is None or r["mask"] == mask) and r["backend"].startswith(backend_prefix) and r["ms"] == r["ms"]:
                return r
        return None

    hbm = getattr(cost, "HBM_BYTES_PER_S", 3.0e12) if cost else 3.0e12

    def model_choice(L: int, density: float) -> str:
        """What cost.choose_kernel picks today for a window site of this length and density ("?" if it cannot say)."""
        try:
            return cost.choose_kernel(B=1, H=H, L=L, S=L, E=D, density=density, device_type=dev, requires_grad=False, policy="auto")[0]
        except Exception:  # noqa: BLE001 - cost.py may be mid-edit; the sweep stands without it
            return "?"
    per_len = []
    flex_pts = []  # (L, density, ms)
    for L in args.seqs:
        full = 4.0 * H * L * L * D
        flash = pick(L, "sdpa is_causal")
        masked = [r for r in rows if r["L"] == L and r["kind"] == "sdpa bool mask" and r["backend"].startswith("default") and r["ms"] == r["ms"]]
        flex = [r for r in rows if r["L"] == L and r["kind"] == "flex" and r["ms"] == r["ms"]]
        flex_pts += [(L, r["density"], r["ms"]) for r in flex]
        rate = (full / 2) / (flash["ms"] * 1e-3) if flash else float("nan")
        t_masked = statistics.median(r["ms"] for r in masked) if masked else float("nan")
        add = pick(L, "sdpa additive mask", f"window {args.probe_window}") or pick(L, "sdpa additive mask", "causal")
        comp = pick(L, "sdpa additive mask, compiled", backend_prefix="inductor")
        a, b = linear_fit([r["density"] * full for r in flex], [r["ms"] * 1e-3 for r in flex], relative=True) if len(flex) >= 2 else (float("nan"), float("nan"))
        d_masked = (t_masked * 1e-3 - a) / (b * full) if b == b and b > 0 else float("nan")
        d_flash = (flash["ms"] * 1e-3 - a) / (b * full) if flash and b == b and b > 0 else float("nan")
        d_model = float("nan")
        if cost is not None and model_choice(L, 0.5) != "?":  # bisection on the model's own decision: robust to changes of its formula
            def model_flex(d, L=L):
                return model_choice(L, d) == "flex"
            if model_flex(1.0):
                d_model = 1.0
            elif model_flex(1e-9):
                lo, hi = 1e-9, 1.0
                for _ in range(40):
                    mid = (lo + hi) / 2
                    lo, hi = (mid, hi) if model_flex(mid) else (lo, mid)
                d_model = lo
            else:
                d_model = 0.0
        per_len.append(dict(
            L=L, flash_causal_ms=flash["ms"] if flash else float("nan"), flash_backend=flash["backend"] if flash else "-",
            flash_tflops=rate / 1e12, masked_backend=masked[0]["backend"] if masked else "-", masked_ms_median=t_masked,
            masked_speed_vs_flash=(full / (t_masked * 1e-3)) / rate if masked else float("nan"),
            additive_speed_vs_flash=(full / (add["ms"] * 1e-3)) / rate if add else float("nan"),
            compiled_additive_speed_vs_flash=(full / (comp["ms"] * 1e-3)) / rate if comp else float("nan"),
            flex_overhead_ms=a * 1e3, flex_speed_vs_flash=1 / (b * rate) if b == b and b > 0 else float("nan"),
            flex_ns_per_unit=4 * b * 1e9 if b == b else float("nan"),  # per L^2 * density * H * D
            flash_ns_per_unit=(flash["ms"] * 1e-3) / (0.5 * L * L * H * D) * 1e9 if flash else float("nan"),
            crossover_density_vs_masked=d_masked, crossover_density_vs_causal_flash=d_flash, cost_model_crossover_density=d_model,
            flex_points=len(flex),
        ))
    out["per_len"] = per_len

    # Constants in cost.py's terms. FLASH_FLOPS: the median measured flash rate; MASKED_SDPA_SPEED: solved from
    # t = work / (FLASH_FLOPS * s) + mask read; FLEX_*: one fit over every length, on relative error.
    rates = [r["flash_tflops"] * 1e12 for r in per_len if r["flash_tflops"] == r["flash_tflops"]]
    flash_flops = statistics.median(rates) if rates else float("nan")
    speeds = []
    for r in per_len:
        L = r["L"]
        t = r["masked_ms_median"] * 1e-3 - 2.0 * L * L / hbm
        if t == t and t > 0:
            speeds.append(4.0 * H * L * L * D / (flash_flops * t))
    a, b = linear_fit([d * 4.0 * H * L * L * D for L, d, _ in flex_pts], [ms * 1e-3 for _, _, ms in flex_pts], relative=True) if len(flex_pts) >= 2 else (float("nan"), float("nan"))
    fit = dict(FLASH_FLOPS=flash_flops, MASKED_SDPA_SPEED=statistics.median(speeds) if speeds else float("nan"),
               FLEX_SPEED=1 / (b * flash_flops) if b == b and b > 0 else float("nan"), FLEX_OVERHEAD_S=a, HBM_BYTES_PER_S=hbm)
    out["fit"] = fit
    if cost is not None:
        out["current"] = {k: getattr(cost, k, None) for k in ("FLASH_FLOPS", "FLEX_SPEED", "MASKED_SDPA_SPEED", "FLEX_OVERHEAD_S", "HBM_BYTES_PER_S")}

    # Decisions: for every (L, mask) with both a masked-SDPA and a Flex time, who won, what cost.py picks now, and
    # what its formula picks with the fitted constants.
    for r in rows:
        if r["kind"] != "flex" or r["ms"] != r["ms"]:
            continue
        L, d = r["L"], r["density"]
        m = pick(L, "sdpa bool mask", r["mask"])
        if m is None:
            continue
        work = 4.0 * H * L * L * D
        t_sdpa_fit = work / (fit["FLASH_FLOPS"] * fit["MASKED_SDPA_SPEED"]) + 2.0 * L * L / hbm
        t_flex_fit = fit["FLEX_OVERHEAD_S"] + d * work / (fit["FLASH_FLOPS"] * fit["FLEX_SPEED"])
        now = model_choice(L, d) if cost else "?"
        out["decisions"].append(dict(L=L, mask=r["mask"], density=d, flex_ms=r["ms"], masked_sdpa_ms=m["ms"],
                                     winner="flex" if r["ms"] < m["ms"] else "sdpa", cost_model_now=now,
                                     fitted_model="flex" if t_flex_fit < t_sdpa_fit else "sdpa",
                                     fitted_flex_ms=t_flex_fit * 1e3, fitted_sdpa_ms=t_sdpa_fit * 1e3))
    dump()

    log("done")
    print(header_line(header))

    def f(x, spec=".3f"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    print(tabulate([[r["L"], r["kind"], r["mask"], r["backend"], f(r["density"]), f(r["ms"]), f(r["tflops"], ".0f"), f(r["max_err"], ".3g"),
                     f(r["first_s"], ".2f"), r["note"]] for r in rows],
                   headers=["L", "kernel", "mask", "backend", "block density", "ms", "TFLOP/s done", "max err", "first call s", "note"],
                   maxcolwidths=[None] * 9 + [60]))
    print("\nper length (speeds relative to SDPA flash causal; unit = L^2 * density * H * D; crossover = block density "
          "below which Flex is faster)")
    print(tabulate([[r["L"], f(r["flash_tflops"], ".0f"), r["masked_backend"], f(r["masked_speed_vs_flash"]), f(r["additive_speed_vs_flash"]),
                     f(r["compiled_additive_speed_vs_flash"]), f(r["flex_speed_vs_flash"]), f(r["flex_overhead_ms"]), f(r["flex_ns_per_unit"], ".4f"),
                     f(r["flash_ns_per_unit"], ".4f"), f(r["crossover_density_vs_masked"]), f(r["crossover_density_vs_causal_flash"]),
                     f(r["cost_model_crossover_density"])] for r in per_len],
                   headers=["L", "flash TFLOP/s", "masked SDPA backend", "masked SDPA speed", "additive mask speed", "compiled additive speed",
                            "Flex speed", "Flex overhead ms", "Flex ns/unit", "flash ns/unit", "crossover d vs masked SDPA",
                            "crossover d vs causal flash", "cost.py crossover d now"]))
    print("\nfitted constants for asam_compile/kernels/cost.py (current values in brackets):")
    for key, val in fit.items():
        cur = out.get("current", {}).get(key)
        print(f"  {key} = {val:.4g}" + (f"   [{cur:.4g}]" if isinstance(cur, (int, float)) else ""))
    if out["decisions"]:
        wrong_now = sum(1 for d in out["decisions"] if d["cost_model_now"] != d["winner"])
        wrong_fit = sum(1 for d in out["decisions"] if d["fitted_model"] != d["winner"])
        print(f"\ndecisions (Flex vs SDPA with the dense mask; causal rows are a density-0.5 point only: asam turns a causal "
              f"mask into is_causal=True): cost.py now picks the slower kernel in {wrong_now}/{len(out['decisions'])} cases, "
              f"with the fitted constants in {wrong_fit}/{len(out['decisions'])}")
        print(tabulate([[d["L"], d["mask"], f(d["density"]), f(d["flex_ms"]), f(d["masked_sdpa_ms"]), d["winner"], d["cost_model_now"],
                         d["fitted_model"]] for d in out["decisions"]],
                       headers=["L", "mask", "density", "Flex ms", "masked SDPA ms", "faster", "cost.py now", "fitted"]))


if __name__ == "__main__":
    main()
