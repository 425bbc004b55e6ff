"""The `asam-compile` command line: `bench` times models with and without asam; `explain` shows what it rewrites.

    asam-compile bench --model llama gpt2 --seq 1024 4096 --modes eager,inductor,asam,sdpa-edited --json out.json
    asam-compile bench --model mypkg.models:make --seq 512          # factory(seq=, batch=, dtype=, device=)
    asam-compile explain --model mistral-swa --seq 256 --size tiny --adaptive -o min_seq_len=0

Also `python -m asam_compile ...`. Every row of `bench` is one (model, length, mode): the median time of
`--iters` calls after `--warmup` calls (CUDA events on a GPU, `time.perf_counter` on a CPU), the speed-up
against plain `torch.compile` of the same model at the same length, the compile time (the first call, apart
from the timing), the peak CUDA memory of the timed calls, the largest difference from the eager model (and
from a float64 eager run), and what asam rewrote. A configuration that fails (out of memory, a compile error,
a factory that raises) becomes a row with its error and the sweep goes on.
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import csv
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

MODES = ("eager", "inductor", "asam", "asam-adaptive", "sdpa-edited", "sdpa-edited-eager")
DEFAULT_MODES = "eager,inductor,asam,sdpa-edited"
MODE_HELP = """modes (comma-separated):
  eager              the model as written (hand-written attention), uncompiled
  inductor           plain torch.compile (the baseline of the speed-up column)
  asam               torch.compile(backend="asam")
  asam-adaptive      torch.compile(backend="asam", options={"mode": "adaptive"}) (approximate; sites shorter
                     than min_seq_len, 16384 by default, stay exact: -o min_seq_len=... to change)
  sdpa-edited        the hand-edited baseline: the same weights with attn_implementation="sdpa", under plain
                     torch.compile (transformers models only, or factories that take attn_implementation)
  sdpa-edited-eager  the same hand-edited model, uncompiled
"""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
ROW_KEYS = ("model", "seq", "batch", "dtype", "device", "train", "mode", "ms", "speedup", "compile_s", "peak_mem",
            "max_err", "max_err_fp64", "rewritten", "note", "error", "device_name", "torch", "transformers",
            "asam_compile", "git", "date")


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
    args = parser.parse_args(argv)
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
        return bench(args, specs) if args.command == "bench" else explain(args, specs)
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
# Environment: what every header and every row records


def git_revision() -> str | None:
    """`git describe --always --dirty` of the checkout this package runs from; None when it is not one."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists() or not (root / "pyproject.toml").exists():
        return None  # an installed copy (or a folder inside someone else's repository): no revision to tell
    try:
        return subprocess.check_output(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=10"],
                                       text=True, stderr=subprocess.DEVNULL, timeout=10).strip() or None
    except Exception:  # noqa: BLE001 - no git, not a repository after all
        return None


def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: str) -> dict[str, Any]:
    from asam_compile import __version__

    try:
        transformers = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        transformers = None
    return {"device_name": device_name(device), "torch": torch.__version__, "transformers": transformers,
            "asam_compile": __version__, "git": git_revision(),
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}


def _header(env: dict[str, Any]) -> str:
    rev = f" ({env['git']})" if env["git"] else ""
    hf = f" | transformers {env['transformers']}" if env["transformers"] else ""
    return (f"device: {env['device_name']} | torch {env['torch']}{hf} | asam_compile {env['asam_compile']}{rev} | "
            f"{env['date']}")


# ---------------------------------------------------------------------------------------------------------
# Running and timing


def is_oom(err: BaseException | None) -> bool:
    """Whether an exception (or one it wraps: Dynamo wraps what a backend raised) is an out-of-memory."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
            return True
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__
    return False


def describe_error(err: BaseException) -> str:
    """One line for a table cell: 'OOM: ...' or the innermost exception Dynamo wrapped, 'Type: first line'."""
    oom = is_oom(err)
    while (inner := getattr(err, "inner_exception", None) or err.__cause__) is not None and inner is not err:
        err = inner
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return (("OOM: " if oom else "") + text)[:240]


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def time_calls(step: Callable[[], Any], device: str, iters: int) -> list[float]:
    """Milliseconds of each of `iters` calls: CUDA events on a GPU (one sync at the end), perf_counter on a CPU."""
    if torch.device(device).type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def primary_output(out: Any) -> torch.Tensor:
    """The tensor a row compares: logits, last_hidden_state, the first tensor of a tuple, or the tensor itself."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for value in out:
            if isinstance(value, torch.Tensor):
                return value
    raise TypeError(f"cannot find a tensor in the model's output ({type(out).__name__})")


