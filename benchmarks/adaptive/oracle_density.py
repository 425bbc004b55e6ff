"""How block-sparse is Gemma-3's real global attention at long context, and how close does the estimator get?

For each global layer and head of Gemma-3-270M (q, k, v from gemma3_qkv.py, or recorded here), the ORACLE block
density: per query block, the fewest causal key blocks that hold a share `c` of the true attention mass, against
the key blocks causality allows; then, for the project's estimator (`select_blocks` with max_density=1.0, so no
head is sent back to exact), the density it picks and the true mass its blocks hold.

Definitions (block size b; query block i holds rows ib .. ib+b-1; it is allowed key blocks 0..i, i+1 of them):
  - p_r: row r's exact causal softmax (float32, computed in chunks of query rows); m_r[j] = sum of p_r over key
    block j (sum_j m_r[j] = 1).
  - "avg": the fewest blocks, largest first, of the row-averaged mass M[j] = mean_r m_r[j] over the block's rows
    whose sum reaches c: the block holds c of the mass of its rows on average (a row may get less).
  - "strict": every row of the block must keep >= c of its own mass with one block set shared by the rows. The
    exact minimum is a covering problem; reported as the shortest prefix of the "avg" ranking that satisfies every
    row (an upper bound; what a selection ranking blocks by their mean mass needs), and "strict_lb", the largest
    over the block's rows of that row's own fewest blocks (a lower bound on any shared set).
  - density: mean over query blocks of (kept blocks / (i + 1)), the query blocks of the rows measured. The JSON
    also has "..._w" = sum(kept) / sum(allowed), as the package's block_density counts (late query blocks weigh
    more: that is the share of the causal block work done); the summary table prints both.
  - estimator rows: `select_blocks` over the whole sequence (it pools every query block), with the package's
    forced blocks (sinks=1, window=2) and max_density=1.0; "mass" is each measured row's sum of m_r over the kept
    blocks: mean over rows and worst row.

    python benchmarks/adaptive/oracle_density.py --qkv benchmarks/data_local/gemma3_qkv_16k      # all rows
    python benchmarks/adaptive/oracle_density.py --qkv DIR --rows 8192 16384 --device cuda
    python benchmarks/adaptive/oracle_density.py --length 4096      # records q, k, v first (CPU, about a minute)
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/adaptive, for gemma3_qkv.py
from gemma3_qkv import load_layer  # noqa: E402


def estimator_api() -> tuple[str, Any, Any]:
    """(module name, select_blocks, SparseSettings) wherever the package keeps them now (the kernels/ move)."""
    for name in ("asam_compile.kernels.selection", "asam_compile.kernels.adaptive", "asam_compile.adaptive"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "select_blocks"):
            settings = getattr(module, "SparseSettings", None)
            if settings is None:
                settings = importlib.import_module("asam_compile.config").SparseSettings
            return name, module.select_blocks, settings
    raise ImportError("no select_blocks in asam_compile.kernels.selection, .kernels.adaptive or .adaptive")


def _fewest(mass: torch.Tensor, c: float) -> torch.Tensor:
    """Fewest entries along the last dim, largest first, whose sum reaches c (rounding: at most all of them)."""
    ranked = torch.sort(mass, dim=-1, descending=True).values
    before = torch.cumsum(ranked, -1) - ranked
    return ((before < c) & (ranked > 0)).sum(-1).clamp(min=1)


def block_mass_rows(q: torch.Tensor, k: torch.Tensor, scale: float, start: int, end: int, bs: int) -> torch.Tensor:
    """m_r for rows start..end-1 (causal): (H, rows, KB) float32, key blocks of bs up to the chunk's last row."""
    kk = k[0, :, :end].float()
    if kk.shape[0] != q.shape[1]:
        kk = kk.repeat_interleave(q.shape[1] // kk.shape[0], 0)
    scores = (q[0, :, start:end].float() @ kk.transpose(-2, -1)) * scale  # (H, rows, end)
    rows = torch.arange(start, end, device=q.device)[:, None]
    scores.masked_fill_(torch.arange(end, device=q.device)[None, :] > rows, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    KB = -(-end // bs)
    p = torch.nn.functional.pad(p, (0, KB * bs - end))
    return p.view(*p.shape[:2], KB, bs).sum(-1)


def measure_layer(q: torch.Tensor, k: torch.Tensor, scale: float, rows: tuple[int, int], blocks: list[int],
                  coverages: list[float], est_coverages: list[float], estimators: list[str], chunk: int,
                  api: tuple[str, Any, Any]) -> dict[str, Any]:
    """Per head: the oracle densities and the estimators' density and kept mass (module docstring)."""
    _, select_blocks, Settings = api
    H, L = q.shape[1], q.shape[2]
    big = max(blocks)
    start, stop = rows
    if start % big or (stop % big and stop != L) or chunk % big:
        raise ValueError(f"rows {rows} and --chunk {chunk} must be multiples of the largest block ({big})")
    kept_sel = {}
    for bs in blocks:
        for est in estimators:
            for c in est_coverages:
                s = Settings(block_size=bs, coverage=c, max_density=1.0, min_seq_len=0, window=2, sinks=1,
                             estimator=est)
                kept_sel[bs, est, c] = select_blocks(q, k, scale=scale, causal=True, settings=s)[0][0]  # (H, QB, KB)
    acc: dict[tuple, torch.Tensor] = {}

    def add(key: tuple, value: torch.Tensor) -> None:  # sums over query blocks (or rows), per head
        acc[key] = acc.get(key, 0) + value.double().sum(-1)

    def low(key: tuple, value: torch.Tensor) -> None:
        acc[key] = torch.minimum(acc[key], value.amin(-1)) if key in acc else value.amin(-1)

    for s0 in range(start, stop, chunk):
        s1 = min(s0 + chunk, stop)
        m_fine = block_mass_rows(q, k, scale, s0, s1, min(blocks))  # (H, R, KB_fine)
        for bs in blocks:
            f = bs // min(blocks)
            KB = -(-s1 // bs)
            m = torch.nn.functional.pad(m_fine, (0, KB * f - m_fine.shape[-1])).view(H, s1 - s0, KB, f).sum(-1)
            nq = -(-(s1 - s0) // bs)
            first_block = s0 // bs
            qb = torch.arange(first_block, first_block + nq, device=q.device)
            allowed = (qb + 1).double()  # (nq,)
            # rows grouped by query block; a last partial block (L not a multiple of bs) is padded with zero rows
            pad_rows = nq * bs - (s1 - s0)
            mrow = torch.nn.functional.pad(m, (0, 0, 0, pad_rows)).view(H, nq, bs, KB)
            real = torch.nn.functional.pad(torch.ones(s1 - s0, device=q.device), (0, pad_rows)).view(nq, bs) > 0
            avg = mrow.sum(2) / real.sum(-1).view(1, nq, 1)  # (H, nq, KB): M[j]
            order = torch.sort(avg, dim=-1, descending=True).indices
            along = torch.gather(mrow, 3, order[:, :, None, :].expand_as(mrow)).cumsum(-1)  # rows along M's ranking
            add(("n_blocks", bs), torch.full((H, nq), 1.0, device=q.device))
            add(("n_allowed", bs), allowed.expand(H, nq))
            for c in coverages:
                n_avg = _fewest(avg, c)
                n_row = _fewest(mrow, c)  # (H, nq, bs)
                need = ((along - mrow.gather(3, order[:, :, None, :].expand_as(mrow))) < c).sum(-1).clamp(min=1)
                n_strict = torch.where(real, need, 0).amax(-1).clamp(max=KB)
                n_lb = torch.where(real, n_row, 0).amax(-1)
                for name, n in (("avg", n_avg), ("strict", n_strict), ("strict_lb", n_lb)):
                    add(("oracle", bs, c, name), n.double().clamp(max=allowed) / allowed)
                    add(("oracle_kept", bs, c, name), n.double().clamp(max=allowed))
            for est in estimators:
                for c in est_coverages:
                    kept = kept_sel[bs, est, c][:, first_block:first_block + nq, :KB]  # (H, nq, KB)
                    add(("est_density", bs, est, c), kept.sum(-1).double() / allowed)
                    add(("est_kept", bs, est, c), kept.sum(-1).double())
                    held = (mrow * kept[:, :, None, :]).sum(-1)  # (H, nq, bs)
                    held_rows = held.reshape(H, -1)[:, : s1 - s0]
                    add(("est_mass", bs, est, c), held_rows)
                    low(("est_worst", bs, est, c), held_rows)
        add(("n_rows",), torch.ones(H, s1 - s0, device=q.device))

    n_rows = acc[("n_rows",)]
    out: dict[str, Any] = {"oracle": [], "estimator": []}
    for h in range(H):
        for bs in blocks:
            nqb = float(acc[("n_blocks", bs)][h])
            n_allowed = float(acc[("n_allowed", bs)][h])
            for c in coverages:
                row = {"head": h, "block": bs, "coverage": c}
                for name in ("strict", "strict_lb", "avg"):
                    row[name] = float(acc[("oracle", bs, c, name)][h]) / nqb
                    row[name + "_w"] = float(acc[("oracle_kept", bs, c, name)][h]) / n_allowed
                out["oracle"].append(row)
            for est in estimators:
                for c in est_coverages:
                    out["estimator"].append({
                        "head": h, "block": bs, "estimator": est, "coverage": c,
                        "density": float(acc[("est_density", bs, est, c)][h]) / nqb,
                        "density_w": float(acc[("est_kept", bs, est, c)][h]) / n_allowed,
                        "mass_mean": float(acc[("est_mass", bs, est, c)][h] / n_rows[h]),
                        "mass_worst": float(acc[("est_worst", bs, est, c)][h])})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qkv", default=None, help="folder written by gemma3_qkv.py (default: record them now)")
    p.add_argument("--length", type=int, default=16384, help="tokens, when recording here")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="default: the saved (or global) layers")
    p.add_argument("--rows", type=int, nargs=2, default=None, metavar=("START", "END"),
                   help="query rows measured (default all); multiples of the largest block")
    p.add_argument("--blocks", type=int, nargs="+", default=[128, 64])
    p.add_argument("--coverages", type=float, nargs="+", default=[0.995, 0.99, 0.95, 0.9])
    p.add_argument("--est-coverages", type=float, nargs="+", default=[0.995, 0.99, 0.95])
    p.add_argument("--estimators", nargs="+", default=["pooled", "sampled"])
    p.add_argument("--chunk", type=int, default=512, help="query rows per exact softmax (memory: H*chunk*L floats)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from tabulate import tabulate

    from asam_compile.measure import header_line, run_header

    api = estimator_api()
    header = run_header(args.device, workload=f"Gemma-3-270M oracle block density, select_blocks from {api[0]}")
    print(header_line(header))
    if args.qkv is None:
        from asam_compile import gemma3

        model = gemma3.load_gemma3()
        ids = gemma3.text_ids(gemma3.Gemma3Tokenizer.from_gguf(), args.length)
        layers = args.layers or list(gemma3.global_layers(model))
        with torch.no_grad(), gemma3.record_qkv(model, layers, via="chunked") as saved:
            model.model(input_ids=ids, use_cache=False)
        tensors = {n: (saved[n]["q"], saved[n]["k"], saved[n]["v"], saved[n]["scaling"]) for n in layers}
        source = f"recorded now, {args.length} tokens"
        del model
    else:
        manifest = json.loads((Path(args.qkv) / "manifest.json").read_text())
        layers = args.layers or manifest["layers"]
        tensors = {}
        for n in layers:
            q, k, v, _ = load_layer(args.qkv, n)
            tensors[n] = (q, k, v, manifest["scale"])
        source = f"{args.qkv} ({manifest['length']} tokens, recorded via {manifest['via']})"
    results: dict[str, Any] = {"header": header, "source": source, "select_blocks": api[0], "args": vars(args),
                               "layers": {}}
    for n in layers:
        q, k, _, scale = tensors[n]
        q, k = q.to(args.device), k.to(args.device)
        L = q.shape[2]
        rows = tuple(args.rows) if args.rows else (0, L)
        t0 = time.perf_counter()
        results["layers"][n] = {"rows": rows, **measure_layer(q, k, scale, rows, args.blocks, args.coverages,
                                                              args.est_coverages, args.estimators, args.chunk, api)}
        print(f"layer {n}: L={L}, rows {rows[0]}-{rows[1]}, {time.perf_counter() - t0:.1f} s", flush=True)
    results["source"] = source

    print(f"\nq, k from {source}; density = mean over query blocks of kept / allowed causal blocks")
    for bs in args.blocks:
        table = []
        for n in layers:
            res = results["layers"][n]
            for h in range(q.shape[1]):
                r = {(o["coverage"]): o for o in res["oracle"] if o["head"] == h and o["block"] == bs}
                table.append([n, h, f"{res['rows'][0]}-{res['rows'][1]}"]
                             + [f"{r[c]['strict']:.3f} [{r[c]['strict_lb']:.3f}] / {r[c]['avg']:.3f}"
                                for c in args.coverages])
        print(f"\nORACLE, block {bs}: strict [strict lower bound] / avg-row")
        print(tabulate(table, headers=["layer", "head", "rows"] + [f"c={c}" for c in args.coverages]))
        table = []
        for n in layers:
            res = results["layers"][n]
            for e in res["estimator"]:
                if e["block"] != bs:
                    continue
                o = next(o for o in res["oracle"] if o["head"] == e["head"] and o["block"] == bs
                         and o["coverage"] == e["coverage"])
                table.append([n, e["head"], e["estimator"], e["coverage"], f"{e['density']:.3f}",
                              f"{o['strict']:.3f} / {o['avg']:.3f}", f"{e['mass_mean']:.4f}", f"{e['mass_worst']:.4f}"])
        print(f"\nESTIMATOR select_blocks ({api[0]}), block {bs}, max_density 1.0, sinks 1, window 2")
        print(tabulate(table, headers=["layer", "head", "estimator", "coverage", "density", "oracle strict / avg",
                                       "true mass kept (mean)", "(worst row)"]))
    print("\nSUMMARY: mean over heads of the oracle, avg-row / strict; in brackets sum(kept) / sum(allowed)")
    table = []
    for n in layers:
        for bs in args.blocks:
            rows_ = [o for o in results["layers"][n]["oracle"] if o["block"] == bs]
            cells = []
            for c in args.coverages:
                sel = [o for o in rows_ if o["coverage"] == c]
                mean = lambda key: sum(o[key] for o in sel) / len(sel)  # noqa: E731
                cells.append(f"{mean('avg'):.3f} [{mean('avg_w'):.3f}] / {mean('strict'):.3f} [{mean('strict_w'):.3f}]")
            table.append([n, bs] + cells)
    print(tabulate(table, headers=["layer", "block"] + [f"c={c}" for c in args.coverages]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
