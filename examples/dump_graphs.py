"""Dump the graphs asam rewrites, and read the dumps: the files written, the rewritten code, report.json.

`torch.compile(model, backend="asam", options={"dump_dir": DIR})` (or `ASAM_DUMP_DIR=DIR`) writes, for each
graph Dynamo hands to the backend, a folder `DIR/graph_NNN/` holding `00_input.py` (the graph as captured),
one readable `.py` after each pass (`01_normalize.py`, `02_match.py`, `03_plan.py`, `04_rewrite.py`) and `report.json`
(every attention candidate: rewritten into what, or refused and why).

The model here has two attention blocks written by hand: a causal one (nanoGPT style, tril buffer) that asam
rewrites, and one that also returns its attention probabilities, which asam must leave alone
(`PROBS_ESCAPE`: SDPA does not give them). The script prints the folder tree, the attention lines of the
graph before and after the rewrite, and the report.

    python examples/dump_graphs.py                           # CPU, seconds; dumps into a new temporary folder
    python examples/dump_graphs.py --dump-dir asam_dump      # keep them somewhere you choose
    python examples/dump_graphs.py --device cuda --seq 8192
    TORCH_LOGS="+asam_compile" python examples/dump_graphs.py   # also one log line per candidate decision
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import asam_compile


class CausalAttention(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class AttentionWithWeights(CausalAttention):
    """Returns its attention probabilities too (as `output_attentions=True` does): not rewritable."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        probs = F.softmax((q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1)), dim=-1)
        return self.proj((probs @ v).transpose(1, 2).reshape(B, T, C)), probs


class TwoBlocks(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.causal = CausalAttention(dim, heads, max_len)
        self.with_weights = AttentionWithWeights(dim, heads, max_len)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.causal(x)
        y, probs = self.with_weights(x)
        return x + y, probs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dump-dir", default=None, help="default: a new temporary folder")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def excerpt(path: Path, words: tuple[str, ...]) -> list[str]:
    """The lines of a dumped graph that mention one of `words`, each after its `# File: ...` source comment."""
    out, comment = [], None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("# File:"):
            comment = line
        elif any(w in line for w in words):
            if comment:
                out.append(comment)
                comment = None
            out.append(line)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dump_dir = Path(args.dump_dir or tempfile.mkdtemp(prefix="asam_dump_"))
    torch.manual_seed(0)
    model = TwoBlocks(args.dim, args.heads, args.seq).to(args.device).eval()
    x = torch.randn(2, args.seq, args.dim, device=args.device)

    with torch.no_grad():
        eager, _ = model(x)
        compiled = torch.compile(model, backend="asam", options={"dump_dir": str(dump_dir)})
        with asam_compile.capture() as cap:
            out, _ = compiled(x)

    graph_dirs = sorted(d for d in dump_dir.iterdir() if d.is_dir() and d.name.startswith("graph_"))
    print(f"dump folder: {dump_dir}")
    for d in graph_dirs:
        for f in sorted(d.iterdir()):
            print(f"  {f.relative_to(dump_dir)}  ({f.stat().st_size} bytes)")

    graph = graph_dirs[-1]
    rewritten = next(graph.glob("*_rewrite.py"))
    print(f"\nattention in {graph.name}/00_input.py (as Dynamo captured it):")
    for line in excerpt(graph / "00_input.py", ("softmax(", "masked_fill(", " @ ")):
        print(f"  {line}")
    print(f"\nthe same in {graph.name}/{rewritten.name} (after asam's passes; the refused site is left as written):")
    sdpa_lines = excerpt(rewritten, ("scaled_dot_product_attention(", "softmax(", " @ "))
    for line in sdpa_lines:
        print(f"  {line}")

    report = json.loads((graph / "report.json").read_text())
    print(f"\n{graph.name}/report.json, one line per candidate:")
    for c in report["candidates"]:
        print(f"  {c['module']:14s} {c['status']:9s} {c['target'] or c['reject']}  {c['reason'] or c['info']}")

    print()
    print(cap.report)
    err = (out - eager).abs().max().item()
    n_sdpa = sum(line.count("scaled_dot_product_attention(") for line in sdpa_lines)
    passed = cap.n_rewritten == 1 and n_sdpa == 1 and err <= 1e-4 * (1 + eager.abs().max().item())
    print(f"max |asam - eager| = {err:.2e} -> check {'passed' if passed else 'FAILED'} "
          "(one site rewritten, one refused, the dump shows the SDPA call)")
    return {"dump_dir": dump_dir, "files": [p for d in graph_dirs for p in sorted(d.iterdir())],
            "n_rewritten": cap.n_rewritten, "n_refused": len(cap.report.refused), "max_err": err,
            "passed": passed, "report": cap.report}


if __name__ == "__main__":
    raise SystemExit(0 if main()["passed"] else 1)
