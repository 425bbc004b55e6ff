"""What does an asam options set cost in accuracy on real pretrained models?

For each options dict (the exact default `{}` always comes first, as the baseline) and each length:

- SmolLM2-135M: perplexity of one forward over the first L tokens of the shipped text, eager and under
  `torch.compile(model, backend="asam", options=opts)`, and its change relative to eager in %.
- all-MiniLM-L6-v2: cosine similarity between eager and compiled sentence embeddings of `--pieces` pieces of
  the text, each filling `--minilm-length` tokens (min and mean over the pieces).

Every row says how many attention sites asam rewrote (and into what): an accuracy row where nothing was
rewritten measures nothing. Each (options, length) gets a fresh Dynamo (`torch._dynamo.reset()`) and static
shapes, so a second length never turns into a dynamic-shape compile. An options set that fails (e.g. a mode
this checkout does not have yet) becomes a row with its error; the sweep goes on.

--pad N runs SmolLM2 on a batch of two instead: the first L tokens, and the same text left-padded by N tokens
(attention_mask 0 there, no loss on them): the padding mask is read at run time, so the sites test the adaptive
mode inside a run-time padding mask (Note [Adaptive over a structured mask]). With --pad, MiniLM's every other
piece is cut to a quarter, so those rows are right-padded (BERT's padding mask, no causality).

    python benchmarks/adaptive/accuracy_adaptive.py --lengths 2048                     # the exact default only
    python benchmarks/adaptive/accuracy_adaptive.py --lengths 2048 4096 8192 \\
        --options '{"mode": "adaptive", "coverage": 0.95}' --options '{"mode": "adaptive", "coverage": 0.99}' \\
        --json adaptive.json
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from asam_compile.measure import header_line, run_header

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for real_models.py (its docstring)
from real_models import embed, load_minilm, load_smollm2, long_text, paragraphs, perplexity  # noqa: E402


def options_label(opts: dict[str, Any]) -> str:
    return json.dumps(opts, sort_keys=True, separators=(",", ":")) if opts else "{} (exact default)"


def parse_options(texts: list[str]) -> list[dict[str, Any]]:
    """The options dicts to run, the exact default first (added when not given)."""
    sets: list[dict[str, Any]] = [{}]
    for text in texts:
        opts = json.loads(text)
        if not isinstance(opts, dict):
            raise SystemExit(f"--options {text!r}: expected a JSON object")
        if opts not in sets:
            sets.append(opts)
    return sets


def sites(cap) -> dict[str, Any]:
    """What asam did in the graphs captured: counts, targets, refusal reasons, every candidate's report."""
    candidates = cap.report.candidates
    rewritten = [c for c in candidates if c.status == "rewritten"]
    return {
        "rewritten": len(rewritten),
        "candidates": len(candidates),
        "targets": dict(collections.Counter(c.target for c in rewritten)),
        "refused": dict(collections.Counter(c.reject.name if c.reject else c.detail
                                            for c in candidates if c.status == "refused")),
        "failures": [f for g in cap.reports for f in g.failures],
        # Inductor failed on the rewritten graph and asam compiled a fallback (dense SDPA or the original).
        "inductor_fallbacks": [g.inductor_fallback[:300] for g in cap.reports if g.inductor_fallback],
        # What the adaptive mode decided per site (its settings, or why the site stayed exact).
        "adaptive": dict(collections.Counter(c.info["adaptive"] for c in candidates if "adaptive" in c.info)),
        "report": [c.to_json() for c in candidates],
    }


def seconds(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.1f}"


def sites_text(s: dict[str, Any] | None) -> str:
    if not s:
        return "-"
    text = f"{s['rewritten']}/{s['candidates']}"
    if s["targets"]:
        text += " (" + ", ".join(f"{t} {n}" for t, n in s["targets"].items()) + ")"
    if s["failures"]:
        text += f", {len(s['failures'])} pass failures"
    if s["inductor_fallbacks"]:
        text += f", {len(s['inductor_fallbacks'])} Inductor fallbacks"
    return text


