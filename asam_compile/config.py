"""The validated, frozen configuration of one asam compile, built from `torch.compile(options=...)`."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, NamedTuple

from asam_compile.passes import PASS_NAMES

# Environment variables are read here and nowhere else.
ENV_DUMP_DIR = "ASAM_DUMP_DIR"
ENV_STRICT = "ASAM_STRICT"

MODES = ("exact", "adaptive")

ESTIMATORS = ("pooled", "sampled", "dual")
DENSE_FALLBACKS = ("measured", "none", "per_call")


class SparseSettings(NamedTuple):
    """The ASAM adaptive sparse settings of a site (Note [Adaptive sparse attention] in
    asam_compile/kernels/selection.py): `AsamConfig.sparse`, overridden field by field by the innermost
    asam_compile.sparse(...) mark, and passed whole from the plan to the selection. A NamedTuple, not a
    dataclass: the rewritten FX graph carries it as one constant argument of the adaptive call, and FX prints
    NamedTuples as code (a dataclass instance would not survive the graph's recompile). Build it with
    `SparseSettings.checked(...)` to validate the fields, or `.replaced(...)` from another one."""

    # The selection block: the estimate pools queries and keys over blocks of this many rows and keeps or drops
    # whole (query block, key block) pairs. It is also the tile of the adaptive call's Flex block mask. Where the
    # site's mask became a Flex block mask, it must equal that block mask's tile (AsamConfig.flex_block_size).
    block_size: int = 128
    # Share of the estimated attention mass each query block keeps. Measured on SmolLM2-135M (benchmarks/
    # RESULTS.md), perplexity change at 4096 / 8192 tokens: +1.16 / +2.92 % at 0.95, +0.37 / +0.76 % at 0.99,
    # +0.07 / +0.32 % at 0.995. The goal is <= 0.5 %: 0.995 is the smallest measured value that meets it at
    # both lengths.
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
    # Where heads that keep more than max_density of their blocks run. "measured" (the default): per site and head,
    # from the density measured on the first calls of each length bucket and re-measured now and then, SDPA
    # (flash) for heads that do not pay and the adaptive call for the others, with no host sync in between (Note
    # [Dispatch by measured density] in asam_compile/kernels/dispatch.py; inference, no mask or a causal one).
    # "none": everything in one in-graph call, diffuse heads running all their blocks in Flex (training graphs
    # and sites inside a structured mask always take it). "per_call": the (batch, head) pairs above max_density
    # chosen on every call in an opaque op (a host sync per call; Note [Adaptive attention op] in
    # asam_compile/kernels/adaptive.py). True and False are read as "per_call" and "none".
    dense_fallback: str = "measured"
    # How the estimate is made: "pooled" (block means of q and k, nearly free) or "sampled" (8 exact query rows
    # per query block: 1/16 of the scores' matmul). Sampled rows keep more of the true mass at the same density
    # on SmolLM2, but on an H100 the selection alone took 1.5-1.75x the time of SDPA flash at 8k-16k
    # (benchmarks/RESULTS.md). "dual" (the block's mean query against every key, averaged with every query
    # against the blocks' mean keys: 2/128 of the scores' matmul) came within 1.07x of the oracle's density at
    # 0.99 of the true mass on Gemma-3's global layers, and met its +0.5 % perplexity bar at coverage 0.93 (density
    # 0.44; pooled needed 0.98, density 0.60). Note [Block estimators] in asam_compile/kernels/selection.py.
    estimator: str = "pooled"

    @classmethod
    def checked(cls, **fields: Any) -> "SparseSettings":
        """Settings with the given fields (the others default), each validated; unknown names raise."""
        unknown = sorted(set(fields) - set(cls._fields))
        if unknown:
            raise ValueError(f"asam_compile: unknown sparse setting(s) {unknown}; allowed are {list(cls._fields)}")
        for key, value in fields.items():
            _validate(key, value)
        if isinstance(fields.get("dense_fallback"), bool):
            fields["dense_fallback"] = "per_call" if fields["dense_fallback"] else "none"
        return cls(**fields)

    def replaced(self, **fields: Any) -> "SparseSettings":
        """A copy with the given fields changed, each validated."""
        return SparseSettings.checked(**{**self._asdict(), **fields})


# The option names that set one field of AsamConfig.sparse (`coverage=0.99` is `sparse={"coverage": 0.99}`);
# they are also the keywords of asam_compile.sparse(...). `block_size` sets both tiles (see from_options).
SPARSE_FIELDS = SparseSettings._fields


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
    # by the cost model in asam_compile/kernels/cost.py, "always" takes Flex wherever it can run, "never" keeps SDPA.
    flex: str = "auto"
    # Tile of the Flex block masks built for structured masks in exact mode (FlexAttention's default).
    flex_block_size: int = 128
    # Hand the rewritten graph to Inductor; False returns it as eager Python (for explain and debugging).
    inductor: bool = True
    # False keeps every site exact, whatever the mode and the asam_compile.sparse marks say.
    allow_sparse: bool = True
    # The adaptive sparse settings (approximate mode): used where mode="adaptive" or a module is marked with
    # asam_compile.sparse(...). Options may give them whole (`sparse={"coverage": 0.99}` or a SparseSettings)
    # or one field at a time by name (`coverage=0.99`).
    sparse: SparseSettings = SparseSettings()

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "AsamConfig":
        """Build and validate a config; unknown keys and bad values raise ValueError naming them."""
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"asam_compile: options must be a dict of option names to values, got {type(options).__name__}")
        options = dict(options or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        shorthands = set(SPARSE_FIELDS)  # `coverage=0.99` for sparse={"coverage": 0.99}; block_size: both tiles
        unknown = sorted(set(options) - fields - shorthands)
        if unknown:
            raise ValueError(
                f"asam_compile: unknown option(s) {unknown}; allowed options are {sorted(fields | shorthands)}"
            )
        if "dump_dir" not in options and os.environ.get(ENV_DUMP_DIR):
            options["dump_dir"] = os.environ[ENV_DUMP_DIR]
        if "strict" not in options and os.environ.get(ENV_STRICT, "") not in ("", "0"):
            options["strict"] = True
        sparse = options.pop("sparse", SparseSettings())
        if isinstance(sparse, Mapping):
            sparse = SparseSettings.checked(**sparse)
        elif isinstance(sparse, SparseSettings):
            sparse = sparse.replaced()  # validated
        else:
            raise _bad("sparse", sparse, "a SparseSettings or a dict of its fields")
        given = {key: options.pop(key) for key in list(options) if key in shorthands}
        if "block_size" in given:  # one tile for the structured masks' block masks and the adaptive selection
            options.setdefault("flex_block_size", given["block_size"])
        sparse = sparse.replaced(**given)
        for key, value in options.items():
            _validate(key, value)
        if "disable_passes" in options:
            options["disable_passes"] = tuple(options["disable_passes"])
        return cls(**options, sparse=sparse)

    def cache_key(self) -> str:
        """A stable string that changes with every option that changes the rewritten graph."""
        return repr(sorted(dataclasses.asdict(self).items()))


def _bad(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"asam_compile: option {key}={value!r} is not allowed; expected {allowed}")


def _validate(key: str, value: Any) -> None:
    if key == "mode":
        if value not in MODES:
            raise _bad(key, value, f"one of {list(MODES)}")
    elif key == "dense_fallback":
        if value not in DENSE_FALLBACKS and not isinstance(value, bool):
            raise _bad(key, value, f"one of {list(DENSE_FALLBACKS)} (True: 'per_call', False: 'none')")
    elif key in ("strict", "trust_buffers", "use_gqa", "disable_inductor_sfdp", "inductor", "allow_sparse"):
        if not isinstance(value, bool):
            raise _bad(key, value, "True or False")
    elif key == "estimator":
        if value not in ESTIMATORS:
            raise _bad(key, value, f"one of {list(ESTIMATORS)}")
    elif key == "flex":
        if value not in ("auto", "always", "never"):
            raise _bad(key, value, "one of ['auto', 'always', 'never']")
    elif key in ("block_size", "flex_block_size"):
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
