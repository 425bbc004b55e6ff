"""Before/after demo: a Llama with hand-written (eager) attention, compiled with and without the asam backend.

Builds a small `LlamaForCausalLM` from a config with random weights (nothing is downloaded), with
`attn_implementation="eager"`: attention written as matmul, scale, mask, softmax, matmul, as many models do.
Rows, all in one process and under `torch.no_grad()`:

    eager                     the model as written
    torch.compile             plain Inductor (the baseline of the speed-up column)
    torch.compile asam        our backend: attention rewritten into SDPA, then Inductor
    sdpa by hand, eager       the same weights in a model built with attn_implementation="sdpa"
    sdpa by hand, compiled    ... and compiled with plain Inductor: what a hand edit would give

Defaults finish in well under a minute on 2 CPU cores; on a GPU pass bigger sizes, e.g.
    python examples/demo.py --device cuda --dtype bfloat16 --layers 8 --hidden 2048 --heads 16 --kv-heads 4 --seq 2048
The run ends by printing what asam rewrote (or refused, and why).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time
import traceback
import warnings
from typing import Any, Callable

import torch
import torch._inductor.config
from tabulate import tabulate

import asam_compile


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    p.add_argument("--iters", type=int, default=None, help="timed calls per row (median); default 10 CPU, 50 CUDA")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first (compiling) call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--warm-cache",
        action="store_true",
        help="keep Inductor's on-disk caches (compile times then measure cache hits)",
    )
    return p.parse_args()


def build_models(args: argparse.Namespace, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The eager-attention model and a second one with attn_implementation="sdpa" holding the same weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 2048),
    )
    torch.manual_seed(args.seed)
    # from_config sets attn_implementation on the config object it is given, and the model keeps that
    # object: with one shared config the second model would switch the first one to SDPA too.
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager", dtype=dtype)
    sdpa = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa", dtype=dtype)
    sdpa.load_state_dict(eager.state_dict())
    for model, want in ((eager, "eager"), (sdpa, "sdpa")):
        got = model.config._attn_implementation
        if got != want:
            raise RuntimeError(f"built a model with attn_implementation={got!r}, wanted {want!r}")
    return eager.to(args.device).eval(), sdpa.to(args.device).eval()


class Timer:
    """Wall time of one call: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end), out
        t0 = time.perf_counter()
        out = fn()
        return (time.perf_counter() - t0) * 1e3, out


