"""Does the asam rewrite keep the real Gemma-3-270M's perplexity at long context, and does it fire on all 18 sites?

Perplexity of Gemma-3-270M (asam_compile/gemma3.py; float32, its own tokenizer, BOS first) on the first --length
tokens of the shipped long text (repeated past its 16,917 tokens: Note [Gemma-3 long text]), per mode:
  eager     attn_implementation="eager", uncompiled: the reference
  asam      the same model's body under torch.compile(backend="asam") (exact mode): must match within 1e-3 rel.
  asam-adaptive   the same with options={"mode": "adaptive", "min_seq_len": 0} (approximate; not by default)
  chunked   eager weights, attention recorded-style in exact SDPA row chunks (gemma3.record_qkv via="chunked")
The LM head runs outside the compiled body in chunks (gemma3.perplexity): all logits at 16k are 16 GiB. Each
row says how many attention sites asam found and rewrote, into what, and why any was refused. Times include the
first call's compile; compiled modes also time a second call.

    python benchmarks/exact/gemma3_perplexity.py --lengths 4096 --modes eager asam
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path
from typing import Any

import torch


def rewrites(cap: Any) -> tuple[str, list[str]]:
    """('18/18 (15 flex, 3 sdpa)', notes) from an asam_compile.capture()."""
    candidates = cap.report.candidates
    done = [c for c in candidates if c.status == "rewritten"]
    targets = collections.Counter(c.target or "?" for c in done)
    text = f"{len(done)}/{len(candidates)} (" + ", ".join(f"{n} {t}" for t, n in targets.most_common()) + ")"
    notes = [f"{n}x refused: {why}" for why, n in
             collections.Counter(c.reason for c in candidates if c.status != "rewritten").items()]
    notes += [f"{n}x {why}" for why, n in collections.Counter(
        str(c.info["adaptive"]) for c in candidates if "adaptive" in getattr(c, "info", {})).items()]
    for g in cap.reports:
        notes += [f"pass failed: {f}"[:160] for f in g.failures]
        if getattr(g, "inductor_fallback", None):
            notes.append(f"Inductor fell back: {g.inductor_fallback}"[:160])
    return text, notes


def run(mode: str, length: int) -> dict[str, Any]:
    import asam_compile
    from asam_compile import gemma3

    torch._dynamo.reset()
    model = gemma3.load_gemma3(dtype=torch.float32, attn_implementation="eager")
    ids = gemma3.text_ids(gemma3.Gemma3Tokenizer.from_gguf(), length)
    row: dict[str, Any] = {"mode": mode, "length": length}
    t0 = time.perf_counter()
    with torch.no_grad():
        if mode == "eager":
            row["ppl"] = gemma3.perplexity(model, ids)
        elif mode == "chunked":
            with gemma3.record_qkv(model, [], via="chunked"):
                row["ppl"] = gemma3.perplexity(model, ids)
        else:
            options = {"mode": "adaptive", "min_seq_len": 0} if mode == "asam-adaptive" else {}
            body = torch.compile(model.model, backend="asam", options=options)
            with asam_compile.capture() as cap:
                row["ppl"] = gemma3.perplexity(model, ids, body=body)
            row["rewrote"], row["notes"] = rewrites(cap)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            again = gemma3.perplexity(model, ids, body=body)
            row["seconds_again"] = round(time.perf_counter() - t0, 1)
            if again != row["ppl"]:
                row["notes"].append(f"second call gave {again}")
            return row
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096])
    p.add_argument("--modes", nargs="+", default=["eager", "asam"],
                   choices=["eager", "asam", "asam-adaptive", "chunked"])
    p.add_argument("--json", default=None, help="rows are appended to this file's list, if it exists")
    args = p.parse_args()

    from tabulate import tabulate

    from asam_compile.measure import header_line, run_header

    header = run_header("cpu", workload="Gemma-3-270M perplexity on the long text, float32")
    print(header_line(header), flush=True)
    rows = []
    for length in args.lengths:
        for mode in args.modes:
            rows.append({**run(mode, length), "header": header})
            r = rows[-1]
            print(f"{mode} {length}: ppl {r['ppl']:.4f} in {r['seconds']} s {r.get('rewrote', '')} "
                  f"{'; '.join(r.get('notes', []))}", flush=True)
    ref = {r["length"]: r["ppl"] for r in rows if r["mode"] == "eager"}
    table = [[r["length"], r["mode"], f"{r['ppl']:.5f}",
              f"{(r['ppl'] - ref[r['length']]) / ref[r['length']]:+.2e}" if r["length"] in ref else "-",
              r["seconds"], r.get("seconds_again", "-"), r.get("rewrote", "-"), "; ".join(r.get("notes", []))]
             for r in rows]
    print(tabulate(table, headers=["tokens", "mode", "perplexity", "rel. to eager", "s (first call)", "s (again)",
                                   "asam rewrote", "notes"]))
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(old + rows, indent=1))


if __name__ == "__main__":
    main()
