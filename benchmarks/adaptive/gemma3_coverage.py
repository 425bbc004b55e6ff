"""What per-layer coverage does the whole Gemma-3-270M need to keep its perplexity within +0.5 % at 16k?

Only 3 of its 18 layers (5, 11, 17) are global; the others are a 512-token sliding window and stay exact here.
Per-layer coverage 0.995 may be stricter than the model needs. Perplexity of Gemma-3-270M (asam_compile/gemma3.py;
float32, its own tokenizer, BOS first, CPU) on the first --length tokens of the long text, with an attention
function (registered with sdpa_mask as its mask function, Note [Recording attention inputs] in gemma3.py) that runs
the sliding-window layers as exact chunked SDPA (`gemma3.chunked_sdpa_attention`) and, on the global layers, keeps
only the (query block, key block) pairs of a block selection:
  exact        every causal block (the baseline; the same code path as the others)
  pooled       select_blocks, estimator "pooled" (the package's default), max_density 1.0 (no head falls back)
  sampled      select_blocks, estimator "sampled", max_density 1.0
  pooled_q     select_blocks, estimator "pooled_q", max_density 1.0
  oracle-avg   per query block, besides the forced blocks, the fewest key blocks (largest first) whose true mass
               averaged over the block's rows brings the total to the coverage: what the package's rule would
               keep with a perfect estimate (from this layer's exact softmax, in this run)
All selections keep the package's forced blocks (sinks=1, window=2). The global layers' attention is computed in
float32 chunks of --chunk query rows, each against the keys up to its last row: the exact causal softmax p, then
the output from p restricted to the kept blocks and renormalised (equal to a softmax over the kept scores).

Per configuration: perplexity, its change against the exact row of the same run, and per global layer the block
density (kept / causal allowed blocks, summed over query blocks: the share of the causal block work a
block-sparse kernel does, 1/density its best speed-up) and the true attention mass the kept blocks hold (mean
over rows and heads; worst row).

    python benchmarks/adaptive/gemma3_coverage.py --length 8192                    # all selections, ~25 min on 2 cores
    python benchmarks/adaptive/gemma3_coverage.py --selections exact oracle-avg --coverages 0.95 0.9
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from asam_compile.config import ESTIMATORS, SparseSettings
from asam_compile.kernels.selection import forced_blocks, select_blocks, take_by_coverage

F = torch.nn.functional

SELECTIONS = ("exact", *ESTIMATORS, "oracle-avg")
ATTENTION_NAME = "asam_gemma3_coverage"


@dataclasses.dataclass(frozen=True)
class Config:
    """One run: which selection the global layers use, at which coverage and block size."""

    selection: str  # one of SELECTIONS
    coverage: float  # share of the (estimated or true) mass each query block keeps; unused by "exact"
    block: int  # selection block size

    @property
    def name(self) -> str:
        return "exact" if self.selection == "exact" else f"{self.selection} c={self.coverage} b={self.block}"

    def settings(self) -> SparseSettings:
        estimator = self.selection if self.selection in ESTIMATORS else "pooled"
        return SparseSettings.checked(block_size=self.block, coverage=self.coverage, max_density=1.0,
                                      min_seq_len=0, window=2, sinks=1, estimator=estimator)


def global_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, config: Config, chunk: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Causal attention keeping only the selected blocks (module docstring): output (B, L, Hq, E) and the
    layer's statistics (density and kept true mass, per head)."""
    B, H, L, E = query.shape
    settings = config.settings()
    bs = settings.block_size
    if chunk % bs:
        raise ValueError(f"--chunk {chunk} must be a multiple of the block size {bs}")
    QB = -(-L // bs)
    forced, allowed, _ = forced_blocks(L, L, causal=True, settings=settings, device=query.device)  # (QB, KB)
    if config.selection in ESTIMATORS:
        kept = select_blocks(query, key, scale=scale, causal=True, settings=settings)[0]  # (B, H, QB, KB)
    elif config.selection == "exact":
        kept = allowed.expand(B, H, QB, QB).clone()
    else:  # oracle-avg: filled chunk by chunk below
        kept = torch.zeros(B, H, QB, QB, dtype=torch.bool, device=query.device)
    q, k, v = query.float(), key.float(), value.float()  # (B, Hkv, L, E): broadcast over the query heads
    if k.shape[1] not in (1, H):
        k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    mass_sum = torch.zeros(B, H, dtype=torch.float64, device=query.device)
    mass_worst = torch.ones(B, H, device=query.device)
    outs = []
    for s0 in range(0, L, chunk):
        s1 = min(s0 + chunk, L)
        KBc = -(-s1 // bs)
        rows = torch.arange(s0, s1, device=query.device)
        scores = (q[:, :, s0:s1] @ k[:, :, :s1].transpose(-2, -1)) * scale  # (B, H, R, s1)
        visible = torch.arange(s1, device=query.device)[None, :] <= rows[:, None]
        if mask is not None:  # sdpa_mask gives None for plain causal; anything else is honoured as well
            visible = visible & mask[:, :, s0:s1, :s1]
        p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        del scores
        m = F.pad(p, (0, KBc * bs - s1)).view(B, H, s1 - s0, KBc, bs).sum(-1)  # (B, H, R, KBc): block mass per row
        qb0, qb1 = s0 // bs, -(-s1 // bs)
        if config.selection == "oracle-avg":
            n_rows = (torch.clamp(torch.arange(qb0 + 1, qb1 + 1, device=query.device) * bs, max=s1)
                      - torch.arange(qb0, qb1, device=query.device) * bs)
            avg = F.pad(m, (0, 0, 0, (qb1 - qb0) * bs - (s1 - s0))).view(B, H, qb1 - qb0, bs, KBc).sum(3)
            avg = F.pad(avg / n_rows.view(-1, 1), (0, QB - KBc))  # (B, H, nq, KB)
            f, a = forced[qb0:qb1], allowed[qb0:qb1]
            need = settings.coverage - (avg * f).sum(-1, keepdim=True)
            kept[:, :, qb0:qb1] = f | take_by_coverage(avg.masked_fill(f | ~a, 0.0), need)
        kept_rows = kept[:, :, rows // bs, :KBc]  # (B, H, R, KBc)
        held = (m * kept_rows).sum(-1)  # (B, H, R): true mass of the kept blocks
        mass_sum += held.double().sum(-1)
        mass_worst = torch.minimum(mass_worst, held.amin(-1))
        keep = kept_rows.repeat_interleave(bs, -1)[..., :s1]
        outs.append(((p * keep) @ v[:, :, :s1]) / held[..., None])
        del p, keep
    n_allowed = allowed.sum()
    density = kept.sum((-2, -1)).double() / n_allowed  # (B, H)
    stats = {"density": float(density.mean()), "density_heads": density.mean(0).tolist(),
             "mass_mean": float(mass_sum.mean() / L), "mass_mean_heads": (mass_sum.mean(0) / L).tolist(),
             "mass_worst": float(mass_worst.min()), "blocks_kept": int(kept.sum()),
             "blocks_allowed": int(n_allowed) * B * H}
    return torch.cat(outs, dim=2).to(query.dtype).transpose(1, 2).contiguous(), stats


def run(model: torch.nn.Module, ids: torch.Tensor, config: Config, chunk: int) -> dict[str, Any]:
    """Perplexity with `config` on the global layers, exact chunked SDPA on the others; and the global layers'
    statistics."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from asam_compile import gemma3

    global_layers = set(gemma3.global_layers(model))
    stats: dict[int, dict[str, Any]] = {}

    def coverage_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if module.layer_idx not in global_layers:
            return gemma3.chunked_sdpa_attention(module, query, key, value, attention_mask, dropout=dropout,
                                                 scaling=scaling, **kwargs)
        out, stats[module.layer_idx] = global_attention(query, key, value, attention_mask, scaling, config, chunk)
        return out, None

    coverage_attention.__name__ = ATTENTION_NAME
    # registered in both interfaces: a name without a mask function gets attention_mask=None and the sliding
    # window layers would see everything (Note [Gemma-3 from GGUF in transformers 5.17])
    AttentionInterface.register(ATTENTION_NAME, coverage_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    t0 = time.perf_counter()
    try:
        ppl = gemma3.perplexity(model, ids)
    finally:
        model.set_attn_implementation(before)
    if set(stats) != global_layers:
        raise RuntimeError(f"global layers {sorted(global_layers - set(stats))} did not run the selection")
    return {"selection": config.selection, "coverage": None if config.selection == "exact" else config.coverage,
            "block": config.block, "length": ids.shape[1], "ppl": ppl, "seconds": round(time.perf_counter() - t0, 1),
            "layers": {str(n): stats[n] for n in sorted(stats)}}


def table(rows: list[dict[str, Any]], layers: list[str], reference: float | None = None) -> str:
    """The rows as text; changes against the exact row, else against `reference`."""
    from tabulate import tabulate

    exact = next((r["ppl"] for r in rows if r["selection"] == "exact"), reference)
    body = []
    for r in rows:
        change = f"{100 * (r['ppl'] / exact - 1):+.3f} %" if exact else "-"
        mean_density = sum(r["layers"][n]["density"] for n in layers) / len(layers)
        body.append([r["selection"], r["coverage"] or "-", r["block"], f"{r['ppl']:.5f}", change]
                    + [f"{r['layers'][n]['density']:.3f}" for n in layers] + [f"{mean_density:.3f}"]
                    + [f"{r['layers'][n]['mass_mean']:.4f} / {r['layers'][n]['mass_worst']:.3f}" for n in layers]
                    + [r["seconds"]])
    return tabulate(body, headers=["selection", "coverage", "block", "ppl", "vs exact"]
                    + [f"density L{n}" for n in layers] + ["mean"]
                    + [f"mass L{n} mean / worst" for n in layers] + ["s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=16384, help="tokens of the long text (8192 is about 4x faster)")
    p.add_argument("--selections", nargs="+", default=list(SELECTIONS), choices=SELECTIONS)
    p.add_argument("--coverages", type=float, nargs="+", default=[0.995, 0.99, 0.98, 0.95, 0.9])
    p.add_argument("--blocks", type=int, nargs="+", default=[128])
    p.add_argument("--configs", nargs="+", default=[], metavar="SELECTION:COVERAGE:BLOCK",
                   help="explicit configurations instead of the product of the three options above")
    p.add_argument("--chunk", type=int, default=512, help="query rows per exact softmax on the global layers")
    p.add_argument("--json", default=None, help="default benchmarks/results/<date>_cpu_gemma3_coverage_<len>.json")
    p.add_argument("--append", action="store_true", help="add to the rows already in --json")
    p.add_argument("--reference-ppl", type=float, default=None,
                   help="the exact perplexity, for the changes when no exact row is run (16k: eager 8.40763401525928, "
                        "results/2026-12-04_cpu_gemma3_perplexity_4k_16k.json)")
    args = p.parse_args()

    from asam_compile import gemma3
    from asam_compile.measure import header_line, run_header

    if args.configs:
        configs = [Config(s, float(c), int(b)) for s, c, b in (spec.split(":") for spec in args.configs)]
    else:
        configs = [Config(s, c, b) for s in args.selections for b in args.blocks
                   for c in ([args.coverages[0]] if s == "exact" else args.coverages)]
        configs = list(dict.fromkeys(Config("exact", 1.0, args.blocks[0]) if c.selection == "exact" else c
                                     for c in configs))
    header = run_header("cpu", workload=f"Gemma-3-270M float32 perplexity, {args.length} tokens, block selections "
                                        "on the global layers (sinks 1, window 2, max_density 1.0), others exact")
    print(header_line(header), flush=True)
    path = Path(args.json or f"benchmarks/results/{header['date'][:10]}_cpu_gemma3_coverage_{args.length}.json")
    rows: list[dict[str, Any]] = []
    if args.append and path.exists():
        rows = json.loads(path.read_text())["rows"]
    model = gemma3.load_gemma3(dtype=torch.float32)
    ids = gemma3.text_ids(gemma3.Gemma3Tokenizer.from_gguf(), args.length)
    layers = [str(n) for n in gemma3.global_layers(model)]
    with torch.no_grad():
        for config in configs:
            row = run(model, ids, config, args.chunk)
            row["header"] = header
            rows.append(row)
            dens = " ".join(f"L{n} {row['layers'][n]['density']:.3f}" for n in layers)
            print(f"{config.name}: ppl {row['ppl']:.5f}, density {dens}, {row['seconds']} s", flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"header": header, "question": __doc__.splitlines()[0],
                                        "reference_ppl": args.reference_ppl, "rows": rows}, indent=1))
    print(f"\n{args.length} tokens; density = kept / causal allowed blocks; mass = true attention mass kept "
          "(mean over rows and heads / worst row)")
    print(table(rows, layers, args.reference_ppl))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
