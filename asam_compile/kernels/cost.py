"""Which exact kernel an attention site with a structured mask should run: SDPA with a dense mask or Flex."""

from __future__ import annotations

# Calibration: benchmarks/exact/calibrate_cost.py on an H100 80GB (torch 2.11, bf16, B=1, H=16, D=128, 2k-32k tokens,
# windows 256-4096 and causal; 2026-11-26, benchmarks/results/2026-11-26_h100_calibrate_cost.json). Fitted:
# SDPA flash 549 TFLOP/s; Flex at 0.68x of that on the blocks it computes, plus 27 us a call; SDPA with a
# dense L x S mask (what a mask that is neither causal nor absent gets; cuDNN picks it up) at 0.52x of flash
# plus reading the mask once (2 bytes an element at 3 TB/s). With these constants the cost model picks the
# faster kernel in 27/27 measured cases (the earlier guesses: 24/27; all 3 misses at 2k tokens).
FLASH_FLOPS = 549e12
FLEX_SPEED = 0.68  # Flex's rate relative to SDPA flash on the blocks it computes
MASKED_SDPA_SPEED = 0.52  # SDPA with a dense mask, relative to flash
FLEX_OVERHEAD_S = 2.7e-5
HBM_BYTES_PER_S = 3.0e12
# CPU: compiled Flex runs inference only (no backward), and has not been timed against SDPA here; take it
# only where it skips at least three quarters of the blocks of a long sequence.
CPU_MAX_DENSITY = 0.25
CPU_MIN_ELEMENTS = 4096 * 4096

def flex_unavailable(*, E: int, device_type: str, requires_grad: bool, policy: str = "auto") -> str | None:
    """Why compiled Flex cannot (or may not) run a site here, or None. `policy` is the `flex` option."""
    if policy == "never":
        return "flex='never'"
    if device_type == "cpu" and requires_grad:
        return "compiled Flex has no backward on CPU"
    if device_type == "cuda" and E < 16:
        return f"Flex needs head dim >= 16 on CUDA (got {E})"
    return None


def choose_kernel(
    *, B: int, H: int, L: int, S: int, E: int, density: float, device_type: str, requires_grad: bool, policy: str,
    build_s: float = 0.0,
) -> tuple[str, str]:
    """("flex" | "sdpa", reason) for one site. `policy` is the `flex` option: "auto", "always" or "never".
    `build_s`: seconds to build the block mask on every call (masks read at run time; 0 for constant ones)."""
    why = flex_unavailable(E=E, device_type=device_type, requires_grad=requires_grad, policy=policy)
    if why is not None:
        return "sdpa", why
    if policy == "always":
        return "flex", f"flex='always' (block density {density:.2f})"
    work = 4.0 * B * H * L * S * E
    if device_type == "cuda":
        t_sdpa = work / (FLASH_FLOPS * MASKED_SDPA_SPEED) + 2.0 * B * L * S / HBM_BYTES_PER_S
        t_flex = FLEX_OVERHEAD_S + build_s + density * work / (FLASH_FLOPS * FLEX_SPEED)
        if t_flex < t_sdpa:
            return "flex", f"block density {density:.2f}: est. Flex {t_flex * 1e3:.3f} ms < SDPA+mask {t_sdpa * 1e3:.3f} ms"
        return "sdpa", f"block density {density:.2f}: est. SDPA+mask {t_sdpa * 1e3:.3f} ms <= Flex {t_flex * 1e3:.3f} ms"
    if density <= CPU_MAX_DENSITY and L * S >= CPU_MIN_ELEMENTS:
        return "flex", f"block density {density:.2f} on CPU"
    return "sdpa", f"block density {density:.2f} at {L}x{S} on {device_type}: dense SDPA"