def max_abs_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    if a is None or b is None:
        return None
    if a.shape != b.shape:
        raise ValueError(f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.double() - b.double()).abs().max())


def summarize_rewrites(cap: Any) -> tuple[str, list[str]]:
    """('4/4 sdpa', notes) from an asam_compile.capture(): rewritten / candidates, and into what."""
    if not cap.reports:
        return "no graph", []
    candidates = cap.report.candidates
    rewritten = [c for c in candidates if c.status == "rewritten"]
    targets = collections.Counter(c.target or "?" for c in rewritten)
    text = f"{len(rewritten)}/{len(candidates)}"
    if len(targets) == 1:
        text += f" {next(iter(targets))}"
    elif targets:
        text += " (" + ", ".join(f"{n} {t}" for t, n in targets.most_common()) + ")"
    notes = []
    adaptive = collections.Counter(str(c.info["adaptive"]) for c in candidates if "adaptive" in c.info
                                   and str(c.info["adaptive"]).startswith("exact"))
    notes += [f"{n}x adaptive {why}" for why, n in adaptive.items()]
    refused = collections.Counter(c.reject.name for c in candidates if c.status == "refused" and c.reject)
    notes += [f"{n}x refused {why}" for why, n in refused.items()]
    for g in cap.reports:
        notes += [f"pass failed: {f}"[:120] for f in g.failures]
        if g.inductor_fallback:
            notes.append(f"Inductor failed on the rewrite, fell back: {g.inductor_fallback}"[:120])
    return text, notes