def compiled_run(model: torch.nn.Module, opts: dict[str, Any], fn: Callable[[Any], Any], runs: int) -> dict[str, Any]:
    """fn(compiled model) once through a fresh asam compile, then `runs` more times; results and timings."""
    import asam_compile

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="asam", options=opts, dynamic=False)
    with torch.no_grad(), asam_compile.capture() as cap:
        t0 = time.perf_counter()
        value = fn(compiled)
        first = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        with torch.no_grad():
            fn(compiled)
        times.append(time.perf_counter() - t0)
    run_s = sorted(times)[len(times) // 2] if times else float("nan")
    return {"value": value, "first_call_s": first, "run_s": run_s, "sites": sites(cap)}


def error_text(e: BaseException) -> str:
    """The innermost error, one line: Dynamo wraps a backend's ValueError in BackendCompilerFailed."""
    while getattr(e, "inner_exception", None) or e.__cause__:
        e = getattr(e, "inner_exception", None) or e.__cause__
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def report_row(prefix: str, row: dict[str, Any], measured: str) -> None:
    """One progress line per row, then what the adaptive mode decided for its sites."""
    if "error" in row:
        print(f"{prefix} {row['label']}: {row['error']}", flush=True)
        return
    print(f"{prefix} {row['label']}: {measured}, first call {seconds(row['first_call_s'])} s, "
          f"run {seconds(row['run_s'])} s, sites {sites_text(row['sites'])}", flush=True)
    for note, n in (row.get("sites") or {}).get("adaptive", {}).items():
        print(f"    adaptive, {n} sites: {note}")


Rows = list[dict[str, Any]]


def selection_density(model: Any, ids: torch.Tensor, L: int, opts: dict[str, Any]) -> float | None:
    """Mean block density (kept / causal blocks over layers and heads) that the adaptive selection of `opts`
    makes on this input: one eager forward, replaying asam_compile.kernels.selection.select_blocks on each layer's q, k
    (as the compiled model's sites see them). None for options that send no site to adaptive sparse."""
    from asam_compile import AsamConfig
    from asam_compile.kernels import selection

    config = AsamConfig.from_options(opts)
    if config.mode != "adaptive":
        return None
    settings = config.sparse
    densities: list[float] = []

    def on_layer(idx, q, k, P, scale):
        kept, _, allowed = selection.select_blocks(q[None], k[None], scale=scale, causal=True, settings=settings)
        densities.append(selection.block_density(kept, allowed))

    from attention_profile import profiling_attention

    with torch.no_grad(), profiling_attention(on_layer):
        model(input_ids=ids[:, :L], use_cache=False, logits_to_keep=1)
    return sum(densities) / len(densities) if densities else None


def padded_perplexity(model: torch.nn.Module, ids: torch.Tensor, length: int, pad: int) -> float:
    """Perplexity of a batch of two: ids[:, :length], and ids[:, :length - pad] left-padded by `pad` tokens
    (attention_mask 0 and no loss there). RoPE scores depend on relative positions only, so the padded row's
    real tokens see what they would see unpadded."""
    row = ids[0, :length]
    padded = torch.cat([torch.zeros(pad, dtype=ids.dtype, device=ids.device), ids[0, :length - pad]])
    batch = torch.stack([row, padded])
    attention_mask = torch.ones_like(batch)
    attention_mask[1, :pad] = 0
    labels = batch.masked_fill(attention_mask == 0, -100)
    loss = model(input_ids=batch, attention_mask=attention_mask, labels=labels, use_cache=False).loss
    return float(torch.exp(loss.double()))


def run_smollm2(args: argparse.Namespace, option_sets: list[dict[str, Any]], dtype: torch.dtype) -> Rows:
    """Perplexity rows: for each length, eager first, then one row per options set."""
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(dtype=dtype, device=args.device)
    ids = tokenizer(long_text(), return_tensors="pt").input_ids.to(args.device)
    print(f"SmolLM2 loaded in {time.perf_counter() - t0:.1f}s; the text is {ids.shape[1]} tokens", flush=True)
    limit = min(ids.shape[1], model.config.max_position_embeddings)
    if max(args.lengths) > limit:
        raise SystemExit(f"lengths are limited to {limit} tokens")

    rows: Rows = []
    for L in args.lengths:
        def measure(m, L=L):
            return padded_perplexity(m, ids, L, args.pad) if args.pad else perplexity(m, ids, L)

        t0 = time.perf_counter()
        eager_ppl = measure(model)
        eager_s = time.perf_counter() - t0
        rows.append({"model": "SmolLM2-135M", "length": L, "options": None, "label": "eager", "ppl": eager_ppl,
                     "rel_change_pct": 0.0, "first_call_s": eager_s, "run_s": eager_s, "sites": None})
        print(f"L={L} eager: ppl {eager_ppl:.4f} in {eager_s:.1f}s", flush=True)
        for opts in option_sets:
            row = {"model": "SmolLM2-135M", "length": L, "options": opts, "label": options_label(opts)}
            try:
                r = compiled_run(model, opts, measure, args.runs)
                row.update(ppl=r["value"], rel_change_pct=100 * (r["value"] - eager_ppl) / eager_ppl,
                           first_call_s=r["first_call_s"], run_s=r["run_s"], sites=r["sites"])
                if args.density and not args.pad:  # the replay knows causal masks only
                    row["density"] = selection_density(model, ids, L, opts)
            except Exception as e:  # noqa: BLE001 - a failing options set is a row; the sweep goes on
                row.update(error=error_text(e))
            rows.append(row)
            measured = f"ppl {row['ppl']:.4f} ({row['rel_change_pct']:+.4f}%)" if "ppl" in row else ""
            if row.get("density") is not None:
                measured += f", block density {row['density']:.3f}"
            report_row(f"L={L}", row, measured)
    return rows


def run_minilm(args: argparse.Namespace, option_sets: list[dict[str, Any]], dtype: torch.dtype) -> Rows:
    """Cosine rows: compiled embeddings against eager ones, one row per options set."""
    bert, tokenizer = load_minilm(dtype=dtype, device=args.device)
    # This text runs at 4-5 characters per MiniLM token: 6 per token fills every piece, so nothing is padded.
    pieces = paragraphs(long_text(), args.pieces, min_chars=6 * args.minilm_length)
    if args.pad:  # every other piece cut to a quarter: those rows are right-padded, the mask is read at run time
        pieces = [p if i % 2 == 0 else p[: len(p) // 4] for i, p in enumerate(pieces)]
    filled = tokenizer(pieces, truncation=True, max_length=args.minilm_length).input_ids
    padded = sum(len(x) < args.minilm_length for x in filled)
    print(f"MiniLM: {len(pieces)} pieces of {args.minilm_length} tokens ({padded} padded)", flush=True)

    def embed_fn(m):
        return embed(m, tokenizer, pieces, args.minilm_length)

    reference = embed_fn(bert)
    rows: Rows = []
    for opts in option_sets:
        row = {"model": "all-MiniLM-L6-v2", "length": args.minilm_length, "pieces": len(pieces),
               "options": opts, "label": options_label(opts)}
        try:
            r = compiled_run(bert, opts, embed_fn, args.runs)
            cos = (r["value"] * reference).sum(-1)
            row.update(cos_min=cos.min().item(), cos_mean=cos.mean().item(), first_call_s=r["first_call_s"],
                       run_s=r["run_s"], sites=r["sites"])
        except Exception as e:  # noqa: BLE001
            row.update(error=error_text(e))
        rows.append(row)
        measured = f"cos min {row['cos_min']:.6f} mean {row['cos_mean']:.6f}" if "cos_min" in row else ""
        report_row("MiniLM", row, measured)
    return rows


def print_tables(header: dict[str, Any], lm_rows: Rows, enc_rows: Rows) -> None:
    from tabulate import tabulate

    def done(r: dict[str, Any]) -> str:
        return r["error"] if "error" in r else sites_text(r.get("sites"))

    print("\n" + header_line(header))
    table = []
    for r in lm_rows:
        ppl = f"{r['ppl']:.4f}" if "ppl" in r else "error"
        change = f"{r['rel_change_pct']:+.4f}" if "ppl" in r and r["options"] is not None else ""
        density = f"{r['density']:.3f}" if r.get("density") is not None else ""
        table.append([r["length"], r["label"], ppl, change, density, seconds(r.get("first_call_s", math.nan)),
                      seconds(r.get("run_s", math.nan)), done(r)])
    print(tabulate(table, headers=["L", "SmolLM2-135M", "perplexity", "vs eager %", "block density",
                                   "first call s", "run s", "asam rewritten"], disable_numparse=True))
    if enc_rows:
        print(f"\nall-MiniLM-L6-v2: {enc_rows[0]['pieces']} pieces of {enc_rows[0]['length']} tokens, "
              "cosine to eager embeddings")
        table = [[r["label"], f"{r['cos_min']:.6f}" if "cos_min" in r else "error",
                  f"{r['cos_mean']:.6f}" if "cos_mean" in r else "", done(r)] for r in enc_rows]
        print(tabulate(table, headers=["options", "cos min", "cos mean", "asam rewritten"], disable_numparse=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--options", action="append", default=[], metavar="JSON",
                   help="an options dict for backend='asam' (repeatable); {} (exact) always runs first")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=int, default=1, help="timed calls after the first (compiling) one")
    p.add_argument("--pieces", type=int, default=16, help="MiniLM: pieces of the text embedded")
    p.add_argument("--minilm-length", type=int, default=512, help="MiniLM: tokens per piece (512 is its maximum)")
    p.add_argument("--no-minilm", action="store_true")
    p.add_argument("--pad", type=int, default=0, help="SmolLM2: a batch of two, the second left-padded by N tokens")
    p.add_argument("--density", action="store_true",
                   help="also replay each adaptive selection in an eager pass and report its mean block density")
    p.add_argument("--json", default="")
    args = p.parse_args()

    dtype = getattr(torch, args.dtype)
    option_sets = parse_options(args.options)
    header = run_header(args.device, workload=args.dtype)
    print(header_line(header), flush=True)

    lm_rows = run_smollm2(args, option_sets, dtype)
    enc_rows = [] if args.no_minilm else run_minilm(args, option_sets, dtype)
    print_tables(header, lm_rows, enc_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "args": vars(args), "smollm2": lm_rows, "minilm": enc_rows}, f,
                      indent=1, default=str)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