# Note [When sparse heads pay]
# The measured dispatch (Note [Dispatch by measured density] in asam_compile/kernels/dispatch.py) sends a set of
# heads to the sparse path when the time it saves on them exceeds what the sparse path costs besides its kernel.
# Per head, SDPA takes t = causal attention FLOPs / FLASH_FLOPS and the sparse kernel density * t / speed, with
# `speed` its rate per kept block relative to the SDPA the exact rewrite calls (torch's default backend choice).
# The heads left dense run SDPA on their slice, or, where the Triton kernel runs a block as fast as SDPA (speed
# >= 1), the kernel on all their blocks in the same compiled call (Note [The kernel inside compiled graphs] in
# triton_block_sparse.py): either way at about t. Besides, the sparse path costs
# SPARSE_CALL_OVERHEAD_S a call on the GPU (selection and block tables). Measured on an H200 (torch 2.11, bf16;
# benchmarks/RESULTS.md, session 9, dispatch_breakdown.py) at 16k tokens: our Triton kernel at density 1 took
# 0.903 ms on Gemma-3-270M's layer 11 (4 q heads, 1 kv head, D = 256) against the default SDPA's 0.93 ms (speed
# 1.03, taken as 1.0), and 2.13 ms against 1.70 ms on planted inputs with H = 16, D = 128 (speed 0.80; D = 64 not
# measured, taken as D = 128's); the compiled path with every head dense took 0.07-0.08 ms more than the kernel
# alone on both. The eager path of session 8 (an opaque op launching the selection, ~10 table kernels and the
# kernel one by one) cost 0.7-0.8 ms; Flex keeps that constant. Flex: 0.68x flash at D <= 128 (above), 0.46x at
# D = 256 (measured on the same layer's kept blocks).
SPARSE_BLOCK_SPEED = {
    "flex": {64: FLEX_SPEED, 128: FLEX_SPEED, 256: 0.46},
    "triton": {64: 0.80, 128: 0.80, 256: 1.0},
}
SPARSE_CALL_OVERHEAD_S = {"flex": 8e-4, "triton": 1e-4}


def sparse_speed(E: int, kernel: str) -> float:
    speeds = SPARSE_BLOCK_SPEED[kernel]
    return speeds.get(E, speeds[256] if E > 128 else speeds[64])


def head_seconds(L: int, S: int, E: int, causal: bool, batch: int = 1) -> float:
    """SDPA's time for one head of a (batch, L, S, E) attention, from the calibrated flash rate."""
    work = 4.0 * batch * L * S * E * (0.5 if causal and L == S else 1.0)
    return work / FLASH_FLOPS


def sparse_split(density: list[float], *, max_density: float, E: int, L: int, S: int, causal: bool, batch: int,
                 device_type: str, kernel: str) -> tuple[int, ...]:
    """The heads that run sparse (Note [When sparse heads pay]): on CUDA the set, taken sparsest first, that saves
    the most time net of the sparse path's own cost (none where nothing does); elsewhere (not timed) every head
    at or below max_density."""
    eligible = sorted((d, h) for h, d in enumerate(density) if d <= max_density)
    if device_type != "cuda":
        return tuple(sorted(h for _, h in eligible))
    t = head_seconds(L, S, E, causal, batch)
    speed = sparse_speed(E, kernel)
    best, best_gain, gain, chosen = (), 0.0, -SPARSE_CALL_OVERHEAD_S[kernel], []
    for d, h in eligible:
        gain += t * (1.0 - d / speed)
        chosen.append(h)
        if gain > best_gain:
            best, best_gain = tuple(sorted(chosen)), gain
    return best


# Note [Nothing to gain] in passes/adaptive_plan.py: what the measured dispatch's opaque op costs a call besides
# its kernels, measured on an H200 in a host-bound run (SmolLM2-135M at 8k: 13.2 ms over 30 sites that ran SDPA).
DISPATCH_OP_S = 4.4e-4


def best_dispatch_gain(heads: int, L: int, S: int, E: int, causal: bool, forced: float) -> tuple[float, float]:
    """(seconds, floor): what a measured-dispatch site would save at best on CUDA (every one of `heads` batch x
    query heads keeping only its forced share of the blocks, on the Triton kernel) and what the dispatch costs
    (its op and the sparse path's fixed cost). Note [Nothing to gain] in passes/adaptive_plan.py."""
    gain = heads * head_seconds(L, S, E, causal) * max(0.0, 1.0 - forced / sparse_speed(E, "triton"))
    return gain, DISPATCH_OP_S + SPARSE_CALL_OVERHEAD_S["triton"]