def _float_inputs(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors cast to `dtype` (pixel values for the float64 reference); ids and masks unchanged."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, dict):
        return {k: _float_inputs(v, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_float_inputs(v, dtype) for v in value)
    return value


class Progress:
    """A tqdm bar on a terminal (when tqdm is importable), else one line per finished row on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.bar = None
        if enabled and sys.stderr.isatty() and importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="row", file=sys.stderr, leave=False)

    def start(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_description(what)
        elif self.enabled:
            print(f"[{self.done + 1}/{self.total}] {what} ...", file=sys.stderr, flush=True)

    def finish(self, row: dict[str, Any]) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            result = row["error"] or (f"{row['ms']:.3f} ms" if row["ms"] is not None else row["note"])
            print(f"[{self.done}/{self.total}] {row['model']} seq={row['seq']} {row['mode']}: {result}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Sweep:
    """Runs every (model, length, mode) of one `asam-compile bench` and keeps the rows."""

    def __init__(self, args: argparse.Namespace, env: dict[str, Any]) -> None:
        self.args, self.env = args, env
        self.device = args.device
        self.cuda = torch.device(args.device).type == "cuda"
        self.dtype = DTYPES[args.dtype]
        self.iters = args.iters or (50 if self.cuda else 10)
        self.warmup = args.warmup if args.warmup is not None else (10 if self.cuda else 2)
        self.rows: list[dict[str, Any]] = []

    def new_row(self, model: str, seq: int, mode: str) -> dict[str, Any]:
        row = dict.fromkeys(ROW_KEYS)
        row.update(model=model, seq=seq, batch=self.args.batch, dtype=self.args.dtype, device=self.device,
                   train=self.args.train, mode=mode, rewritten="-", note="", **self.env)
        return row

    def config(self, spec: Any, seq: int, progress: Progress) -> list[dict[str, Any]]:
        """All modes of one (model, length): build, float64 reference, each mode, then errors and speed-ups."""
        args = self.args
        rows = [self.new_row(spec.name, seq, mode) for mode in args.modes]
        torch.compiler.reset()
        free(self.device)
        progress.start(f"{spec.name} seq={seq}: building")
        try:
            built = spec.build(seq, args.batch, self.dtype, self.device, size=args.size, train=args.train)
        except Exception as err:  # noqa: BLE001 - a factory that fails is a row per mode; the sweep goes on
            message = "building the model failed: " + describe_error(err)
            for row in rows:
                row["error"] = message
                progress.finish(row)
            return rows
        outputs: dict[str, torch.Tensor] = {}
        ref64, ref_note = self.reference64(built)
        for row in rows:
            progress.start(f"{spec.name} seq={seq} {row['mode']}")
            try:
                outputs[row["mode"]] = self.run_mode(row, spec, built, seq)
            except Exception as err:  # noqa: BLE001 - OOM, a compile error: the row says so, the sweep goes on
                row["error"] = describe_error(err)
            torch.compiler.reset()
            free(self.device)
            progress.finish(row)
        eager = outputs.get("eager")
        if eager is None and outputs:
            try:
                with torch.no_grad():
                    eager = primary_output(built.model(*built.args, **built.inputs)).detach()
            except Exception as err:  # noqa: BLE001
                ref_note = (ref_note + "; " if ref_note else "") + f"eager reference failed: {describe_error(err)}"
        for row in rows:
            out = outputs.get(row["mode"])
            try:
                row["max_err"] = max_abs_diff(out, eager)
                row["max_err_fp64"] = max_abs_diff(out, ref64)
            except ValueError as err:
                row["note"] = _join(row["note"], str(err))
            row["note"] = _join(built.note, row["note"], ref_note if out is not None else "")
        base = next((r["ms"] for r in rows if r["mode"] == "inductor" and r["ms"]), None)
        for row in rows:
            if base and row["ms"]:
                row["speedup"] = base / row["ms"]
        return rows

    def reference64(self, built: Any) -> tuple[torch.Tensor | None, str]:
        """The output of a float64 copy of the eager model (the numerics reference), or why there is none."""
        if self.args.no_ref64 or self.dtype == torch.float64:
            return None, ""
        try:
            from asam_compile.models import reference_copy

            model = reference_copy(built.model)
            with torch.no_grad():
                out = primary_output(model(*_float_inputs(built.args, torch.float64),
                                           **_float_inputs(built.inputs, torch.float64))).detach()
            return out, ""
        except Exception as err:  # noqa: BLE001 - at long lengths the float64 run may not fit
            return None, f"no float64 reference ({describe_error(err)[:80]})"
        finally:
            model = None
            free(self.device)

    def run_mode(self, row: dict[str, Any], spec: Any, built: Any, seq: int) -> torch.Tensor:
        """Fill one row (time, compile time, memory, rewrites); returns the output of its first call."""
        import asam_compile

        mode, args = row["mode"], self.args
        model = built.model
        if mode.startswith("sdpa-edited"):
            if not spec.hf:
                raise RuntimeError("sdpa-edited needs a transformers model (a built-in one, or a factory that "
                                   "takes attn_implementation)")
            model = spec.build(seq, args.batch, self.dtype, self.device, size=args.size,
                               attn_implementation="sdpa", train=args.train).model
            model.load_state_dict(built.model.state_dict())  # the same weights as the eager model, for sure
        if mode in ("inductor", "sdpa-edited"):
            fn = torch.compile(model)
        elif mode in ("asam", "asam-adaptive"):
            options = dict(args.options, **({"mode": "adaptive"} if mode == "asam-adaptive" else {}))
            fn = torch.compile(model, backend="asam", options=options or None)
        else:
            fn = model
        step = self.step(fn, model, built)
        compiled = mode not in ("eager", "sdpa-edited-eager")

        sync(self.device)
        t0 = time.perf_counter()
        with asam_compile.capture() as cap:
            out = step()
        sync(self.device)
        first_s = time.perf_counter() - t0
        if compiled:
            row["compile_s"] = first_s
        if mode.startswith("asam"):
            row["rewritten"], notes = summarize_rewrites(cap)
            row["note"] = _join(*notes)
        for _ in range(self.warmup):
            step()
        sync(self.device)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        times = time_calls(step, self.device, self.iters)
        if self.cuda:
            row["peak_mem"] = torch.cuda.max_memory_allocated(self.device)
        row["ms"] = statistics.median(times)
        return out

    def step(self, fn: Callable[..., Any], model: torch.nn.Module, built: Any) -> Callable[[], torch.Tensor]:
        """One timed call: a no_grad forward, or (--train) forward and backward of the output's mean square."""
        if not self.args.train:
            def forward() -> torch.Tensor:
                with torch.no_grad():
                    return primary_output(fn(*built.args, **built.inputs))

            return forward

        def train_step() -> torch.Tensor:
            model.zero_grad(set_to_none=True)
            out = primary_output(fn(*built.args, **built.inputs))
            out.float().square().mean().backward()
            return out.detach()

        return train_step


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _inductor_warmup(device: str, dtype: torch.dtype) -> None:
    """Inductor's one-time costs in a process (imports, compiler checks, its worker pool) would otherwise count
    as the compile time of whichever row compiles first."""
    try:
        x = torch.randn(64, 64, device=device, dtype=dtype)
        torch.compile(lambda a: torch.softmax(a @ a.mT, -1) @ a)(x)
    except Exception:  # noqa: BLE001 - the compiled rows will show the same failure
        pass
    torch.compiler.reset()


@contextlib.contextmanager
def _compile_caches(keep: bool) -> Iterator[None]:
    """Inductor's on-disk caches off (the default), so that compile times are cold compiles; restored after."""
    if keep:
        yield
        return
    from asam_compile import _compat

    with _compat.inductor_caches_off(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
        yield


# ---------------------------------------------------------------------------------------------------------
# bench


def bench(args: argparse.Namespace, specs: list[Any]) -> int:
    from tabulate import tabulate

    env = environment(args.device)
    header = _header(env)
    what = f"batch {args.batch} | {args.dtype} | {'forward + backward' if args.train else 'forward, no_grad'}"
    if any(spec.builtin and spec.name != "smollm2" for spec in specs):
        what += f" | size {args.size}"
    sweep = Sweep(args, env)
    timer = (f"CUDA events, median of {sweep.iters} calls" if sweep.cuda
             else f"perf_counter, median of {sweep.iters} calls") + f" after {sweep.warmup} warm-up calls"
    print(header)
    print(f"{what} | {timer}", flush=True)
    progress = Progress(len(specs) * len(args.seq) * len(args.modes), enabled=not args.quiet)
    interrupted = False
    with _compile_caches(args.warm_cache):
        if any(m not in ("eager", "sdpa-edited-eager") for m in args.modes):
            _inductor_warmup(args.device, sweep.dtype)
        try:
            for spec in specs:
                for seq in args.seq:
                    sweep.rows += sweep.config(spec, seq, progress)
                    _write(args, sweep.rows)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            progress.close()
    rows = sweep.rows
    print()
    print(header)
    print(f"{what} | {timer}")
    print(format_table(rows, tabulate))
    if any(r["mode"].startswith("asam") and r["rewritten"].startswith("0/") for r in rows):
        print("note: where asam rewrote nothing (0/N) its row is plain Inductor and its speed-up is noise.")
    failed = [r for r in rows if r["error"]]
    if failed:
        print(f"{len(failed)} of {len(rows)} rows failed (their error is in the note column).")
    _write(args, rows)
    if args.plot and rows:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    if interrupted:
        print("interrupted: the rows above are the ones that finished.")
        return 130
    return 0


def _num(value: float | None, fmt: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _mem(value: int | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def format_table(rows: list[dict[str, Any]], tabulate: Callable[..., str]) -> str:
    table = [[r["model"], r["seq"], r["mode"], _num(r["ms"], ".3f", "failed" if r["error"] else "-"),
              _num(r["speedup"], ".2f") + ("x" if r["speedup"] else ""), _num(r["compile_s"], ".1f"),
              _mem(r["peak_mem"]) if not r["error"] else "-", _num(r["max_err"], ".1e"),
              _num(r["max_err_fp64"], ".1e"), r["rewritten"], _join(r["error"] or "", r["note"])]
             for r in rows]
    headers = ["model", "seq", "mode", "ms (median)", "speed-up vs inductor", "compile s", "peak mem",
               "max err vs eager", "max err vs fp64", "asam rewrote", "note"]
    return tabulate(table, headers=headers, disable_numparse=True, maxcolwidths=[None] * 10 + [60])


def _write(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str) + "\n")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(ROW_KEYS))
            writer.writeheader()
            writer.writerows(rows)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Speed-up against plain torch.compile vs sequence length: one panel per model, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        for mode in dict.fromkeys(r["mode"] for r in mine):
            points = sorted((r["seq"], r["speedup"]) for r in mine if r["mode"] == mode and r["speedup"])
            if points and mode != "inductor":
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mode)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="inductor (baseline)")
        ax.set_xscale("log", base=2)
        seqs = sorted({r["seq"] for r in mine})
        ax.set_xticks(seqs, [str(s) for s in seqs])
        ax.minorticks_off()
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("speed-up vs torch.compile")
        ax.set_title(model)
        ax.legend(fontsize="small")
    r0 = rows[0]
    fig.suptitle(f"{r0['device_name']}, {r0['dtype']}, batch {r0['batch']}, torch {r0['torch']}", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# explain


def explain(args: argparse.Namespace, specs: list[Any]) -> int:
    import asam_compile
    from tabulate import tabulate

    adaptive = args.adaptive or args.mode in ("adaptive", "asam-adaptive")
    options = dict(args.options, **({"mode": "adaptive"} if adaptive else {}))
    env = environment(args.device)
    print(_header(env))
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
