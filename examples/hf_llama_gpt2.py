"""HF Llama and GPT-2, unmodified, compiled with backend="asam" (exact mode): what was rewritten, and the error.

Both models are built from configs (random weights, nothing downloaded) with `attn_implementation="eager"`,
the path where transformers writes attention by hand (matmul, scale, mask, softmax, matmul). asam proves each
site equal to `scaled_dot_product_attention` (Llama: causal with grouped-query K/V; GPT-2: causal) and rewrites
it, then Inductor compiles the graph. The causal mask transformers builds is proven causal at compile time and
becomes `is_causal=True`: no L x L mask is made.

    python examples/hf_llama_gpt2.py                                   # CPU, float32, seconds
    python examples/hf_llama_gpt2.py --device cuda --seq 8192 --layers 8 --hidden 1024 --heads 16 --kv-heads 4
    python examples/hf_llama_gpt2.py --models llama --batch 2 --pad 40 --flex always   # a left-padded batch

With --pad, batch rows 1.. are left-padded (attention_mask 0): transformers' mask then reads the run-time
attention_mask, and asam builds a Flex block mask from it inside the compiled graph on every call (or keeps SDPA
with the dense mask where its cost model prefers that: `--flex always` shows the Flex path at small sizes).

The check: logits of the compiled model against a float64 run of the same weights, no worse than the eager
model's own error in the same dtype (by a factor 2, plus a floor of 1e-4 of the logits' scale), on the positions
where float64 is finite (float64 HF gives NaN on padded query rows: finfo.min + score overflows).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import asam_compile


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama,gpt2", help="comma-separated: llama, gpt2")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2, help="Llama only (GPT-2 has no GQA)")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--pad", type=int, default=0, help="left padding (tokens) of batch rows 1..")
    p.add_argument("--flex", default="auto", choices=["auto", "always", "never"], help="asam's flex option")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    return p.parse_args(argv)


def build(name: str, args: argparse.Namespace) -> torch.nn.Module:
    """A randomly initialised causal LM whose attention transformers writes by hand."""
    import transformers

    if name == "llama":
        config = transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            max_position_embeddings=max(args.seq, 128), attn_implementation="eager",
        )
        return transformers.LlamaForCausalLM(config)
    if name == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=args.vocab, n_positions=max(args.seq, 128), n_embd=args.hidden, n_layer=args.layers,
            n_head=args.heads, bos_token_id=0, eos_token_id=0, attn_implementation="eager",
        )
        return transformers.GPT2LMHeadModel(config)
    raise SystemExit(f"unknown model {name!r}; choose from llama, gpt2")


def check(out: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor) -> dict:
    """Errors against float64: the compiled model may be no worse than eager in the same dtype (factor 2), on the
    positions where float64 is finite."""
    ok = ref64.isfinite().all(-1, keepdim=True)
    err = (out.double() - ref64).where(ok, 0).abs().max().item()
    eager_err = (eager.double() - ref64).where(ok, 0).abs().max().item()
    floor = 1e-4 * ref64.where(ok, 0).abs().max().item()
    return {
        "max_err_vs_eager": (out.double() - eager.double()).abs().max().item(),
        "max_err_vs_fp64": err,
        "eager_err_vs_fp64": eager_err,
        "passed": err <= 2 * eager_err + floor,
    }


def run_one(name: str, args: argparse.Namespace, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    model = build(name, args).eval()
    ref_model = copy.deepcopy(model).to(args.device, torch.float64)
    model = model.to(args.device, dtype)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    kw = {"use_cache": False}
    if args.pad:
        kw["attention_mask"] = torch.ones(args.batch, args.seq, dtype=torch.long, device=args.device)
        kw["attention_mask"][1:, : args.pad] = 0

    with torch.no_grad():
        ref64 = ref_model(input_ids=ids, **kw).logits
        del ref_model
        eager = model(input_ids=ids, **kw).logits
        compiled = torch.compile(model, backend="asam", options={"flex": args.flex})
        t0 = time.perf_counter()
        with asam_compile.capture() as cap:  # the first call compiles: its report is kept
            out = compiled(input_ids=ids, **kw).logits
        compile_s = time.perf_counter() - t0

    result = check(out, eager, ref64) | {"model": name, "compile_s": compile_s}
    result["n_rewritten"] = cap.n_rewritten
    result["n_candidates"] = len(cap.report.candidates)
    result["report"] = cap.report
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    print(f"torch {torch.__version__}, asam_compile {asam_compile.__version__}, device {args.device}, "
          f"{str(dtype).removeprefix('torch.')}, batch {args.batch}, seq {args.seq}, {args.layers} layers, "
          f"hidden {args.hidden}" + (f", rows 1.. left-padded by {args.pad}" if args.pad else ""), flush=True)

    results = {}
    for name in args.models.split(","):
        torch._dynamo.reset()
        r = results[name] = run_one(name.strip(), args, dtype)
        print(f"\n=== {name}: {r['n_rewritten']}/{r['n_candidates']} attention sites rewritten, "
              f"first call (compile) {r['compile_s']:.1f} s")
        print(r["report"])
        print(f"max |asam - eager| = {r['max_err_vs_eager']:.2e}; against float64: asam {r['max_err_vs_fp64']:.2e}, "
              f"eager {r['eager_err_vs_fp64']:.2e} -> check {'passed' if r['passed'] else 'FAILED'}", flush=True)

    failed = [n for n, r in results.items() if not r["passed"] or r["n_rewritten"] == 0]
    print("\nall checks passed" if not failed else f"\nFAILED: {', '.join(failed)}")
    return {"results": results, "passed": not failed}


if __name__ == "__main__":
    raise SystemExit(0 if main()["passed"] else 1)
