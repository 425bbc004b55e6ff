"""Adaptive sparse attention on chosen layers of an unmodified HF Llama (opt-in, approximate).

Builds a small LlamaForCausalLM from a config (random weights, nothing downloaded), marks its last two layers
with `asam_compile.sparse(...)`, compiles it with `backend="asam"`, and prints which attention sites went
adaptive (the others stay exact SDPA), with the error of the logits against the uncompiled model.

    python examples/adaptive_sparse.py                       # CPU, about a minute
    python examples/adaptive_sparse.py --device cuda --dtype bfloat16 --seq 16384 --layers 8 --hidden 1024

Random weights give diffuse attention, where the selection keeps most blocks; real models are sparser
(benchmarks/RESULTS.md has perplexity on SmolLM2).
"""

from __future__ import annotations

import argparse

import torch

import asam_compile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--coverage", type=float, default=0.995)
    args = p.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(4, args.hidden // 64), num_key_value_heads=max(2, args.hidden // 256),
        vocab_size=1000, max_position_embeddings=args.seq, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().to(args.device, getattr(torch, args.dtype))
    ids = torch.randint(0, 1000, (1, args.seq), device=args.device)

    with torch.no_grad():
        reference = model(ids).logits
    # the last two layers go sparse; min_seq_len=0 so that the short CPU default is not kept exact
    asam_compile.sparse(model.model.layers[-2:], coverage=args.coverage, min_seq_len=0)
    compiled = torch.compile(model, backend="asam")
    with torch.no_grad(), asam_compile.capture() as cap:
        logits = compiled(ids).logits
    for c in cap.report.candidates:
        print(f"{c.module:32s} {c.target or 'refused':9s} {c.info.get('adaptive', '')}")
    err = ((logits.float() - reference.float()).norm() / reference.float().norm()).item()
    print(f"relative error of the logits against the uncompiled model: {err:.2e}")


if __name__ == "__main__":
    main()