def measure(fn: Callable[[], torch.Tensor], timer: Timer, iters: int, warmup: int) -> dict[str, Any]:
    """First call (compile time for compiled rows), warm-up calls, then the median of `iters` timed calls."""
    first_ms, out = timer(fn)
    for _ in range(warmup):
        fn()
    times = [timer(fn)[0] for _ in range(iters)]
    return {"first_ms": first_ms, "ms": statistics.median(times), "out": out}


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    iters = args.iters or (50 if device.type == "cuda" else 10)
    timer = Timer(device)
    if not args.warm_cache:
        # Every compiled row pays a cold compile: with the caches on, the asam row hits the plain row's
        # cache entry whenever nothing was rewritten, and a second run of the demo reports cache hits.
        torch._inductor.config.force_disable_caches = True
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device:       {device_name}")
    print(f"torch:        {torch.__version__}")
    print(f"asam_compile: {asam_compile.__version__}")
    print(f"date:         {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(
        f"model:        LlamaForCausalLM, random weights, {args.layers} layers, hidden {args.hidden}, "
        f"{args.heads} heads, {args.kv_heads} kv heads, vocab {args.vocab}"
    )
    print(
        f"input:        batch {args.batch}, seq {args.seq}, {str(dtype).removeprefix('torch.')}, "
        f"median of {iters} calls after {args.warmup} warm-up calls"
    )
    print(flush=True)

    model, sdpa_model = build_models(args, dtype)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)

    def logits_of(m: Callable[..., Any]) -> Callable[[], torch.Tensor]:
        return lambda: m(input_ids=ids, use_cache=False).logits

    cap = None
    rows: dict[str, dict[str, Any]] = {}

    def run_row(name: str, fn: Callable[[], Callable[[], torch.Tensor]], compiled: bool) -> None:
        row_start = time.perf_counter()
        print(f"running {name} ...", flush=True)
        try:
            torch._dynamo.reset()  # each compiled row starts from a fresh Dynamo cache
            rows[name] = measure(fn(), timer, iters, args.warmup) | {"compiled": compiled}
        except Exception as e:  # noqa: BLE001 - a failing row must not hide the others
            traceback.print_exc()
            while (inner := getattr(e, "inner_exception", None) or e.__cause__) is not None:
                e = inner  # Dynamo wraps a backend's error: show the original
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            rows[name] = {"error": f"{type(e).__name__}: {message}"[:100], "compiled": compiled}
        print(f"  ... {time.perf_counter() - row_start:.1f}s", flush=True)

    def asam() -> Callable[[], torch.Tensor]:
        """The asam row: its first call (the one that compiles) runs inside capture() to keep the report."""
        call = logits_of(torch.compile(model, backend="asam"))

        def fn() -> torch.Tensor:
            nonlocal cap
            if cap is not None:
                return call()
            with asam_compile.capture() as c:
                out = call()
            cap = c
            return out

        return fn

    with torch.no_grad():
        # Inductor's one-time costs in a process (imports, C++/Triton tool checks) would otherwise count as
        # the compile time of whichever row compiles first.
        # Its pool of compile workers also starts then, and would take the cores from the first timed calls.
        t0 = time.perf_counter()
        try:
            x = torch.randn(64, 64, device=device, dtype=dtype)
            torch.compile(lambda a: torch.softmax(a @ a.mT, -1) @ a)(x)
            print(f"inductor warm-up: {time.perf_counter() - t0:.1f}s", flush=True)
        except Exception as e:  # noqa: BLE001 - the compiled rows below will show the same failure
            print(f"inductor warm-up failed: {type(e).__name__}: {e}", flush=True)
        run_row("eager", lambda: logits_of(model), compiled=False)
        run_row("torch.compile", lambda: logits_of(torch.compile(model)), compiled=True)
        run_row("torch.compile asam", asam, compiled=True)
        run_row("sdpa by hand, eager", lambda: logits_of(sdpa_model), compiled=False)
        run_row("sdpa by hand, compiled", lambda: logits_of(torch.compile(sdpa_model)), compiled=True)

    ref = rows["eager"].get("out")
    base = rows["torch.compile"].get("ms")
    table = []
    for name, r in rows.items():
        if "error" in r:
            table.append([name, "failed", "-", "-", "-", "-", r["error"]])
            continue
        err = (r["out"].float() - ref.float()).abs().max().item() if ref is not None else float("nan")
        sites = "-"
        if name == "torch.compile asam":
            sites = cap.n_rewritten if cap is not None else "?"
        table.append(
            [
                name,
                f"{r['ms']:.2f}",
                f"{base / r['ms']:.2f}x" if base else "-",
                f"{err:.1e}",
                sites,
                f"{r['first_ms'] / 1e3:.1f}" if r["compiled"] else "-",
                "",
            ]
        )
    headers = [
        "mode",
        "time ms",
        "speed-up vs torch.compile",
        "max abs err vs eager",
        "attention rewritten",
        "compile s (1st call)",
        "note",
    ]
    if not any(t[-1] for t in table):
        headers, table = headers[:-1], [t[:-1] for t in table]
    print()
    print(tabulate(table, headers=headers, disable_numparse=True))
    if cap is not None and cap.n_rewritten == 0:
        print("note: asam rewrote no attention here, so its row is plain Inductor and its speed-up is noise.")
    print()

    # What asam did: the report of the compile above; explain() (passes only, no Inductor) if that failed.
    if cap is not None and cap.reports:
        report = cap.report
    else:
        print("(the asam row did not produce a report; running asam_compile.explain for one)")
        try:
            with torch.no_grad():
                report = asam_compile.explain(model, input_ids=ids, use_cache=False)
        except Exception as e:  # noqa: BLE001
            print(f"asam_compile.explain failed: {type(e).__name__}: {e}")
            report = None
    if report is not None:
        print(report)
    failed = [name for name, r in rows.items() if "error" in r]
    if failed:
        raise SystemExit(f"demo: these rows failed (tracebacks above): {', '.join(failed)}")


if __name__ == "__main__":
    main()
