"""The `asam-compile` command line: `bench` times models with and without asam; `explain` shows what it rewrites.

    asam-compile bench --model llama gpt2 --seq 1024 4096 --modes eager,inductor,asam,sdpa-edited --json out.json
    asam-compile bench --model mypkg.models:make --seq 512          # factory(seq=, batch=, dtype=, device=)
    asam-compile explain --model mistral-swa --seq 256 --size tiny --adaptive -o min_seq_len=0

Also `python -m asam_compile ...`. This module parses and checks the arguments, resolves the models and runs
`explain`; the `bench` sweep (its rows, table, files and plot) is asam_compile/bench.py, and both print the
run header of asam_compile/measure.py.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from asam_compile import bench
from asam_compile.bench import DEFAULT_MODES, DTYPES, MODE_HELP, MODES
from asam_compile.measure import describe_error, header_line, run_header


# ---------------------------------------------------------------------------------------------------------
# Arguments


def _split(values: Sequence[str]) -> list[str]:
    """`--seq 128 256` and `--seq 128,256` alike."""
    return [v for value in values for v in value.split(",") if v]


def _option(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE a Python literal where it parses as one (0.99, True, "always"), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from asam_compile.models import BUILTIN, SIZES

    p.add_argument("--model", nargs="+", default=["llama"], metavar="MODEL",
                   help=f"built-in models ({', '.join(BUILTIN)}) or 'package.module:factory', a function "
                        "factory(seq=, batch=, dtype=, device=) returning (model, example_inputs); several allowed")
    p.add_argument("--seq", nargs="+", default=None, metavar="N", help="sequence lengths (tokens); several allowed")
    p.add_argument("--size", choices=SIZES, default="small",
                   help="size of the built-in models made from configs: tiny (tests), small (a CPU), medium (a GPU; "
                        "llama medium is the README's 8-layer, hidden-1024 model); smollm2 has one size")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads) while the command runs; on a shared machine 1 gives "
                        "steadier times than OpenMP threads competing with other processes")
    p.add_argument("-o", "--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the asam backend (README, Options), e.g. -o coverage=0.99; repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asam-compile", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from asam_compile import __version__

    parser.add_argument("--version", action="version", version=f"asam_compile {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bench,explain}")

    b = sub.add_parser("bench", help="time models under eager / torch.compile / asam / hand-edited SDPA",
                       description="Time models under several modes; one row per (model, length, mode).",
                       epilog=MODE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(b)
    b.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, from {', '.join(MODES)} "
                                                          f"(default {DEFAULT_MODES})")
    b.add_argument("--train", action="store_true", help="time forward + backward (of the mean square of the output) "
                                                        "instead of a no_grad forward")
    b.add_argument("--iters", type=int, default=None, help="timed calls per row, median reported; "
                                                          "default 10 on CPU, 50 on CUDA")
    b.add_argument("--warmup", type=int, default=None, help="untimed calls after the first (compiling) call; "
                                                           "default 2 on CPU, 10 on CUDA")
    b.add_argument("--no-ref64", action="store_true", help="skip the float64 eager reference (max_err_fp64)")
    b.add_argument("--warm-cache", action="store_true",
                   help="keep Inductor's on-disk caches (compile times then measure cache hits)")
    b.add_argument("--json", metavar="PATH", help="write the rows as a JSON list (rewritten after every row)")
    b.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    b.add_argument("--plot", metavar="PNG", help="plot speed-up vs sequence length per model and mode (matplotlib)")
    b.add_argument("--quiet", action="store_true", help="no progress on stderr")

    e = sub.add_parser("explain", help="print what asam rewrites in a model, and why it refuses the rest",
                       description="Run asam's passes (no Inductor, no timing) on one call of each model and "
                                   "print the report: every attention candidate, what it became or why it was "
                                   "refused.")
    _add_model_args(e)
    e.add_argument("--mode", choices=("exact", "adaptive", "asam", "asam-adaptive"), default="exact",
                   help="the backend's mode (asam = exact, asam-adaptive = adaptive)")
    e.add_argument("--adaptive", action="store_true", help="same as --mode adaptive; also prints the adaptive "
                                                           "settings of every site, or why it stays exact")
    e.add_argument("--json", metavar="PATH", help="write the reports as JSON")
    return parser


def _check_common(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from asam_compile.config import AsamConfig

    try:
        args.seq = [int(s) for s in _split(args.seq or ["512" if args.command == "bench" else "128"])]
    except ValueError:
        parser.error(f"--seq takes integers, got {args.seq}")
    if any(s < 1 for s in args.seq) or args.batch < 1:
        parser.error("--seq and --batch must be >= 1")
    args.model = _split(args.model)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.options = dict(args.option)
    try:
        AsamConfig.from_options(args.options)
    except ValueError as err:
        parser.error(str(err))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `asam-compile` and `python -m asam_compile`; returns the exit status."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["asam-compile", *argv])  # for the run header
    _check_common(parser, args)
    if args.command == "bench":
        args.modes = _split([args.modes])
        bad = [m for m in args.modes if m not in MODES]
        if bad or not args.modes:
            parser.error(f"--modes: unknown mode(s) {bad}; expected some of {', '.join(MODES)}")
        if args.plot and importlib.util.find_spec("matplotlib") is None:
            parser.error("--plot needs matplotlib, which is not installed: pip install matplotlib "
                         "(or pip install 'asam_compile[plot]')")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    specs = _resolve_models(parser, args.model)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return bench.run(args, specs) if args.command == "bench" else explain(args, specs)
    finally:
        torch.set_num_threads(threads)  # main() also runs in-process (the tests): leave the process as it was


def _resolve_models(parser: argparse.ArgumentParser, names: list[str]) -> list[Any]:
    """Every model, before anything runs: a typo in a name fails now, not after an hour of sweep."""
    from asam_compile.models import resolve

    specs = []
    for name in names:
        try:
            specs.append(resolve(name))
        except Exception as err:  # noqa: BLE001 - import errors of a user module, unknown names
            parser.error(f"--model {name}: {type(err).__name__}: {err}")
    return specs


# ---------------------------------------------------------------------------------------------------------
# explain


def explain(args: argparse.Namespace, specs: list[Any]) -> int:
    import asam_compile
    from tabulate import tabulate

    adaptive = args.adaptive or args.mode in ("adaptive", "asam-adaptive")
    options = dict(args.options, **({"mode": "adaptive"} if adaptive else {}))
    print(header_line(run_header(args.device, command=args.command_line)))
    reports, status = [], 0
    for spec in specs:
        for seq in args.seq:
            title = (f"== {spec.name} (size {args.size}), seq {seq}, batch {args.batch}, {args.dtype}, "
                     f"mode {options.get('mode', 'exact')}")
            try:
                built = spec.build(seq, args.batch, DTYPES[args.dtype], args.device, size=args.size)
                title += f" ({built.note})" if built.note else ""
                print(f"\n{title} ==", flush=True)
                report = asam_compile.explain(built.model, *built.args, options=options, **built.inputs)
            except Exception as err:  # noqa: BLE001 - one model failing must not hide the others
                print(f"\n{title} ==\nfailed: {describe_error(err)}")
                status = 1
                continue
            print(report)
            if adaptive:
                print("\nadaptive sparse settings per site:")
                print(tabulate([[g.graph_id, c.site, c.module or "-", c.info.get("adaptive", f"- ({c.status})")]
                                for g in report.graphs for c in g.candidates],
                               headers=["graph", "site", "module", "adaptive"], maxcolwidths=[None, None, 40, 90]))
            reports.append({"model": spec.name, "seq": seq, "report": json.loads(report.to_json())})
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2, default=str) + "\n")
    return status
