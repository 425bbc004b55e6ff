"""How much of the true attention mass does the adaptive selection keep, layer by layer, on real SmolLM2 attention?

One eager forward of SmolLM2-135M (the shipped text, float32, CPU is fine); on every layer the selection
(asam_compile.kernels.selection.select_blocks, as the compiled sites run it) is replayed on that layer's q and k, and the
blocks it keeps are held against the layer's true attention probabilities. Per setting: the mean share of each
query row's mass that its kept blocks hold ("lost" = 1 - that), the 1st percentile over query rows, and the
block density (kept / allowed). Nothing is compiled: a quick way to compare selection rules before a perplexity
run.

--pad N makes a batch of two, the second row the same text left-padded by N tokens (attention_mask 0 there), and
replays the selection inside that row's padding mask as adaptive_masked_call does, with or without the valid-rows
pooling (Note [Valid rows of a masked block]); only the padded row is reported then. --extra K adds, after the
coverage rule, the K best-estimated blocks of each row (a floor; not a setting of the package).

    python benchmarks/adaptive/replay_selection.py --length 8192 --coverages 0.995 0.99 --extra 0 2 4
    python benchmarks/adaptive/replay_selection.py --length 2048 --block 32 --pad 500 --valid-rows both
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from asam_compile.measure import header_line, run_header
from bench_adaptive import mask_blocks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for real_models.py (its docstring)
from real_models import load_smollm2, long_text  # noqa: E402


def extra_blocks(k: int) -> Any:
    """A ranking rule for selection.select_blocks(take=...): take_by_coverage plus each row's k best-estimated
    blocks (None: the package's rule)."""
    from asam_compile.kernels.selection import take_by_coverage

    def take(rest: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        kept = take_by_coverage(rest, need)
        top = rest.topk(min(k, rest.shape[-1]), dim=-1)
        return kept | torch.zeros_like(kept).scatter(-1, top.indices, top.values > 0)

    return take if k else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--coverages", type=float, nargs="+", default=[0.995, 0.99])
    p.add_argument("--extra", type=int, nargs="+", default=[0])
    p.add_argument("--max-density", type=float, default=0.5)
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--sinks", type=int, default=1)
    p.add_argument("--pad", type=int, default=0)
    p.add_argument("--valid-rows", choices=["on", "off", "both"], default="on",
                   help="--pad: pool the padded row's blocks over valid rows only (the package's way), or not")
    p.add_argument("--json", default="")
    args = p.parse_args()

    from asam_compile.kernels import selection
    from transformers.models.llama import modeling_llama

    L, bs = args.length, args.block
    header = run_header("cpu", workload="SmolLM2-135M float32 eager")
    print(header_line(header), flush=True)
    model, tokenizer = load_smollm2()
    ids = tokenizer(long_text(), return_tensors="pt").input_ids[0, :L]
    keep = torch.ones(1, L, dtype=torch.bool)
    if args.pad:
        ids = torch.stack([ids, torch.cat([torch.zeros(args.pad, dtype=ids.dtype), ids[:L - args.pad]])])
        keep = torch.ones(2, L, dtype=torch.bool)
        keep[1, :args.pad] = False
    else:
        ids = ids[None]
    row = ids.shape[0] - 1  # the padded row, or the only one
    i = torch.arange(L)
    mask = (i[None, :] <= i[:, None]) & keep[row][None, :]
    blocks = mask_blocks(mask[None, None], bs) if args.pad else None
    valid_modes = {"on": [True], "off": [False], "both": [True, False]}[args.valid_rows] if args.pad else [False]
    settings = [(c, x, v) for c in args.coverages for x in args.extra for v in valid_modes]
    stats: dict[str, list[dict[str, Any]]] = {}

    def label(c: float, x: int, v: bool) -> str:
        return f"coverage {c}" + (f" +{x} blocks" if x else "") + ((" valid rows" if v else " all rows") if args.pad else "")

    original = modeling_llama.eager_attention_forward

    def replay(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out, probs = original(module, query, key, value, attention_mask, scaling, dropout=dropout, **kwargs)
        k = modeling_llama.repeat_kv(key, module.num_key_value_groups)[row:row + 1].float()
        q = query[row:row + 1].float()
        QB = -(-L // bs)
        P = F.pad(probs[row].float(), (0, QB * bs - L, 0, QB * bs - L))
        mass = P.view(P.shape[0], QB, bs, QB, bs).sum(-1)  # (H, QB, rows, KB): true mass per query row and block
        real = F.pad(keep[row], (0, QB * bs - L)).view(QB, bs)[None].expand(mass.shape[:3])  # query rows that count
        del P
        for c, x, v in settings:
            st = selection.SparseSettings(bs, c, args.max_density, 0, args.window, args.sinks)
            diag = mask.diagonal()[None, None]
            kept, _, allowed = selection.select_blocks(q, k, scale=scaling, causal=not args.pad, settings=st,
                                                      blocks=blocks, valid=(diag, diag) if v else None,
                                                      take=extra_blocks(x))
            held = (mass * kept[0][:, :, None, :].float()).sum(-1)[real]
            stats.setdefault(label(c, x, v), []).append({
                "layer": module.layer_idx, "lost": float(1 - held.mean()),
                "p01": float(held.kthvalue(max(1, held.numel() // 100)).values),
                "density": selection.block_density(kept, allowed)})
        return out, None

    modeling_llama.eager_attention_forward = replay
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=keep.long(), use_cache=False, logits_to_keep=1)
    finally:
        modeling_llama.eager_attention_forward = original

    from tabulate import tabulate

    rows = []
    for name, layers in stats.items():
        worst = max(layers, key=lambda s: s["lost"])
        n = len(layers)
        rows.append([name, f"{100 * sum(s['lost'] for s in layers) / n:.3f}",
                     f"{sum(s['p01'] for s in layers) / n:.4f}", f"{sum(s['density'] for s in layers) / n:.3f}",
                     f"{worst['layer']} ({100 * worst['lost']:.2f})"])
    what = f"row left-padded by {args.pad}" if args.pad else "causal"
    print(f"SmolLM2-135M, {L} tokens, block {bs}, {what}; mean over {n} layers")
    print(tabulate(rows, headers=["setting", "lost mass %", "1st pct. of kept mass", "density", "worst layer (lost %)"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "args": vars(args), "layers": stats}, f, indent=2)


if __name__ == "__main__":
    main()
