"""The validated, frozen configuration of one asam compile, built from `torch.compile(options=...)`."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

# Environment variables are read here and nowhere else.
ENV_DUMP_DIR = "ASAM_DUMP_DIR"
ENV_STRICT = "ASAM_STRICT"

MODES = ("exact", "adaptive")

# The adaptive sparse settings (Note [Adaptive sparse attention] in asam_compile/adaptive.py). The same
# names are options of the backend and keywords of asam_compile.sparse(...).
SPARSE_FIELDS = (
    "block_size", "coverage", "max_density", "min_seq_len", "window", "sinks", "dense_fallback", "estimator",
)
ESTIMATORS = ("pooled", "sampled")


@dataclasses.dataclass(frozen=True)
class AsamConfig:
    """Options of the `asam` backend. Every field can be given in `torch.compile(..., options={...})`."""

    # "exact": rewrite only into programs equal to the original within float tolerance.
    # "adaptive": every attention site that can goes ASAM adaptive sparse (approximate); in "exact" mode
    # only the modules marked with asam_compile.sparse(...) do.
    mode: str = "exact"
    # Re-raise when one of our passes fails instead of restoring the graph and warning (the tests use it).
    strict: bool = False
    # Folder for per-graph dumps (code before/after each pass, JSON report); None: no dumps.
    dump_dir: str | None = None
    # Names of passes to skip, e.g. ("rewrite",) runs normalize and match only (a dry run).
    disable_passes: tuple[str, ...] = ()
    # Treat module buffers (GPT-2's `bias`, nanoGPT's tril) as constants when proving a mask causal.
    # See Note [Buffers as constants] in passes/plan.py.
    trust_buffers: bool = True
    # Use SDPA's enable_gqa instead of repeated K/V when no dense mask is passed (flash/cuDNN take it).
    use_gqa: bool = True
    # Keep Inductor's own attention pattern pass (fuse_attention) off our graphs: it miscompiles
    # softmax over a non-last dimension (pytorch issue 196468) and we rewrite attention ourselves.
    disable_inductor_sfdp: bool = True
    # Structured masks (sliding window, chunks, prefix...) known at compile time: "auto" picks Flex or SDPA
    # by the cost model in asam_compile/cost.py, "always" takes Flex wherever it can run, "never" keeps SDPA.
    flex: str = "auto"
    # Block size of the Flex block masks we build (FlexAttention's default).
    block_size: int = 128
    # Hand the rewritten graph to Inductor; False returns it as eager Python (for explain and debugging).
    inductor: bool = True
    # False keeps every site exact, whatever the mode and the asam_compile.sparse marks say.
    allow_sparse: bool = True
    # Adaptive sparse mode (approximate; see asam_compile/adaptive.py). Share of the estimated attention
    # mass each query block keeps. Measured on SmolLM2-135M (benchmarks/RESULTS.md), perplexity change at
    # 4096 / 8192 tokens: +1.16 / +2.92 % at 0.95, +0.37 / +0.76 % at 0.99, +0.07 / +0.32 % at 0.995.
    # The goal is <= 0.5 %: 0.995 is the smallest measured value that meets it at both lengths.
    coverage: float = 0.995
    # A (batch, head) whose selection keeps more than this share of its key blocks runs all of them (exact).
    max_density: float = 0.5
    # Sites with fewer queries or keys than this stay exact: below it sparsity does not pay. Measured on an
    # H100 (benchmarks/RESULTS.md): on concentrated inputs (H=16, D=128) adaptive vs SDPA flash was 0.40x at 4k,
    # 1.79x at 8k, 2.63x at 16k; on the real SmolLM2-135M at 8k the whole model ran 0.85x the exact rewrite's
    # speed (its attention is not sparse enough there). 16384 is the shortest length measured to pay on inputs
    # sparse enough for the mode; no real model here has a context between 8k and 16k to narrow it.
    min_seq_len: int = 16384
    # Key blocks next to the diagonal (the query block's own included, so >= 1) that are always kept.
    window: int = 2
    # Leading key blocks (attention sinks) that are always kept.
    sinks: int = 1
    # Run the (batch, head) pairs above max_density with SDPA flash instead of all their blocks in Flex, chosen
    # per call inside an opaque op (Note [Adaptive attention op] in asam_compile/adaptive.py). It costs a host
    # sync and eager launches per call: measured on an H100 it was slower than the in-graph default wherever
    # the selection was sparse, and faster only where every pair was diffuse (benchmarks/RESULTS.md).
    dense_fallback: bool = False
    # How the adaptive mode estimates each key block's attention mass: "pooled" (block means of q and k,
    # nearly free) or "sampled" (8 exact query rows per query block: 1/16 of the scores' matmul). Sampled rows
    # keep more of the true mass at the same density on SmolLM2, but on an H100 the selection alone took
    # 1.5-1.75x the time of SDPA flash at 8k-16k (benchmarks/RESULTS.md). Note [Block estimators] in
    # asam_compile/adaptive.py.
    estimator: str = "pooled"

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "AsamConfig":
        """Build and validate a config; unknown keys and bad values raise ValueError naming them."""
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"asam_compile: options must be a dict of option names to values, got {type(options).__name__}")
        options = dict(options or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ValueError(
                f"asam_compile: unknown option(s) {unknown}; allowed options are {sorted(fields)}"
            )
        if "dump_dir" not in options and os.environ.get(ENV_DUMP_DIR):
            options["dump_dir"] = os.environ[ENV_DUMP_DIR]
        if "strict" not in options and os.environ.get(ENV_STRICT, "") not in ("", "0"):
            options["strict"] = True
        for key, value in options.items():
            _validate(key, value)
        if "disable_passes" in options:
            options["disable_passes"] = tuple(options["disable_passes"])
        return cls(**options)

    def cache_key(self) -> str:
        """A stable string that changes with every option that changes the rewritten graph."""
        return repr(sorted(dataclasses.asdict(self).items()))


def _bad(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"asam_compile: option {key}={value!r} is not allowed; expected {allowed}")


def _validate(key: str, value: Any) -> None:
    from asam_compile.passes import PASS_NAMES

    if key == "mode":
        if value not in MODES:
            raise _bad(key, value, f"one of {list(MODES)}")
    elif key in ("strict", "trust_buffers", "use_gqa", "disable_inductor_sfdp", "inductor", "allow_sparse",
                 "dense_fallback"):
        if not isinstance(value, bool):
            raise _bad(key, value, "True or False")
    elif key == "estimator":
        if value not in ESTIMATORS:
            raise _bad(key, value, f"one of {list(ESTIMATORS)}")
    elif key == "flex":
        if value not in ("auto", "always", "never"):
            raise _bad(key, value, "one of ['auto', 'always', 'never']")
    elif key == "block_size":
        if not isinstance(value, int) or isinstance(value, bool) or value < 16 or value & (value - 1):
            raise _bad(key, value, "a power of two >= 16")
    elif key in ("coverage", "max_density"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise _bad(key, value, "a number in (0, 1]")
    elif key in ("min_seq_len", "window", "sinks"):
        low = 1 if key == "window" else 0  # the diagonal block is always kept
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _bad(key, value, f"an integer >= {low}")
    elif key == "dump_dir":
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise _bad(key, value, "a folder path (str) or None")
    elif key == "disable_passes":
        if isinstance(value, str) or not all(v in PASS_NAMES for v in value):
            raise _bad(key, value, f"a list of pass names from {list(PASS_NAMES)}")
