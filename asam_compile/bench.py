"""`asam-compile bench`: every (model, length, mode) of a sweep timed, checked and tabulated; its JSON, CSV and plot.

Every row is one (model, length, mode): the median time of `--iters` calls after `--warmup` calls
(asam_compile.measure.time_ms: CUDA events on a GPU, `time.perf_counter` on a CPU), the speed-up against plain
`torch.compile` of the same model at the same length, the compile time (the first call, apart from the
timing), the peak CUDA memory of the timed calls, the largest difference from the eager model (and from a
float64 eager run), and what asam rewrote. A configuration that fails (out of memory, a compile error, a
factory that raises) becomes a row with its error and the sweep goes on. The arguments are parsed in cli.py.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import importlib.util
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from asam_compile.measure import describe_error, free, header_line, run_header, sync, time_ms

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
# Rows


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

    def __init__(self, args: argparse.Namespace, header: dict[str, Any]) -> None:
        self.args = args
        self.env = {k: v for k, v in header.items() if k in ROW_KEYS}  # card, versions, date: in every row
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
        for _ in range(self.warmup):  # here, not in time_ms: the peak memory is that of the timed calls
            step()
        sync(self.device)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        row["ms"] = time_ms(step, self.device, self.iters, warmup=0)
        if self.cuda:
            row["peak_mem"] = torch.cuda.max_memory_allocated(self.device)
        if mode.startswith("asam"):
            row["note"] = _join(row["note"], dispatch_summary(cap))
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


def dispatch_summary(cap: Any) -> str:
    """What the measured dispatch sites of a capture chose (Note [Dispatch by measured density]): 'dispatch: 12/270
    heads sparse in 4/30 sites (density 0.63)', the mean measured density over all heads; '' where none."""
    from asam_compile.kernels import dispatch

    keys = [c.info["dispatch_site"] for c in (cap.report.candidates if cap.reports else ())
            if c.info.get("dispatch_site")]
    if not keys:
        return ""
    decided = dispatch.decisions()
    buckets = [b for key in keys for b in decided.get(key, {}).values() if b["sparse"] is not None]
    if not buckets:
        return f"dispatch: {len(keys)} sites, none measured"
    heads = sum(len(b["density"]) for b in buckets)
    sparse = sum(len(b["sparse"]) for b in buckets)
    density = sum(sum(b["density"]) for b in buckets) / max(1, heads)
    sites = sum(1 for b in buckets if b["sparse"])
    return f"dispatch: {sparse}/{heads} heads sparse in {sites}/{len(buckets)} site buckets (density {density:.2f})"


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
# The subcommand


def run(args: argparse.Namespace, specs: list[Any]) -> int:
    """`asam-compile bench` with parsed arguments (cli.py) and resolved models; returns the exit status."""
    from tabulate import tabulate

    header = run_header(args.device, command=args.command_line)
    line = header_line(header)
    what = f"batch {args.batch} | {args.dtype} | {'forward + backward' if args.train else 'forward, no_grad'}"
    if any(spec.builtin and spec.name != "smollm2" for spec in specs):
        what += f" | size {args.size}"
    sweep = Sweep(args, header)
    timer = (f"CUDA events, median of {sweep.iters} calls" if sweep.cuda
             else f"perf_counter, median of {sweep.iters} calls") + f" after {sweep.warmup} warm-up calls"
    print(line)
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
    print(line)
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

