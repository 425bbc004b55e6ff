"""Save real attention inputs: SmolLM2-135M's q (after RoPE), k and v of chosen layers on the shipped text.

The GPU machine cannot load SmolLM2 (its package is too large to carry), so its real q/k/v travel as
files for benchmarks/adaptive/bench_adaptive.py (`--inputs FILE.pt`): speed and error of adaptive sparse
attention on real attention, not only on synthetic inputs.

    python benchmarks/tools/dump_qkv.py --length 8192 --layers 0 14 29 --out-dir qkv/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for real_models.py (its docstring)
import real_models  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 14, 29])
    p.add_argument("--dtype", default="bfloat16", help="dtype of the saved tensors")
    p.add_argument("--out-dir", default="qkv")
    args = p.parse_args()

    from transformers.models.llama import modeling_llama

    model, tok = real_models.load_smollm2()
    ids = tok(real_models.long_text(), return_tensors="pt").input_ids[:, : args.length]
    assert ids.shape[1] == args.length, f"the text gives only {ids.shape[1]} tokens"
    saved: dict[int, dict[str, torch.Tensor]] = {}
    original = modeling_llama.eager_attention_forward

    def spy(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        if module.layer_idx in args.layers:
            dtype = getattr(torch, args.dtype)
            saved[module.layer_idx] = {"q": query.to(dtype), "k": key.to(dtype), "v": value.to(dtype)}
        return original(module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    modeling_llama.eager_attention_forward = spy
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        modeling_llama.eager_attention_forward = original
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for layer, tensors in sorted(saved.items()):
        path = out / f"smollm2_L{args.length}_layer{layer}.pt"
        torch.save({**tensors, "layer": layer, "model": "SmolLM2-135M-Instruct"}, path)
        print(path, {n: tuple(t.shape) for n, t in tensors.items() if isinstance(t, torch.Tensor)})


if __name__ == "__main__":
    main()
