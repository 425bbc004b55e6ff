"""A timm ViT with its hand-written attention path, compiled with backend="asam": what was rewritten, and the error.

`timm.create_model("vit_small_patch16_224", pretrained=False)` (random weights, nothing downloaded), with
`fused_attn=False` on every attention module so that timm takes its hand-written path
(`q * scale`, `q @ k.transpose(-2, -1)`, softmax, dropout, `@ v`) instead of calling SDPA itself. asam
proves each site equal to `scaled_dot_product_attention` (no mask) and rewrites it.

Where timm cannot be imported (it needs torchvision), the same shape of model is built with transformers'
`ViTModel` from a config, `attn_implementation="eager"`, and the output says so.

    python examples/timm_vit.py                                    # CPU, 2 blocks at 64x64 pixels, seconds
    python examples/timm_vit.py --device cuda --depth 12 --img 224 --batch 64

The check: the compiled model's output against a float64 run of the same weights, no worse than the eager
model's own error in the same dtype (by a factor 2, plus a floor of 1e-4 of the output's scale).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import asam_compile


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224", help="a timm ViT name")
    p.add_argument("--depth", type=int, default=2, help="transformer blocks (vit_small has 12)")
    p.add_argument("--img", type=int, default=64, help="image size in pixels (vit_small: 224)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--no-timm", action="store_true", help="use the transformers ViTModel even if timm imports")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    """The model and a line saying which one it is."""
    timm, why = None, "--no-timm given"
    if not args.no_timm:
        try:
            import timm
        except Exception as e:  # noqa: BLE001 - timm fails with ImportError or others when torchvision is missing
            why = f"{type(e).__name__}: {e}"
    if timm is not None:
        model = timm.create_model(args.model, pretrained=False, depth=args.depth, img_size=args.img)
        n = 0
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False  # timm's hand-written path: the one asam rewrites
                n += 1
        what = f"timm {timm.__version__} {args.model} (depth {args.depth}, {args.img}px)"
        what += f", fused_attn=False on {n} modules"
        return model, what

    import transformers

    print(f"timm cannot be imported here ({why}); falling back to transformers' ViTModel, "
          "built like vit_small_patch16 (hidden 384, 6 heads, patch 16)")
    config = transformers.ViTConfig(
        image_size=args.img, patch_size=16, hidden_size=384, num_hidden_layers=args.depth, num_attention_heads=6,
        intermediate_size=1536, attn_implementation="eager",
    )
    hf = transformers.ViTModel(config, add_pooling_layer=False)
    what = f"transformers {transformers.__version__} ViTModel (depth {args.depth}, {args.img}px), eager attention"
    return _LastHidden(hf), what


class _LastHidden(torch.nn.Module):
    """ViTModel returns a ModelOutput; the check wants one tensor, as timm gives."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    torch.manual_seed(0)
    model, what = build(args)
    model.eval()
    print(f"model: {what}")
    print(f"torch {torch.__version__}, asam_compile {asam_compile.__version__}, device {args.device}, "
          f"{str(dtype).removeprefix('torch.')}, batch {args.batch}", flush=True)

    ref_model = copy.deepcopy(model).to(args.device, torch.float64)
    model = model.to(args.device, dtype)
    pixels = torch.randn(args.batch, 3, args.img, args.img, device=args.device)
    with torch.no_grad():
        ref64 = ref_model(pixels.double())
        del ref_model
        eager = model(pixels.to(dtype))
        compiled = torch.compile(model, backend="asam")
        t0 = time.perf_counter()
        with asam_compile.capture() as cap:  # the first call compiles: its report is kept
            out = compiled(pixels.to(dtype))
        compile_s = time.perf_counter() - t0

    err = (out.double() - ref64).abs().max().item()
    eager_err = (eager.double() - ref64).abs().max().item()
    passed = cap.n_rewritten > 0 and err <= 2 * eager_err + 1e-4 * ref64.abs().max().item()
    print(f"\n{cap.n_rewritten}/{len(cap.report.candidates)} attention sites rewritten, "
          f"first call (compile) {compile_s:.1f} s")
    print(cap.report)
    print(f"max |asam - eager| = {(out.double() - eager.double()).abs().max().item():.2e}; against float64: "
          f"asam {err:.2e}, eager {eager_err:.2e} -> check {'passed' if passed else 'FAILED'}")
    return {"model": what, "n_rewritten": cap.n_rewritten, "n_candidates": len(cap.report.candidates),
            "max_err_vs_fp64": err, "eager_err_vs_fp64": eager_err, "passed": passed, "report": cap.report}


if __name__ == "__main__":
    raise SystemExit(0 if main()["passed"] else 1)
